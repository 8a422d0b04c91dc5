"""Frozen upstream inputs: once every block before block j is frozen, block j's inputs are a fixed
function of the sample, so they can be computed once and looked up by sample id (Marquez et al.
2018, pseudo-inputs) instead of pushed through the frozen blocks every step. Three trainers feed a
block so: sequential (block after block), quicknet (block after block on a shrinking set) and the
async cascade hand-off across ranks (a rank caches one epoch of upstream's outputs as they stream
past, then is its own source: engine/ranks/sources.py).

Note [cache or recompute]. train.cache: "memory" or "disk" (a .npy memmap) keep the frozen outputs
(cache.py); "recompute" pushes the raw inputs through the frozen blocks each time; "auto" = memory,
unless the data is augmented: a frozen block's outputs then change every epoch, so a cache would
freeze one augmented view. Every forward made for training is counted in stage.stats.work, so
flops.train_flops charges for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..data import Augment, Split, augment_batch
from .cache import PseudoInputs

if TYPE_CHECKING:
    from ..config import DataConfig, TrainConfig
    from .stage import Stage


def cache_mode(train: TrainConfig, data: DataConfig) -> str:
    """train.cache resolved, the same way in every trainer (note [cache or recompute])."""
    if train.cache == "auto":
        return "recompute" if data.augment != "none" else "memory"
    return train.cache


class FrozenInputs:
    """One block's inputs, looked up by training-sample id: the cached outputs of the frozen block
    before it, or the raw data pushed through the frozen blocks (note [cache or recompute])."""

    def __init__(self, raw: torch.Tensor, device: torch.device, frozen: list[Stage] | None = None,
                 cache: PseudoInputs | None = None, augment: Augment | None = None,
                 move: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.raw, self.device, self.frozen, self.cache = raw, device, frozen or [], cache
        self.augment = augment  # resolved data.augment, applied to raw inputs (never to cached ones)
        self.move = move or (lambda t: t.to(device))  # raw inputs to the device (Run.to_device: pinned on CUDA)

    def get(self, ids: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        """The inputs of samples `ids`; `g`: draw their augmentation from it (raw inputs only)."""
        if self.cache is not None:
            return self.cache.get(ids)
        x = self.raw[ids]
        if g is not None:
            x = augment_batch(x, g, self.augment.pad, self.augment.flip)
        return self.recompute(x)

    def batch(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The inputs of a data.batches batch (`x`: its raw inputs, already augmented)."""
        return self.cache.get(ids) if self.cache is not None else self.recompute(x)

    def recompute(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs through the frozen blocks, each forward counted as training work."""
        x = self.move(x)
        for f in self.frozen:
            x = f.forward(x)
            f.stats.work["forward"] += len(x)
        # the wire form (dist.wire_dtype) back to float32, as a cache stores it
        return self.frozen[-1].decode(x) if self.frozen else x.float()

    def after(self, stage: Stage, ids: torch.Tensor, where: str, path: Path | None, chunk: int) -> FrozenInputs:
        """The inputs of the block after `stage`, for the samples `ids`: `stage`'s frozen outputs,
        cached in `where` ("memory" / "disk" at `path`), or recomputed."""
        if where == "recompute":
            return FrozenInputs(self.raw, self.device, self.frozen + [stage], None, self.augment, self.move)
        cache = PseudoInputs.allocate(len(self.raw), stage.out_shape, where, path, self.device)
        for part in ids.split(chunk):
            cache.put(part, stage.decode(stage.forward(self.get(part))))
        stage.stats.work["forward"] += len(ids)
        cache.flush()
        return FrozenInputs(self.raw, self.device, [], cache, self.augment, self.move)


class StreamedInputs:
    """One split of upstream's frozen outputs caught as they stream past (the async cascade
    hand-off): inputs, labels and (test) the ensemble votes, filled by sample id, then served as a
    data.Split once every sample has come."""

    def __init__(self, n: int, where: str, path: Path, device: torch.device, votes: int = 0):
        self.n, self.where, self.path, self.device, self.votes = n, where, path, device, votes
        self.x: PseudoInputs | None = None  # allocated at the first batch (its shape is upstream's output's)
        self.y = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.aux = torch.zeros((n, votes), device=device) if votes else None

    def put(self, ids: torch.Tensor, x: torch.Tensor, y: torch.Tensor, aux: torch.Tensor | None) -> None:
        """`x`: float32, decoded from the wire (HandoffCache.offer)."""
        if self.x is None:
            self.x = PseudoInputs.allocate(self.n, x.shape[1:], self.where, self.path, self.device)
        self.x.put(ids, x)
        self.y[ids] = y
        if aux is not None:
            self.aux[ids] = aux

    def complete(self) -> bool:
        return self.x is not None and not bool((self.y < 0).any())

    def split(self) -> Split:
        self.x.flush()
        return Split(self.x, self.y)
