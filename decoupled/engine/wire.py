"""The codecs of dist.wire_dtype: how a block's output becomes what travels to the next block (on
the wire between ranks, at the block boundaries of the single-process modes, in a rank's replay
buffer) and how the next block reads it back as float32. One registry, CODECS: the config's Literal
(tests/test_wire.py checks it), precision.Precision, the transport's dtype slot and the speed
guard's byte sizes all read it.

- a cast ("float32", "bfloat16", "float16"): the activations in that dtype, their own shape;
- a scaled code ("int8", "float8_e4m3fn", "float8_e5m2"): each sample row divided by its own scale
  amax(|row|) / qmax (qmax: 127, or the float8 dtype's largest finite value: e4m3fn has no infinity,
  so an unscaled value above 448 would become NaN), then rounded to the code dtype. A zero row gets
  scale 1 and comes back as exact zeros (as does a row below ~1e-40, whose scale would underflow);
  a row holding inf or NaN gets a non-finite scale and comes back all NaN (never laundered into
  finite codes), and Precision.to_wire counts it against the block.

Note [row scales]. A scaled code's row is its D codes followed by the 4 bytes of its float32 scale,
one (n, D + 4) tensor of the code dtype. Every operation the engine applies to activations between
blocks is a row operation: a router's h[keep], the rebatcher's torch.cat / x[order] / x[n:], split
replicas' tensor_split and join (groups.py), the replay buffer's entries, a Message's single
activation segment. Each keeps a row's scale with its codes without knowing it is there, so no second
tensor travels beside Message.x, Entry.x or the rebatcher's parts, and the transport's dtype slot
names the codec (each codec's dtype is its own), the header's dims are (D + 4,) and the scales come
in the same transfer as the codes (note [one transfer per message]). Per-channel scales would not
survive those cuts. The price: the row is flat, so reading it needs the feature shape, which every
reader knows (Stage.decode: the block's out_shape; Stage.train_step / forward: its in_shape).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_BYTES = 4  # one float32 scale per row


@dataclass(frozen=True)
class Codec:
    name: str  # the dist.wire_dtype value
    dtype: torch.dtype  # of the wire tensor
    qmax: float = 0.0  # a scaled code's largest code magnitude; 0: a plain cast

    @property
    def scaled(self) -> bool:
        return self.qmax > 0

    def row_bytes(self, numel: int) -> int:
        """Bytes one sample's activation of `numel` features takes on the wire."""
        return numel * self.dtype.itemsize + SCALE_BYTES * self.scaled

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        if not self.scaled:
            return h if h.dtype == self.dtype else h.to(self.dtype)
        flat = h.detach().float().flatten(1)
        scale = flat.abs().amax(1, keepdim=True) / self.qmax  # NaN stays NaN: the scale is then NaN too
        # a zero row (or one so small that its scale underflows) codes as zeros under scale 1, not 0 / 0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = (flat / scale).clamp(-self.qmax, self.qmax)
        q = q.round().to(self.dtype) if self.dtype == torch.int8 else q.to(self.dtype)
        return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], 1).view(self.dtype)

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1) float32: the rows' scales of an encoded (n, D + 4) tensor (a copy: they need not be aligned)."""
        return x.view(torch.uint8)[:, -SCALE_BYTES:].contiguous().view(torch.float32)

    def decode(self, x: torch.Tensor, shape) -> torch.Tensor:
        """float32 of shape (n, *shape); a cast's tensor already has its shape."""
        if not self.scaled:
            return x if x.dtype == torch.float32 else x.float()
        codes = x.view(torch.uint8)[:, :-SCALE_BYTES].view(self.dtype)
        return (codes.float() * self.scales(x)).view(len(x), *shape)


def _float8(name: str) -> Codec:
    dtype = getattr(torch, name)
    return Codec(name, dtype, torch.finfo(dtype).max)


CODECS = {c.name: c for c in (Codec("float32", torch.float32), Codec("bfloat16", torch.bfloat16),
                              Codec("float16", torch.float16), Codec("int8", torch.int8, 127.0),
                              _float8("float8_e4m3fn"), _float8("float8_e5m2"))}
BY_DTYPE = {c.dtype: c for c in CODECS.values()}


def decode(x: torch.Tensor, shape) -> torch.Tensor:
    """Whatever reached a block (a wire tensor, or the raw float32 data the first block reads) as
    float32 of shape (n, *shape): the codec is the tensor's dtype's."""
    return BY_DTYPE[x.dtype].decode(x, shape) if x.dtype in BY_DTYPE else x.float()
