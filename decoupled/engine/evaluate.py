"""Test accuracy of every block's head, and the head ensemble of Belilovsky et al. 2019."""
from __future__ import annotations

import torch

from ..data import Split, batches


@torch.no_grad()
def evaluate(stages, split: Split, batch_size: int, device: torch.device) -> dict:
    """Pass every test sample through every block; score each head and the 2^j-weighted
    ensemble Z = sum_j 2^j softmax(z_j) (j = 1..J)."""
    correct = [0] * len(stages)
    ens_correct, n = 0, 0
    for b in batches(split, batch_size, shuffle=False):
        h, y = b.x.to(device), b.y.to(device)
        z = 0.0
        for j, s in enumerate(stages):
            h = s.forward(h)
            logits = s.logits(h).float()
            correct[j] += int((logits.argmax(-1) == y).sum())
            z = z + 2.0 ** (j + 1) * logits.softmax(-1)
        ens_correct += int((z.argmax(-1) == y).sum())
        n += len(y)
    return {"layer_acc": [c / max(n, 1) for c in correct], "ensemble_acc": ens_correct / max(n, 1)}
