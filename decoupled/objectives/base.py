"""The one interface every local objective implements.

Given a block's output, the labels and an optional sample mask, an objective returns the loss
to back-propagate through the block and its head, plus per-sample predictions and confidences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ObjectiveConfig, TrainConfig
from ..heads import build_head


@dataclass
class LocalOutput:
    loss: torch.Tensor  # scalar, averaged over the masked samples
    logits: torch.Tensor  # (N, classes)
    pred: torch.Tensor  # (N,) predicted class
    conf: torch.Tensor  # (N,) max softmax probability


def masked_mean(per_sample: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_sample.mean()
    m = mask.to(per_sample.dtype)
    return (per_sample * m).sum() / m.sum().clamp_min(1.0)


class Objective(nn.Module):
    """Cross-entropy through the head; subclasses change the head, the loss or the epoch budget."""

    default_head = "khidden"
    # Declared capability (exits.py and flops.py read it, never probe): a commitment head that says
    # whether the exit commits to its prediction (QuickNets).
    has_commitment = False

    def __init__(self, cfg: ObjectiveConfig, in_shape, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.head = build_head(cfg.head or self.default_head, in_shape, num_classes,
                               k=cfg.k, width=cfg.aux_width, batchnorm=cfg.head_batchnorm)

    def loss(self, h, logits, y, mask):
        return masked_mean(F.cross_entropy(logits, y, reduction="none"), mask)

    def forward(self, h: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> LocalOutput:
        logits = self.head(h)
        loss = self.loss(h, logits, y, mask)
        with torch.no_grad():
            conf, pred = logits.detach().softmax(-1).max(-1)
        return LocalOutput(loss, logits, pred, conf)

    def commitment(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no commitment head (has_commitment=False)")

    @property
    def commitment_ready(self) -> bool:
        """Whether the commitment head has been trained, so the early-exit rule may use it."""
        return False

    def local_parameters(self):
        """What the block's optimizer steps besides the block: the whole objective by default;
        QuickNet keeps its commitment head out (it trains in its own phase)."""
        return self.parameters()

    @classmethod
    def epochs_for(cls, cfg: ObjectiveConfig, block: int, train: TrainConfig) -> int:
        """How many epochs block `block` (0-based) trains; the same for every block by default.
        A classmethod: every rank knows every block's budget without building its head."""
        return train.epochs
