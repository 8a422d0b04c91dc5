"""Nokland & Eidnes 2019 "predsim", the local loss Ma et al. 2020 train with:
(1 - beta) * cross-entropy(prediction) + beta * MSE(similarity(features), similarity(one-hot labels))."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError, knob
from .base import Objective, ObjectiveConfig, masked_mean


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the samples of a batch. Conv features are first reduced to the
    per-channel standard deviation over space, as in the reference implementation."""
    if x.dim() == 4 and x.size(1) > 3 and x.size(2) * x.size(3) > 1:
        x = x.flatten(2).std(dim=2)
    x = x.flatten(1)
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.norm(dim=1, keepdim=True))
    return (xn @ xn.t()).clamp(-1, 1)


class PredSim(Objective):
    @dataclass
    class Config(ObjectiveConfig):
        name: str = "predsim"
        predsim_beta: float = knob(0.99, ge=0.0, le=1.0)  # weight of the similarity-matching term
        default_head = "predsim"

        def check(self) -> None:
            if self.head not in ("", "predsim"):  # the similarity branch is the predsim head's
                raise ConfigError(f"objective.head={self.head!r} does not fit objective.name={self.name!r}: only "
                                  "predsim has (and needs) the similarity branch; leave objective.head empty")

    def loss(self, h, logits, y, mask):
        pred_loss = masked_mean(F.cross_entropy(logits, y, reduction="none"), mask)
        if mask is not None:
            keep = mask.bool()  # a 0/1 float or int mask must select samples, not index rows 0 and 1
            h, y = h[keep], y[keep]
            if len(y) == 0:  # nothing kept: no similarity term (an empty MSE is NaN)
                return (1 - self.cfg.predsim_beta) * pred_loss
        onehot = F.one_hot(y, self.num_classes).to(h.dtype)
        sim_loss = F.mse_loss(similarity_matrix(self.head.sim(h)), similarity_matrix(onehot))
        beta = self.cfg.predsim_beta
        return (1 - beta) * pred_loss + beta * sim_loss
