"""Cached pseudo-inputs (Marquez et al. 2018): a frozen block's outputs over the whole training set,
computed once and reused every epoch of the next block, in memory or in a .npy file on disk."""
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
        return torch.from_numpy(np.ascontiguousarray(self.store[ids.numpy()])).to(self.device)

    @classmethod
    def compute(cls, stage, source, batch_size: int, where: str, path: Path | None,
                device: torch.device) -> "PseudoInputs":
        """Run `source` (the previous PseudoInputs or the raw training tensor) through the frozen
        stage in eval mode, chunk by chunk."""
        n = len(source)
        get = source.get if isinstance(source, PseudoInputs) else (lambda ids: source[ids].to(device))
        if where == "disk":
            path.parent.mkdir(parents=True, exist_ok=True)
            store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *stage.out_shape))
        else:
            store = torch.empty((n, *stage.out_shape), dtype=torch.float32, device=device)
        for start in range(0, n, batch_size):
            ids = torch.arange(start, min(start + batch_size, n))
            out = stage.forward(get(ids))
            if where == "disk":
                store[start:start + len(ids)] = out.cpu().numpy()
            else:
                store[start:start + len(ids)] = out
        if where == "disk":
            store.flush()
        return cls(store, device)
