"""The papers' greedy procedure: train block 1 to completion, freeze it, then block 2 on its outputs,
and so on. Frozen outputs are cached (train.cache) so a block's epochs cost one block of compute,
not a forward through every block before it; with augmentation they are recomputed instead.

train.plateau_factor: Marquez et al.'s Algorithm 1 ("if validation error plateaus, lr <- lr/10"):
after each of its epochs a block's LR steps on its monitored loss (early_stop.monitored_loss).
"""
from __future__ import annotations

from ...data import batches, num_batches, resolve_augment
from ..cache import PseudoInputs, cache_mode
from ..early_stop import monitored_loss
from ..run import Run


def train_sequential(run: Run, start_epoch: int = 0) -> None:
    cfg, stages = run.cfg, run.stages
    mode = cache_mode(run.cfg)
    steps = num_batches(len(run.data.train), cfg.data.batch_size)
    cache: PseudoInputs | None = None  # inputs of the current block; None = raw data
    done = 0  # epochs of all blocks so far: names the checkpoints
    for s in stages:
        for epoch in range(s.epochs):
            with run.progress(steps, f"block {s.index} epoch {epoch + 1}/{s.epochs}") as bar:
                for b in batches(run.data.train, cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
                                 augment=resolve_augment(cfg.data)):
                    y = run.to_device(b.y)[0]
                    if cache is not None:
                        x = cache.get(b.ids)
                    else:
                        x = run.to_device(b.x)[0]
                        for frozen in stages[: s.index]:
                            x = frozen.forward(x)
                            frozen.work["forward"] += len(y)  # counted by flops.train_flops
                    _, res = s.train_step(x, y)
                    run.log_step(epoch, s, res, y)
                    bar.update()
            if s.plateau is not None:
                s.plateau.step(monitored_loss(run, s, s.epoch_train_loss()))
            s.end_epoch()
            run.end_epoch(done, block=s.index)
            done += 1
        if mode != "recompute" and s is not stages[-1]:
            path = run.out / "cache" / f"block{s.index}.npy" if run.out else None
            source = cache if cache is not None else run.data.train.x
            cache = PseudoInputs.compute(s, source, cfg.data.eval_batch_size, mode, path, run.device)
            s.work["forward"] += len(cache)
            run.recorder.log(kind="cache", block=s.index, where=mode, samples=len(cache))
