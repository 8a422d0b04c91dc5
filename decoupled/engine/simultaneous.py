"""DGL in one process: at every step each block takes one optimizer step on the detached output of
the block before it, in order. This is the reference the distributed `sync` engine reproduces bit
for bit, so everything random here is per block (stage.rng) or per (seed, epoch) (the batches).

A block whose epoch budget is spent (cascade: layer l trains i0 + k*l epochs) is frozen: it still
forwards, in eval mode, so the blocks after it see fixed pseudo-inputs.
"""
from __future__ import annotations

from functools import partial

from ..data import batches, num_batches
from .run import Run


def drain(stages, flow: list, log) -> list:
    """Epoch end with routing: each block in turn takes what the block before it drained, then
    trains on its own remainder. Returns what the last block passes on."""
    for s in stages:
        flow = [out for item in flow for out in s.feed(*item, log)] + list(s.drain(log))
    return flow


def train_simultaneous(run: Run, start_epoch: int = 0) -> None:
    cfg, stages = run.cfg, run.stages
    total_epochs = max(s.epochs for s in stages)
    steps = num_batches(len(run.data.train), cfg.data.batch_size)
    for epoch in range(start_epoch, total_epochs):
        with run.progress(steps, f"epoch {epoch + 1}/{total_epochs}") as bar:
            for b in batches(run.data.train, cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
                             augment=cfg.data.augment):
                log = partial(run.log_step, epoch)
                flow = [tuple(run.to_device(b.x, b.y, b.ids))]
                for s in stages:  # each block passes on what it does not route away
                    flow = [out for item in flow for out in s.feed(*item, log)]
                bar.update()
        drain(stages, [], partial(run.log_step, epoch))
        for s in stages:
            if s.training:
                s.end_epoch()
        run.end_epoch(epoch)
