"""Cached pseudo-inputs (Marquez et al. 2018): a frozen block's outputs over the whole training set,
computed once and reused every epoch of the next block, in memory or in a .npy file on disk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import JobConfig


def cache_mode(cfg: JobConfig) -> str:
    """train.cache resolved, the same way in every trainer: "auto" = memory, unless the data is
    augmented (a frozen block's outputs then change every epoch and must be recomputed)."""
    if cfg.train.cache == "auto":
        return "recompute" if cfg.data.augment != "none" else "memory"
    return cfg.train.cache


class PseudoInputs:
    def __init__(self, store, device: torch.device):
        self.store = store  # torch.Tensor (memory) or np.memmap (disk), indexed by sample id
        self.device = device

    def __len__(self) -> int:
        return len(self.store)

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.store, torch.Tensor):
            return self.store[ids.to(self.store.device)]
        return torch.from_numpy(np.ascontiguousarray(self.store[ids.cpu().numpy()])).to(self.device)

    __getitem__ = get  # so a data.Split can hold a PseudoInputs as its x

    def put(self, ids: torch.Tensor, x: torch.Tensor) -> None:
        if isinstance(self.store, torch.Tensor):
            self.store[ids.to(self.store.device)] = x.to(self.store.device, self.store.dtype)
        else:
            self.store[ids.cpu().numpy()] = x.detach().float().cpu().numpy()

    @classmethod
    def allocate(cls, n: int, shape, where: str, path: Path | None, device: torch.device) -> "PseudoInputs":
        if where == "disk":
            path.parent.mkdir(parents=True, exist_ok=True)
            return cls(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *shape)), device)
        return cls(torch.empty((n, *shape), dtype=torch.float32, device=device), device)

    @classmethod
    def compute(cls, stage, source, batch_size: int, where: str, path: Path | None,
                device: torch.device) -> "PseudoInputs":
        """Run `source` (the previous PseudoInputs or the raw training tensor) through the frozen
        stage in eval mode, chunk by chunk."""
        cache = cls.allocate(len(source), stage.out_shape, where, path, device)
        for start in range(0, len(source), batch_size):
            ids = torch.arange(start, min(start + batch_size, len(source)))
            cache.put(ids, stage.forward(source[ids].to(device)))
        cache.flush()
        return cache

    def flush(self) -> None:
        if not isinstance(self.store, torch.Tensor):
            self.store.flush()
