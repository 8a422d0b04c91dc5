"""One training job: config -> data -> stages -> the mode's loop -> run directory.

The run directory holds config.toml (resolved), metrics.jsonl, checkpoints/ and summary.json.
Single-process modes (e2e, sequential, simultaneous) run here; sync and async run the same stages
on torchrun ranks through engine/pipeline.py.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from . import checkpoint
from .config import DISTRIBUTED_MODES, ConfigError, JobConfig, to_toml
from .data import build_data
from .engine import distributed
from .engine.e2e import train_e2e
from .engine.pipeline import Pipeline
from .engine.run import Run
from .engine.sequential import train_sequential
from .engine.simultaneous import train_simultaneous
from .engine.stage import Stage, build_stages
from .engine.transport import Link
from .metrics import PeakMemory, Recorder
from .models import ModelError
from .objectives import OBJECTIVES

LOOPS = {"e2e": train_e2e, "sequential": train_sequential, "simultaneous": train_simultaneous}
RESUMABLE = ("simultaneous", "sync", "async")


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


def total_epochs(cfg: JobConfig, num_blocks: int) -> int:
    cls = OBJECTIVES[cfg.objective.name]
    return max(cls.epochs_for(cfg.objective, j, cfg.train) for j in range(num_blocks))


def cascade_handoffs(cfg: JobConfig, plan: list[list[int]], start: int) -> list[int | None]:
    """Per rank: the epoch whose upstream outputs it caches in async mode, or None.

    Every block upstream of rank r is frozen from epoch U_r = max budget of those blocks on; if
    epochs remain after U_r, rank r caches epoch U_r and its upstream neighbour stops after it.
    Sync mode recomputes instead: its results must equal the single-process trainer bit for bit."""
    cls = OBJECTIVES[cfg.objective.name]
    budgets = [cls.epochs_for(cfg.objective, j, cfg.train) for blocks in plan for j in blocks]
    last = max(budgets) - 1
    out: list[int | None] = [None]
    for r in range(1, len(plan)):
        frozen_from = max(max(budgets[: plan[r][0]]), start)
        use = cfg.train.mode == "async" and cfg.train.cache != "recompute" and frozen_from < last
        out.append(frozen_from if use else None)
    return out


def _stages(cfg, input_shape, num_classes, device, select=None) -> list[Stage]:
    try:
        return build_stages(cfg, input_shape, num_classes, device, select)
    except ModelError as e:  # a model that cannot be built is a config error, raised before training
        raise ConfigError(str(e)) from None


def _prepare_run_dir(cfg: JobConfig, out: Path, resume: bool) -> None:
    """Once per job (rank 0): the resolved config, and a fresh metrics.jsonl unless resuming."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(cfg))
    if not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)


def _layers(stages: list[Stage], layer_acc: dict[int, float]) -> list[dict]:
    return [{"block": s.index, "test_acc": layer_acc[s.index], "train_samples": s.samples, "epochs": s.epochs_done,
             "params": sum(p.numel() for p in s.parameters()), "out_shape": list(s.out_shape)} for s in stages]


def _rank_report(rank: int, stages: list[Stage], memory: PeakMemory, train_s: float, extra: dict) -> dict:
    samples = sum(s.samples for s in stages) / len(stages)  # network samples its blocks trained on
    return {"rank": rank, "blocks": [s.index for s in stages], **memory.report(),
            "samples_per_s": samples / train_s if train_s > 0 else 0.0, "train_s": train_s,
            "compute_s": sum(s.compute_s for s in stages), **extra}


def _write_summary(cfg, out: Path, world_size: int, device, t_start: float, layers, ensemble, ranks,
                   **extra) -> dict:
    summary = {"mode": cfg.train.mode, "objective": cfg.objective.name, "model": cfg.model.name,
               "dataset": cfg.data.name, "world_size": world_size, "device": str(device),
               "wall_s": time.perf_counter() - t_start, "layers": layers, "ensemble_test_acc": ensemble,
               "ranks": ranks, **extra}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train(cfg: JobConfig, out: Path, resume: bool = False) -> dict | None:
    """Run the job; returns the summary (on rank 0; None on other ranks)."""
    if resume and cfg.train.mode not in RESUMABLE:
        raise ConfigError(f"--resume supports train.mode in {RESUMABLE}, not {cfg.train.mode!r}")
    if cfg.train.mode in DISTRIBUTED_MODES:
        return train_distributed(cfg, out, resume)
    t_start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise ConfigError(f"train.mode={cfg.train.mode!r} runs in one process but WORLD_SIZE={world}; "
                          "use train.mode='sync' or 'async' for several ranks, or --nproc-per-node=1")
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, cfg.train.seed)
    stages = _stages(cfg, data.input_shape, data.num_classes, device)
    _prepare_run_dir(cfg, out, resume)
    run = Run(cfg, data, stages, device, out, Recorder(out / "metrics.jsonl"))
    start = 0
    if resume:
        done = checkpoint.epochs(out, 0)
        if not done:
            raise ConfigError(f"--resume {out}: no checkpoint to resume from in {out / 'checkpoints'}")
        run.load_checkpoint(done[-1])
        start = done[-1] + 1
    memory = PeakMemory(device)  # after the model and data exist: measure what training costs

    t0 = time.perf_counter()
    LOOPS[cfg.train.mode](run, start)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0

    ev = run.evaluate()
    summary = _write_summary(cfg, out, 1, device, t_start,
                             _layers(stages, {s.index: a for s, a in zip(stages, ev["layer_acc"])}),
                             ev["ensemble_acc"], [_rank_report(0, stages, memory, train_s, {})])
    run.recorder.log(kind="summary", wall_s=summary["wall_s"], ensemble_test_acc=summary["ensemble_test_acc"])
    run.recorder.close()
    return summary


def train_distributed(cfg: JobConfig, out: Path, resume: bool) -> dict | None:
    t_start = time.perf_counter()
    world = distributed.init(cfg)
    try:
        return _train_rank(cfg, out, resume, world, t_start)
    finally:
        distributed.shutdown()


def _train_rank(cfg: JobConfig, out: Path, resume: bool, world: distributed.World, t_start: float):
    rank, device = world.rank, world.device
    torch.manual_seed(cfg.train.seed)
    # Only rank 0 reads the dataset; the others learn its shape from it (or its error).
    data, meta = None, None
    if rank == 0:
        _prepare_run_dir(cfg, out, resume)  # before the broadcast below, which the others wait on
        try:
            data = build_data(cfg.data, cfg.train.seed)
            meta = (data.input_shape, data.num_classes, len(data.train), len(data.test))
        except ConfigError as e:
            meta = e
    input_shape, num_classes, n_train, n_test = distributed.broadcast_from_0(meta, world)

    plan: list[list[int]] = []

    def select(num_blocks: int) -> list[int]:
        plan.extend(distributed.placement(cfg, num_blocks, world.size))
        return plan[rank]

    stages = _stages(cfg, input_shape, num_classes, device, select)
    epochs = total_epochs(cfg, sum(len(p) for p in plan))
    run = Run(cfg, data, stages, device, out, Recorder(out / "metrics.jsonl"), rank=rank)
    start = 0
    if resume:  # the last epoch every rank completed
        have = distributed.all_gather(checkpoint.epochs(out, rank), world)
        common = set.intersection(*map(set, have))
        if not common:
            raise ConfigError(f"--resume {out}: no epoch has a checkpoint on every rank ({have})")
        run.load_checkpoint(max(common))
        start = max(common) + 1

    t = cfg.dist
    recv = Link(world.links[rank], rank - 1, device, t.timeout_s, t.max_inflight) if rank > 0 else None
    send = Link(world.links[rank + 1], rank + 1, device, t.timeout_s, t.max_inflight) if rank < world.size - 1 else None
    handoff = cascade_handoffs(cfg, plan, start)
    pipe = Pipeline(run, world.size, epochs, recv, send, start_epoch=start, cache_epoch=handoff[rank],
                    stop_after=handoff[rank + 1] if rank + 1 < world.size else None,
                    sizes=(n_train, n_test, num_classes))
    memory = PeakMemory(device)

    t0 = time.perf_counter()
    pipe.run_loop()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0

    final = pipe.results[max(pipe.results)]
    extra = pipe.rank_metrics()
    if pipe.buffer is not None:
        extra["replay"] = pipe.buffer.stats.as_dict()
    report = {"layers": _layers(stages, final["layer_acc"]), "ensemble": final.get("ensemble_acc"),
              "rank": _rank_report(rank, stages, memory, train_s, extra)}
    reports = distributed.gather_to_0(report, world)
    run.recorder.close()
    if rank != 0:
        return None
    layers = [layer for r in reports for layer in r["layers"]]
    return _write_summary(cfg, out, world.size, device, t_start, layers, reports[-1]["ensemble"],
                          [r["rank"] for r in reports], placement=plan, backend=world.backend)


def format_summary(summary: dict) -> str:
    lines = [f"{summary['mode']} / {summary['objective']} / {summary['model']} on {summary['dataset']}, "
             f"{summary['world_size']} rank(s): {summary['wall_s']:.1f}s"]
    for layer in summary["layers"]:
        lines.append(f"  block {layer['block']}: test_acc {layer['test_acc']:.4f}  "
                     f"train_samples {layer['train_samples']}  epochs {layer['epochs']}")
    lines.append(f"  ensemble test_acc {summary['ensemble_test_acc']:.4f}")
    for r in summary["ranks"]:
        line = (f"  rank {r['rank']} (blocks {r['blocks']}): peak_mem {r['peak_mem_bytes'] / 2**20:.1f} MiB  "
                f"{r['samples_per_s']:.0f} samples/s")
        if "comm_s" in r:
            line += f"  compute {r['compute_s']:.2f}s  comm {r['comm_s']:.2f}s  idle {r['idle_s']:.2f}s"
        lines.append(line)
    return "\n".join(lines)
