"""Worker of `decoupled bench` (a fresh process): each rank's blocks alone, exactly the
`Stage.train_step` the engine runs, on that rank's inputs computed once (eval mode, like the
sequential cache). Gives t_k per rank and so the pipeline bound.

    python -m decoupled.bench.stages CONFIG.toml RANKS OUT.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..config import load
from .runner import median


def time_stages(cfg_path: str, ranks: int, out: str) -> None:
    """Worker (fresh process): each rank's blocks alone, exactly the `Stage.train_step` the engine
    runs, on that rank's inputs computed once (eval mode, like the sequential cache)."""
    import torch

    from ..data import Split, batches, build_data, resolve_augment
    from ..device import resolve_device, synchronize
    from ..engine.dist.setup import placement
    from ..engine.stage import build_stages
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


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m decoupled.bench.stages CONFIG.toml RANKS OUT.json (use `decoupled bench`)")
    time_stages(sys.argv[1], int(sys.argv[2]), sys.argv[3])
