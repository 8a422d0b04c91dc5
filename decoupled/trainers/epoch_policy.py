"""The epoch policy of a trainer: after each epoch of a watched optimizer (a block's, the e2e network's,
a commitment head's) the plateau rule or the LR schedule steps, and early stopping counts.

Early stopping and LR decay on a plateau of the monitored loss, as in the QuickNets appendix:
"reduce it by a factor of 0.5 on plateau with patience 1 ... training was stopped if the minimum
loss was not achieved for 3 consecutive epochs", the loss monitored once per epoch; and cascade
learning's rule (Marquez 2018, Algorithm 1: "if validation error plateaus, lr <- lr/10", factor 0.1).

The monitored loss is the validation cross-entropy of the block's head when data.val_fraction > 0
(evaluate.val_losses), else the epoch-mean training loss. Test data is never looked at."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import TrainConfig
from ..engine import evaluate


class EarlyStopping:
    """One watched optimizer: its plateau rule (train.plateau_factor < 1), else its LR schedule, and
    early stopping (train.patience; 0 = never)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, scheduler=None):
        self.patience = cfg.patience
        # torch's ReduceLROnPlateau (relative threshold 1e-4); None when plateau_factor = 1
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
            if cfg.plateau_factor < 1.0 else None)
        self.scheduler = scheduler
        self.best = math.inf
        self.bad_epochs = 0

    @property
    def watches(self) -> bool:
        """Whether a monitored loss is read at all (it may cost a validation pass)."""
        return self.plateau is not None or bool(self.patience)

    def step(self, loss: float) -> bool:
        """Record one epoch's monitored loss; True = stop training now."""
        if self.plateau is not None:
            self.plateau.step(loss)
        if loss < self.best:
            self.best, self.bad_epochs = loss, 0
        else:
            self.bad_epochs += 1
        return bool(self.patience) and self.bad_epochs >= self.patience

    def after_epoch(self, loss: Callable[[], float]) -> bool:
        """The epoch's end: the plateau rule owns the LR when on, else the schedule steps; True = stop."""
        if self.plateau is None and self.scheduler is not None:
            self.scheduler.step()
        return self.step(loss()) if self.watches else False

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs,
                "plateau": self.plateau.state_dict() if self.plateau is not None else None}

    def load_state_dict(self, sd: dict) -> None:
        self.best, self.bad_epochs = sd["best"], sd["bad_epochs"]
        if self.plateau is not None and sd.get("plateau"):
            self.plateau.load_state_dict(sd["plateau"])


def monitored_loss(run, stage, train_loss: float) -> float:
    """The loss early stopping and the plateau rule watch for `stage` after an epoch: its head's
    validation cross-entropy (through the blocks before it, eval mode) when a validation split
    exists, else `train_loss` (the epoch-mean training loss)."""
    if run.data.val is None:
        return train_loss
    with run.evaluating():
        losses = evaluate.val_losses(run.stages[: stage.index + 1], run.data.val, run.cfg.data.eval_batch_size,
                                     run.device)
    return losses[stage.index]
