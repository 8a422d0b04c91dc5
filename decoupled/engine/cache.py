"""The store of cached pseudo-inputs (Marquez et al. 2018): a frozen block's outputs over the whole
training set, indexed by sample id, in memory or in a .npy file on disk (frozen.py decides when)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


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
        """`x`: float32 of the stored shape, decoded from the wire by the caller (Stage.decode): a cast
        here would misread a scaled code's rows (engine/wire.py, note [row scales])."""
        if x.dtype != torch.float32:
            raise TypeError(f"pseudo-inputs are stored as float32, got {x.dtype}; decode them first (Stage.decode)")
        if isinstance(self.store, torch.Tensor):
            self.store[ids.to(self.store.device)] = x.to(self.store.device)
        else:
            self.store[ids.cpu().numpy()] = x.detach().cpu().numpy()

    @classmethod
    def allocate(cls, n: int, shape, where: str, path: Path | None, device: torch.device) -> "PseudoInputs":
        if where == "disk":
            path.parent.mkdir(parents=True, exist_ok=True)
            return cls(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *shape)), device)
        return cls(torch.empty((n, *shape), dtype=torch.float32, device=device), device)

    def flush(self) -> None:
        if not isinstance(self.store, torch.Tensor):
            self.store.flush()
