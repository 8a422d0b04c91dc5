"""`decoupled eval --run DIR`: re-score a finished run's checkpoints (every rank's): per-exit test
accuracy and the early-exit curve (exits.py), into its summary.json and exit_curve.png."""
from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint, summary as S
from .job import ConfigError, load
from .data import build_data
from .device import resolve_device
from .engine.build import build_rank_stages
from .engine.evaluate import evaluate


def evaluate_run(out: Path, thresholds=None, fallback: str | None = None) -> dict:
    if not (out / "config.toml").is_file():
        raise ConfigError(f"--run {out}: no config.toml there; is it a run directory?")
    cfg = load(out / "config.toml")
    device = resolve_device(cfg.train.device)
    data = build_data(cfg.data, cfg.train.seed)
    stages = build_rank_stages(cfg, data.input_shape, data.num_classes, device)
    found: dict[int, dict] = {}
    rank = 0
    while done := checkpoint.epochs(out, rank):  # a distributed run: one checkpoint series per rank
        for sd in checkpoint.load(checkpoint.path(out, rank, done[-1]), map_location=device)["stages"]:
            found[sd["index"]] = sd
        rank += 1
    missing = [s.index for s in stages if s.index not in found]
    if missing:
        raise ConfigError(f"--run {out}: no checkpoint of block(s) {missing} in {out / 'checkpoints'} "
                          "(trained with train.checkpoint=false?)")
    for s in stages:
        s.load_state_dict(found[s.index])
    ev = evaluate(stages, data.test, cfg.data.eval_batch_size, device)
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {"layers": [{} for _ in stages]}
    layers = summary["layers"]
    for layer, s, acc in zip(layers, stages, ev["layer_acc"]):
        layer.update(block=s.index, test_acc=acc)
    summary.update(ensemble_test_acc=ev["ensemble_acc"],
                   **S.exit_curve(cfg, stages, data.test, device, out, layers, thresholds, fallback))
    path.write_text(json.dumps(summary, indent=2))
    return summary
