"""Early stopping and LR decay on a plateau of the training loss, as in the QuickNets appendix:
"reduce it by a factor of 0.5 on plateau with patience 1 ... training was stopped if the minimum
loss was not achieved for 3 consecutive epochs", the loss monitored once per epoch."""
from __future__ import annotations

import math

import torch

from ..config import TrainConfig


class EarlyStopping:
    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.patience = cfg.patience
        # torch's ReduceLROnPlateau (relative threshold 1e-4); None when plateau_factor = 1
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
            if cfg.plateau_factor < 1.0 else None)
        self.best = math.inf
        self.bad_epochs = 0

    def step(self, loss: float) -> bool:
        """Record one epoch's mean training loss; True = stop training now."""
        if self.plateau is not None:
            self.plateau.step(loss)
        if loss < self.best:
            self.best, self.bad_epochs = loss, 0
        else:
            self.bad_epochs += 1
        return bool(self.patience) and self.bad_epochs >= self.patience
