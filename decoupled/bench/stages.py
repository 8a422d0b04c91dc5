"""Worker of `decoupled bench` (a fresh process): each rank's blocks alone, exactly the
`Stage.train_step` the engine runs, on that rank's inputs computed once (eval mode, like the
sequential cache). Gives t_k per rank and so the pipeline bound.

It also times every block's share of the e2e network (forward + backward of the block, input
gradient included; the last block adds its head and the cross-entropy: plan/measure.e2e_step), the
mean seconds per batch over an epoch, into OUT's folder as e2e_block_costs.json: the pipeline
baselines (gpipe, 1f1b) split on these (plan/model.best_split).

    python -m decoupled.bench.stages CONFIG.toml RANKS OUT.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..job import load
from .runner import median


def time_stages(cfg_path: str, ranks: int, out: str) -> None:
    """Worker (fresh process): each rank's blocks alone, exactly the `Stage.train_step` the engine
    runs, on that rank's inputs computed once (eval mode, like the sequential cache)."""
    import torch

    from ..data import Split, batches, build_data, resolve_augment
    from ..device import resolve_device, synchronize
    from ..engine.ranks.placement import placement
    from ..engine.build import build_stages
    cfg = load(cfg_path)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, cfg.train.seed)
    stages = build_stages(cfg, data.input_shape, data.num_classes, device)
    x, y = data.train.x.to(device), data.train.y.to(device)
    res = []
    for r, group in enumerate(placement(cfg, len(stages), ranks)):
        mine = [stages[j] for j in group]
        times = []
        for epoch in range(cfg.train.epochs):
            t0 = time.perf_counter()
            for b in batches(Split(x, y), cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
                             augment=resolve_augment(cfg.data) if r == 0 else None):
                h = b.x
                for s in mine:
                    h, _ = s.train_step(h, b.y)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        res.append({"rank": r, "blocks": group, "epoch_s": median(times[1:]), "epochs": times})
        with torch.no_grad():  # the next rank's inputs
            outs = []
            for i in range(0, len(x), cfg.data.eval_batch_size):
                h = x[i:i + cfg.data.eval_batch_size]
                for s in mine:
                    h = s.forward(h)
                outs.append(h)
            x = torch.cat(outs)
    Path(out).write_text(json.dumps(res, indent=2))
    costs = time_e2e_blocks(cfg, stages, data, device)
    (Path(out).parent / "e2e_block_costs.json").write_text(json.dumps(costs))


def time_e2e_blocks(cfg, stages, data, device) -> list[float]:
    """Seconds per batch (the mean over an epoch) of each block's forward + backward inside end-to-end
    backprop (plan/measure.e2e_step), on inputs computed once by the blocks before it. One warm-up
    batch per block."""
    import torch

    from ..data import Split, batches
    from ..device import synchronize
    from ..plan.measure import e2e_step
    x, y = data.train.x.to(device), data.train.y.to(device)
    costs = []
    for s in stages:
        s.block.train()
        s.objective.train()
        step = e2e_step(s, s is stages[-1])
        with s.rng:  # dropout draws from the stage's stream; its training RNG is not touched
            bs = cfg.data.batch_size
            step(x[:bs], y[:bs])  # warm-up
            synchronize(device)
            t0, n = time.perf_counter(), 0
            for b in batches(Split(x, y), bs, seed=cfg.train.seed, epoch=0):
                step(b.x, b.y)
                n += 1
            synchronize(device)
        costs.append((time.perf_counter() - t0) / n)
        s.block.zero_grad(set_to_none=True)
        s.objective.zero_grad(set_to_none=True)
        with torch.no_grad():  # the next block's inputs
            x = torch.cat([s.decode(s.forward(x[i:i + cfg.data.eval_batch_size]))
                           for i in range(0, len(x), cfg.data.eval_batch_size)])
    return costs


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m decoupled.bench.stages CONFIG.toml RANKS OUT.json (use `decoupled bench`)")
    time_stages(sys.argv[1], int(sys.argv[2]), sys.argv[3])
