"""The papers' greedy procedure: train block 1 to completion, freeze it, then block 2 on its outputs,
and so on. Frozen outputs are cached (train.cache) so a block's epochs cost one block of compute,
not a forward through every block before it; with augmentation they are recomputed instead
(engine/frozen.py, note [cache or recompute]).

train.plateau_factor: Marquez et al.'s Algorithm 1 ("if validation error plateaus, lr <- lr/10"):
after each of its epochs a block's LR steps on its monitored loss (epoch_policy.monitored_loss).
"""
from __future__ import annotations

import torch

from ..data import batches, num_batches, resolve_augment
from ..engine.frozen import FrozenInputs, cache_mode
from ..engine.run import Run
from .. import modes
from .base import Trainer
from .epoch_policy import monitored_loss


class Sequential(modes.Sequential, Trainer):
    def train(self, run: Run, start_epoch: int = 0) -> None:
        cfg, stages = run.cfg, run.stages
        mode = cache_mode(cfg.train, cfg.data)
        inputs = FrozenInputs(run.data.train.x, run.device, move=lambda t: run.to_device(t)[0])  # the current block's
        done = 0  # epochs of all blocks so far: names the checkpoints
        for s in stages:
            self.watch(f"block{s.index}", s.optimizer, s.stepper.scheduler)
            for epoch in range(s.epochs):
                self.epoch(run, s, epoch, inputs)
                self.after_epoch(f"block{s.index}", lambda: monitored_loss(run, s, s.stats.epoch_train_loss()))
                s.end_epoch(step_scheduler=False)  # the epoch policy stepped the LR
                run.end_epoch(done, block=s.index)
                done += 1
            if s is not stages[-1]:
                path = run.out / "cache" / f"block{s.index}.npy" if run.out else None
                everyone = torch.arange(len(run.data.train))
                inputs = inputs.after(s, everyone, mode, path, cfg.data.eval_batch_size)
                if mode != "recompute":
                    run.recorder.log(kind="cache", block=s.index, where=mode, samples=len(everyone))

    def epoch(self, run: Run, s, epoch: int, inputs: FrozenInputs) -> None:
        """One epoch of block `s` on the frozen outputs of the blocks before it (cached or recomputed)."""
        cfg = run.cfg
        steps = num_batches(len(run.data.train), cfg.data.batch_size)
        with run.progress(steps, f"block {s.index} epoch {epoch + 1}/{s.epochs}") as bar:
            for b in batches(run.data.train, cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
                             augment=resolve_augment(cfg.data)):
                y = run.to_device(b.y)[0]
                _, res = s.train_step(inputs.batch(b.x, b.ids), y)
                run.log_step(epoch, s, res, y)
                bar.update()
