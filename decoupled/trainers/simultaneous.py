"""DGL in one process: at every step each block takes one optimizer step on the detached output of
the block before it, in order. This is the reference the distributed `sync` engine reproduces bit
for bit, so everything random here is per block (stage.rng) or per (seed, epoch) (the batches).

train.plateau_factor (cascade's /10 rule): after every epoch each training block's LR steps on its
monitored loss (its head's validation cross-entropy, one eval pass of the validation split through
all blocks; or its epoch-mean training loss). Not in sync/async (config rules).

A block whose epoch budget is spent (cascade: layer l trains i0 + k*l epochs) is frozen: it still
forwards, in eval mode, so the blocks after it see fixed pseudo-inputs.
"""
from __future__ import annotations

from functools import cache, partial

from ..data import batches, num_batches, resolve_augment
from ..engine.evaluate import val_losses
from ..engine.run import Run
from ..engine.ranks.placement import reference_replication
from ..engine.flow import drain_chain, feed_chain
from .. import modes
from .base import Trainer


class Simultaneous(modes.Simultaneous, Trainer):
    def replication(self):
        return reference_replication(self.cfg.dist)  # dist.replicas: this process plays every replica's slot

    def train(self, run: Run, start_epoch: int = 0) -> None:
        cfg, stages = run.cfg, run.stages
        for s in stages:
            self.watch(f"block{s.index}", s.optimizer, s.stepper.scheduler)
        total_epochs = max(s.epochs for s in stages)
        steps = num_batches(len(run.data.train), cfg.data.batch_size)
        for epoch in range(start_epoch, total_epochs):
            with run.progress(steps, f"epoch {epoch + 1}/{total_epochs}") as bar:
                for b in batches(run.data.train, cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
                                 augment=resolve_augment(cfg.data)):
                    log = partial(run.log_step, epoch)
                    feed_chain(stages, [tuple(run.to_device(b.x, b.y, b.ids))], log)
                    run.after_source_step(epoch, epoch * steps + b.step + 1)  # train.eval_every_steps
                    bar.update()
            drain_chain(stages, partial(run.log_step, epoch))
            training = [s for s in stages if s.training]
            val = cache(lambda: _val_losses(run))  # one pass for every block, if a rule reads it
            for s in training:
                self.after_epoch(f"block{s.index}", partial(_monitored, val, s))
            for s in training:
                s.end_epoch(step_scheduler=False)  # the epoch policy stepped the LR
            run.end_epoch(epoch)


def _monitored(val, s) -> float:
    return val().get(s.index, s.stats.epoch_train_loss())


def _val_losses(run) -> dict:
    """Every block's validation loss in one pass ({} without a validation split), as an evaluation."""
    if run.data.val is None:
        return {}
    with run.evaluating():
        return val_losses(run.stages, run.data.val, run.cfg.data.eval_batch_size, run.device)
