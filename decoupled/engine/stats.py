"""What one stage has done: its epochs, batches, optimizer steps and samples, other training work by
kind, the time in its train steps, and its current epoch's mean loss. The summary, the metrics, the
FLOP count and the checkpoints read these."""
from __future__ import annotations

from collections import Counter

import torch

from ..device import StepTimer


class StageStats:
    def __init__(self, device: torch.device):
        self.timer = StepTimer(device)  # the stage's train steps (CUDA events on GPU: the work, not its launch)
        self.epochs_done = 0
        self.steps = 0  # batches trained on
        self.updates = 0  # optimizer steps (fewer than batches with replicas)
        self.samples = 0  # samples this block actually trained on
        self.epoch_samples: list[int] = []  # of those, per epoch (end_epoch)
        # samples of other training work by kind (frozen forwards, commitment steps...), for
        # flops.train_flops; `info`: facts a trainer reports in summary.json layers[]
        self.work: Counter[str] = Counter()
        self.info: dict = {}
        self._loss_sum = torch.zeros((), device=device)  # this epoch's summed training loss (plateau rule)
        self._loss_n = 0

    @property
    def compute_s(self) -> float:
        """Seconds in this stage's train steps."""
        return self.timer.seconds

    def count(self, n: int, loss: torch.Tensor) -> None:
        """A trained batch of `n` samples (those its mask kept) with mean loss `loss`."""
        self.steps += 1
        self.samples += n
        self._loss_sum += loss.detach().float() * n
        self._loss_n += n

    def epoch_train_loss(self) -> float:
        """The mean training loss of this block's current epoch (reset by end_epoch)."""
        return float(self._loss_sum) / max(self._loss_n, 1)

    def end_epoch(self) -> None:
        self._loss_sum.zero_()
        self._loss_n = 0
        self.epoch_samples.append(self.samples - sum(self.epoch_samples))
        self.epochs_done += 1

    def state_dict(self) -> dict:
        return {"epochs_done": self.epochs_done, "steps": self.steps, "updates": self.updates,
                "samples": self.samples, "epoch_samples": list(self.epoch_samples), "work": dict(self.work)}

    def load_state_dict(self, sd: dict) -> None:
        self.epochs_done, self.steps, self.samples = sd["epochs_done"], sd["steps"], sd["samples"]
        self.updates, self.epoch_samples, self.work = sd["updates"], list(sd["epoch_samples"]), Counter(sd["work"])
