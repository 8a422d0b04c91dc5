"""Patel & Siegelmann, QuickNets: each block trains with cross-entropy through its exit on the samples
the blocks before it have not learned; a commitment head then learns whether the exit's prediction
is right. A sample is *learned* by a block when (paper section 3.2)

    confidence >= objective.quicknet_threshold  AND  commitment logit > 0  AND  prediction correct,

with confidence the normalised-entropy d = 1 - H(p) / log C of the exit's softmax p.

Two phases, two sets of parameters, one module (so one checkpoint holds both):
- `forward` is the block phase: cross-entropy through `head`. The block's optimizer steps only
  `local_parameters()` (the exit head), so the commitment head is never touched by it.
- `commitment_loss` is the commitment phase: binary cross-entropy of `commit` on detached block
  features against "the exit was right"; the trainer gives it its own optimizer, once the block is
  frozen (trainers/quicknet.py); across blocks trained online by
  objectives/router.py. `commit_trained` (a buffer, so checkpointed) records that it ran;
  until then the exit rule ignores the commitment output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ObjectiveConfig
from ..heads import CommitmentHead
from .base import LocalOutput, Objective, masked_mean


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Normalised-entropy confidence 1 - H(softmax(logits)) / log C, in [0, 1]; 1 = one-hot."""
    logp = logits.float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (1.0 - entropy / math.log(logits.size(-1))).clamp(0.0, 1.0)


def class_sample_weights(y: torch.Tensor, counts0: torch.Tensor, balance: str = "remaining") -> torch.Tensor:
    """Per-sample draw weights for the samples `y` still to be trained on (T_j), given the class
    sizes of the whole training set T_0 (`counts0`). The paper: "the sampling frequency ... is adjusted
    for each class proportional to the number of remaining samples" to keep the data balanced.

    remaining (the paper, as we read it): w_i = 1 / |T_0 ∩ c_i|, so class c is drawn with probability
        P(c) = r_c / sum_d r_d,  r_c = |T_j ∩ c| / |T_0 ∩ c|  (the fraction of class c that remains):
        on T_0 every class is equally likely; a class loses weight as it is learned.
    equal: w_i = 1 / |T_j ∩ c_i|, every class still present equally likely however little remains.
    none:  w_i = 1, uniform over the remaining samples."""
    if balance == "none":
        return torch.ones(len(y), dtype=torch.float64)
    counts = counts0 if balance == "remaining" else torch.bincount(y, minlength=len(counts0))
    return 1.0 / counts.to(torch.float64)[y]


class QuickNet(Objective):
    default_head = "mixedpool"
    has_commitment = True

    def __init__(self, cfg: ObjectiveConfig, in_shape, num_classes: int):
        super().__init__(cfg, in_shape, num_classes)
        self.commit = CommitmentHead(tuple(in_shape), cfg.commit_hidden or num_classes)
        self.register_buffer("commit_trained", torch.tensor(False))

    def forward(self, h: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> LocalOutput:
        logits = self.head(h)
        loss = self.loss(h, logits, y, mask)
        with torch.no_grad():
            d = logits.detach()
            return LocalOutput(loss, logits, d.argmax(-1), confidence(d))

    def local_parameters(self):
        return self.head.parameters()

    def commitment(self, h: torch.Tensor) -> torch.Tensor:
        """(N,) commitment logits; > 0 means the exit commits to its prediction."""
        return self.commit(h)

    @property
    def commitment_ready(self) -> bool:
        return bool(self.commit_trained)

    def commitment_loss(self, h: torch.Tensor, correct: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        per = F.binary_cross_entropy_with_logits(self.commit(h.detach()), correct.to(h.dtype), reduction="none")
        return masked_mean(per, mask)

    def learned(self, out: LocalOutput, commit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the samples this exit counts as learned (the three conditions above)."""
        return (out.conf >= self.cfg.quicknet_threshold) & (commit > 0) & (out.pred == y)
