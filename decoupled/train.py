"""One training job: config -> data -> stages -> the mode's loop -> run directory.

The run directory holds config.toml (resolved), metrics.jsonl, checkpoints/ and summary.json.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .config import ConfigError, JobConfig, to_toml
from .data import build_data
from .engine.e2e import train_e2e
from .engine.run import Run
from .engine.sequential import train_sequential
from .engine.simultaneous import train_simultaneous
from .engine.stage import build_stages
from .metrics import PeakMemory, Recorder
from .models import ModelError

LOOPS = {"e2e": train_e2e, "sequential": train_sequential, "simultaneous": train_simultaneous}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA device is visible; use train.device='cpu' or 'auto'")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def default_out() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def train(cfg: JobConfig, out: Path) -> dict:
    t_start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise ConfigError(f"train.mode={cfg.train.mode!r} runs in one process but WORLD_SIZE={world}; "
                          "launch it without torchrun or with --nproc-per-node=1")
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, cfg.train.seed)
    try:
        stages = build_stages(cfg, data.input_shape, data.num_classes, device)
    except ModelError as e:
        raise ConfigError(str(e)) from None

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(cfg))
    (out / "metrics.jsonl").unlink(missing_ok=True)
    recorder = Recorder(out / "metrics.jsonl")
    run = Run(cfg, data, stages, device, out, recorder)
    memory = PeakMemory(device)  # after the model and data exist: measure what training costs

    t0 = time.perf_counter()
    LOOPS[cfg.train.mode](run)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0

    ev = run.evaluate()
    samples = sum(s.samples for s in stages) / len(stages)  # per block: network samples trained
    summary = {
        "mode": cfg.train.mode,
        "objective": cfg.objective.name,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "world_size": 1,
        "device": str(device),
        "wall_s": time.perf_counter() - t_start,
        "train_s": train_s,
        "layers": [{"block": s.index, "test_acc": acc, "train_samples": s.samples, "epochs": s.epochs_done,
                    "params": sum(p.numel() for p in s.parameters()), "out_shape": list(s.out_shape)}
                   for s, acc in zip(stages, ev["layer_acc"])],
        "ensemble_test_acc": ev["ensemble_acc"],
        "ranks": [{"rank": 0, "blocks": [s.index for s in stages], **memory.report(),
                   "samples_per_s": samples / train_s if train_s > 0 else 0.0,
                   "compute_s": sum(s.compute_s for s in stages)}],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    recorder.log(kind="summary", **{k: summary[k] for k in ("wall_s", "ensemble_test_acc")})
    recorder.close()
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['mode']} / {summary['objective']} / {summary['model']} on {summary['dataset']}: "
             f"{summary['wall_s']:.1f}s"]
    for layer in summary["layers"]:
        lines.append(f"  block {layer['block']}: test_acc {layer['test_acc']:.4f}  "
                     f"train_samples {layer['train_samples']}  epochs {layer['epochs']}")
    lines.append(f"  ensemble test_acc {summary['ensemble_test_acc']:.4f}")
    for r in summary["ranks"]:
        lines.append(f"  rank {r['rank']}: peak_mem {r['peak_mem_bytes'] / 2**20:.1f} MiB  "
                     f"{r['samples_per_s']:.0f} samples/s")
    return "\n".join(lines)
