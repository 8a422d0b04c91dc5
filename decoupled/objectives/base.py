"""The one interface every local objective implements.

Given a block's output, the labels and an optional sample mask, an objective returns the loss
to back-propagate through the block and its head, plus per-sample predictions and confidences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Choice, ConfigError, TrainConfig, knob
from ..config.schema import Fallback
from ..heads import build_head

HIDDEN_HEADS = ("khidden", "mlpsr")  # the heads with k-1 hidden layers of aux_width (heads.py)


def _hidden_head(c) -> bool:
    return c.objective.head_name() in HIDDEN_HEADS and c.objective.k > 1


@dataclass
class ObjectiveConfig(Choice):
    """[objective] keys of every objective: its head. An objective with keys of its own subclasses it."""
    name: str = "khidden"  # the objective (objectives/__init__.py: OBJECTIVES)
    # override the objective's head ("" = the objective's own): khidden | mlpsr | dense | predsim | mixedpool
    head: str = knob("", registry="head", empty_ok=True)
    # k-hidden: k-1 auxiliary convs before average + linear
    k: int = knob(1, ge=1, acts=(lambda c: c.objective.head_name() in HIDDEN_HEADS, "the khidden / mlpsr heads"))
    # auxiliary conv / dense width
    aux_width: int = knob(128, ge=1, acts=(lambda c: c.objective.head_name() == "dense" or _hidden_head(c),
                                           "the dense head (cascade) or khidden / mlpsr heads with objective.k > 1"))
    # BatchNorm in the hidden convs of the khidden / mlpsr heads
    head_batchnorm: bool = knob(True, acts=(lambda c: _hidden_head(c) and c.model.name != "mlp",
                                            "khidden / mlpsr heads with objective.k > 1 on conv features"))
    # early exit when no exit passes: "confident" = the most confident exit (the paper) | "last"
    exit_fallback: Fallback = "confident"
    # token features (tokens, dim) of a transformer block (model.name="vit", torchvision ViTs, a plug-in's):
    # every head reads them through LayerNorm then "cls" (the first token: the class token) | "mean" (over
    # tokens), then the head's own layers on that vector (heads.py: TokenHead)
    token_pool: Literal["cls", "mean"] = knob("cls", acts=(lambda c: c.model.tokens, "token features: model.name="
                                                           "'vit', torchvision ViTs or a model plug-in"))
    default_head: ClassVar[str] = "khidden"  # the objective's own head

    def head_name(self) -> str:
        return self.head or self.default_head

    def exit_thresholds(self) -> tuple[float, ...]:
        """Confidence thresholds of the early-exit curve this objective adds to exits.THRESHOLDS."""
        return ()

    def check(self) -> None:
        if self.head == "predsim":
            raise ConfigError(f"objective.head={self.head!r} does not fit objective.name={self.name!r}: only "
                              "predsim has (and needs) the similarity branch; leave objective.head empty")
        if self.head_name() == "dense" and self.aux_width < 2:
            raise ConfigError(f"objective.aux_width={self.aux_width} is too small for the dense output block "
                              "(n -> n/2 -> classes); use at least 2")


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

    Config = ObjectiveConfig
    # Declared capability (exits.py and flops.py read it, never probe): a commitment head that says
    # whether the exit commits to its prediction (QuickNets).
    has_commitment = False

    def __init__(self, cfg: ObjectiveConfig, in_shape, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.head = build_head(cfg.head_name(), in_shape, num_classes, k=cfg.k, width=cfg.aux_width,
                               batchnorm=cfg.head_batchnorm, token_pool=cfg.token_pool)

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
