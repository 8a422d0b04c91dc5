"""How one stage computes and what it passes on: the autocast dtype of its work (train.precision), the
loss scaler fp16 needs, the dtype of its outputs on the wire (dist.wire_dtype), and the check that
its loss and activations stay finite (train.check_every)."""
from __future__ import annotations

import torch

from .wire import CODECS, Codec, decode


class NonFiniteError(RuntimeError):
    """A block's loss or activations became NaN or inf."""


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision
WIRE = CODECS  # dist.wire_dtype -> its codec (wire.py)


class Precision:
    def __init__(self, device: torch.device, *, compute: torch.dtype | None, wire: Codec, check_every: int):
        self.device = device
        self.compute = compute  # None: float32, no autocast
        # fp16's narrow exponent underflows small gradients: it alone needs its own loss scaler
        self.scaler = torch.amp.GradScaler(device.type, enabled=compute == torch.float16)
        self.wire = wire  # CODECS[dist.wire_dtype] (wire.py)
        self.check_every = check_every
        self._finite = torch.ones((), dtype=torch.bool, device=device)  # all finite since the last check
        self._checked = 0  # steps checked so far

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.compute, enabled=self.compute is not None)

    @staticmethod
    def from_wire(x: torch.Tensor, shape) -> torch.Tensor:
        return decode(x, shape)  # a stage reads float32 of its input shape whatever was sent

    def to_wire(self, h: torch.Tensor) -> torch.Tensor:
        """A scaled code's rows holding inf or NaN get non-finite scales (wire.py): folded into the
        flag like the block's own outputs, so the next check names the block, with no host sync here."""
        x = self.wire.encode(h)
        if self.wire.scaled:
            self._finite &= torch.isfinite(self.wire.scales(x)).all()
        return x

    def watch(self, loss: torch.Tensor, out: torch.Tensor) -> None:
        """Fold a step's finiteness into the flag, on the device: no host sync per step."""
        self._finite &= torch.isfinite(loss.detach()) & torch.isfinite(out.detach()).all()

    def check_due(self, steps: int, block: int) -> None:
        if steps - self._checked >= self.check_every:
            self.check(steps, block)

    def check(self, steps: int, block: int) -> None:
        """Read the accumulated flag (one host sync on GPU): a diverged block must stop the job with
        its name and step window, not feed NaNs downstream for hours."""
        first, self._checked = self._checked + 1, steps
        if not bool(self._finite):
            window = f"step {first}" if first == steps else f"steps {first}-{steps}"
            raise NonFiniteError(f"block {block} {window}: loss or output activations not finite "
                                 "(train.precision / dist.wire_dtype / train.check_every); lower optim.lr or "
                                 "check the data")

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if sd["scaler"]:  # empty when loss scaling is off
            self.scaler.load_state_dict(sd["scaler"])
