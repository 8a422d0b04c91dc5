"""Patel & Siegelmann, QuickNets: each block trains with cross-entropy through its exit on the samples
the blocks before it have not learned; a commitment head then learns whether the exit's prediction
is right. A sample is *learned* by a block when (paper section 3.2)

    confidence >= objective.quicknet_threshold  AND  commitment logit > 0  AND  prediction correct,

with confidence the normalised-entropy d = 1 - H(p) / log C of the exit's softmax p.

Two phases, two sets of parameters, one module (so one checkpoint holds both):
- `forward` is the block phase: cross-entropy through `head`. The block's optimizer steps only
  `local_parameters()` (the exit head), so the commitment head is never touched by it.
- `commitment_step` is the commitment phase: one step of its own optimizer on the binary
  cross-entropy (`commitment_loss`) of `commit` on detached block features against "the exit was
  right"; taken once the block is frozen by the quicknet trainer (trainers/quicknet.py), and
  online, across blocks, by objectives/router.py. `commit_trained` (a buffer, so checkpointed) records that it ran;
  until then the exit rule ignores the commitment output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import knob
from ..heads import CommitmentHead
from .base import LocalOutput, Objective, ObjectiveConfig, masked_mean


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


def _bce(logits: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    per = F.binary_cross_entropy_with_logits(logits, correct.to(logits.dtype), reduction="none")
    return masked_mean(per, mask)


class QuickNet(Objective):
    @dataclass
    class Config(ObjectiveConfig):
        name: str = "quicknet"
        # a sample is learned (and leaves the later blocks' data) when its exit's
        # normalised-entropy confidence >= this, its commitment logit > 0 and its prediction is right.
        # The paper gives no value; the exit curve sweeps the same rule at inference.
        quicknet_threshold: float = knob(0.95, ge=0.0, le=1.0)
        commit_hidden: int = knob(0, ge=0)  # commitment head hidden units; 0 = number of classes (the paper)
        # class weights of the draws (objectives/quicknet.py): "remaining" (the paper: a class loses weight
        # as it is learned) | "equal" (every class still present equally likely) | "none" (uniform)
        quicknet_balance: Literal["remaining", "equal", "none"] = "remaining"
        default_head = "mixedpool"

        def exit_thresholds(self) -> tuple[float, ...]:
            return (self.quicknet_threshold,)

    has_commitment = True

    def __init__(self, cfg: Config, in_shape, num_classes: int):
        super().__init__(cfg, in_shape, num_classes)
        self.commit = CommitmentHead(tuple(in_shape), cfg.commit_hidden or num_classes, cfg.token_pool)
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
        return _bce(self.commit(h.detach()), correct, mask)

    def commitment_step(self, h: torch.Tensor, correct: torch.Tensor, optimizer) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the commitment head alone (`optimizer` holds only its parameters) on "the exit
        is right" (`correct`); marks the head trained. Returns the logits the step was taken on and
        its loss, both detached."""
        self.train()
        logits = self.commit(h.detach())
        loss = _bce(logits, correct, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.commit_trained.fill_(True)
        return logits.detach(), loss.detach()

    def learned(self, out: LocalOutput, commit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the samples this exit counts as learned (the three conditions above)."""
        return (out.conf >= self.cfg.quicknet_threshold) & (commit > 0) & (out.pred == y)
