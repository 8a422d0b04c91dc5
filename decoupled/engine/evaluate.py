"""Test accuracy of every block's head, and the head ensemble of Belilovsky et al. 2019.

`eval_stages` is the per-batch step shared by the single-process evaluation below and the
distributed one (pipeline.py), so both compute the very same floats in the same order.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..data import Split, batches


def evaluates_at(train, count: int, steps_per_epoch: int) -> bool:
    """Note [mid-epoch evaluation]: whether the network is scored after `count` source steps (the
    data loader's batches since the first epoch began, counted across epochs: the same on every rank
    and in every mode). Every train.eval_every_steps-th one, except where an epoch ends: that
    evaluation is the epoch's own (train.eval_every, the whole test set), never a second one. An
    evaluation only reads the weights: it draws no random number training uses (eval mode, no
    dropout; the batches have their own generators, data.py), so sync still equals simultaneous."""
    n = train.eval_every_steps
    return bool(n) and count % n == 0 and count % steps_per_epoch != 0


def mid_epoch_test(test: Split, train) -> Split:
    """What a mid-epoch evaluation scores: the first train.eval_subset test samples (all when 0), so
    every row and seed is scored on the same ones. Refused when the test set is smaller."""
    m = train.eval_subset
    if m > len(test):
        raise ConfigError(f"train.eval_subset={m} is more than the {len(test)} test samples; set it to at most "
                          f"{len(test)} (or 0: the whole test set)")
    return test if m in (0, len(test)) else Split(test.x[:m], test.y[:m])


@torch.no_grad()
def eval_stages(stages, h: torch.Tensor, y: torch.Tensor, z, correct: dict, on_exit=None):
    """Forward a test batch through `stages`, count each head's correct answers into `correct`
    (block index -> count), and add each head's vote to the ensemble Z = sum_j 2^j softmax(z_j)
    (j = 1..J). Returns the last output and the running ensemble. `on_exit(stage, h, logits)`, when
    given, sees every exit's input and answer (exits.ExitRecorder: the early-exit curve)."""
    for s in stages:
        h = s.forward(h)
        logits = s.logits(h).float()
        if on_exit is not None:
            on_exit(s, h, logits)
        # a device tensor: counted without a host sync per batch (read once, at the end)
        correct[s.index] = correct.get(s.index, 0) + (logits.argmax(-1) == y).sum()
        z = z + 2.0 ** (s.index + 1) * logits.softmax(-1)
    return h, z


@torch.no_grad()
def val_losses(stages, split: Split, batch_size: int, device: torch.device) -> dict[int, float]:
    """Eval-mode pass of a validation split through `stages` (from the first block): the mean
    cross-entropy of every block's head (predsim: its prediction branch), by block index. The
    monitored loss of early stopping and plateau LR decay when data.val_fraction > 0."""
    import torch.nn.functional as F
    total: dict[int, torch.Tensor] = {}
    for b in batches(split, batch_size, shuffle=False):
        h, y = b.x.to(device), b.y.to(device)
        for s in stages:
            h = s.forward(h)
            loss = F.cross_entropy(s.logits(h).float(), y, reduction="sum")
            total[s.index] = total.get(s.index, 0.0) + loss
    return {j: float(t) / max(len(split), 1) for j, t in total.items()}


@torch.no_grad()
def evaluate(stages, split: Split, batch_size: int, device: torch.device) -> dict:
    """Pass every test sample through every block; score each head and the ensemble."""
    correct: dict[int, int] = {}
    ens_correct, n = 0, 0
    for b in batches(split, batch_size, shuffle=False):
        y = b.y.to(device)
        _, z = eval_stages(stages, b.x.to(device), y, 0.0, correct)
        ens_correct += (z.argmax(-1) == y).sum()
        n += len(y)
    return {"layer_acc": [int(correct[s.index]) / max(n, 1) for s in stages],
            "ensemble_acc": int(ens_correct) / max(n, 1)}
