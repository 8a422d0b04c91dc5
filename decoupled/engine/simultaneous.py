"""DGL in one process: at every step each block takes one optimizer step on the detached output of
the block before it, in order. This is the reference the distributed `sync` engine reproduces bit
for bit, so everything random here is per block (stage.rng) or per (seed, epoch) (the batches).

A block whose epoch budget is spent (cascade: layer l trains i0 + k*l epochs) is frozen: it still
forwards, in eval mode, so the blocks after it see fixed pseudo-inputs.
"""
from __future__ import annotations

from ..data import batches, num_batches
from .run import Run


def train_simultaneous(run: Run, start_epoch: int = 0) -> None:
    cfg, stages = run.cfg, run.stages
    total_epochs = max(s.epochs for s in stages)
    steps = num_batches(len(run.data.train), cfg.data.batch_size)
    for epoch in range(start_epoch, total_epochs):
        with run.progress(steps, f"epoch {epoch + 1}/{total_epochs}") as bar:
            for b in batches(run.data.train, cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
                             augment=cfg.data.augment):
                h, y = run.to_device(b.x, b.y)
                for s in stages:
                    if s.training:
                        h, res = s.train_step(h, y)
                        run.log_step(epoch, s, res, y)
                    else:
                        h = s.forward(h)
                        s.work["forward"] += len(y)  # frozen block: counted by flops.train_flops
                bar.update()
        for s in stages:
            if s.training:
                s.end_epoch()
        run.end_epoch(epoch)
