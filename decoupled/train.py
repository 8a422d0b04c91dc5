"""One training job: config -> data -> stages -> the mode's loop -> run directory.

The run directory holds config.toml (resolved), metrics.jsonl, checkpoints/ and summary.json.
Single-process modes (e2e, sequential, simultaneous, quicknet) run here; sync and async run the same
stages on torchrun ranks through engine/pipeline.py. `evaluate_run` (decoupled eval) re-scores a
finished run's checkpoints: per-exit accuracy and the early-exit curve (exits.py).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from . import checkpoint, exits
from .config import DISTRIBUTED_MODES, ConfigError, JobConfig, load, to_toml
from .data import build_data
from .engine import distributed
from .engine.e2e import train_e2e
from .engine.evaluate import evaluate
from .engine.pipeline import Pipeline
from .engine.quicknet import train_quicknet
from .engine.run import Run
from .engine.sequential import train_sequential
from .engine.simultaneous import train_simultaneous
from .engine.stage import Stage, build_stages
from .engine.transport import Link
from .flops import inference_flops, train_flops
from .metrics import PeakMemory, Recorder
from .models import ModelError
from .objectives import OBJECTIVES

LOOPS = {"e2e": train_e2e, "sequential": train_sequential, "simultaneous": train_simultaneous,
         "quicknet": train_quicknet}
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


def block_budgets(cfg: JobConfig, num_blocks: int) -> list[int]:
    """Epochs each block trains (cascade: growing with depth); known to every rank without building heads."""
    cls = OBJECTIVES[cfg.objective.name]
    return [cls.epochs_for(cfg.objective, j, cfg.train) for j in range(num_blocks)]


@torch.no_grad()
def dry_run(stages: list[Stage], in_shape, device) -> list[tuple]:
    """Forward a 2-sample dummy batch through this rank's blocks (eval mode: no RNG draw, no BN
    update) and check every block's real output shape against the one it declared."""
    h = torch.zeros((2, *in_shape), device=device)
    shapes = [tuple(in_shape)]
    for s in stages:
        h = s.forward(h)
        if tuple(h.shape[1:]) != s.out_shape:
            raise ConfigError(f"block {s.index} produces {tuple(h.shape[1:])} but declares {s.out_shape}; "
                              "the model builder is inconsistent (model.name)")
        shapes.append(tuple(h.shape[1:]))
    return shapes


def handshake(verdicts: list[dict], rank: int) -> None:
    """Each rank's input shape must be its upstream neighbour's output shape."""
    if rank > 0:
        up, mine = verdicts[rank - 1]["shapes"][-1], verdicts[rank]["shapes"][0]
        if up != mine:
            raise ConfigError(f"rank {rank - 1} sends {up} but rank {rank} expects {mine}: the block split "
                              "does not chain (model.blocks / model.block_sizes / dist.placement)")


def cascade_handoffs(cfg: JobConfig, plan: list[list[int]], start: int) -> list[int | None]:
    """Per rank: the epoch whose upstream outputs it caches in async mode, or None.

    Every block upstream of rank r is frozen from epoch U_r = max budget of those blocks on; if
    epochs remain after U_r, rank r caches epoch U_r and its upstream neighbour stops after it.
    Sync mode recomputes instead: its results must equal the single-process trainer bit for bit."""
    budgets = block_budgets(cfg, sum(len(blocks) for blocks in plan))
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
             "epoch_samples": s.epoch_samples, "params": sum(p.numel() for p in s.parameters()),
             "out_shape": list(s.out_shape), **s.info} for s in stages]


def _costs(cfg: JobConfig, stages: list[Stage], layers: list[dict]) -> dict:
    """Training FLOPs per block and in total, inference FLOPs per exit (flops.py), into `layers`."""
    per_block = train_flops(stages, cfg.train.mode, len(stages), cfg.data.batch_size)
    per_exit = inference_flops(stages, [exits.uses_commitment(s) for s in stages], cfg.data.batch_size)
    for layer, t, i in zip(layers, per_block, per_exit):
        layer.update(train_flops=t, inference_flops=i)
    return {"train_flops": sum(per_block)}


def _exit_curve(cfg: JobConfig, stages: list[Stage], test, device, out: Path, layers: list[dict],
                thresholds=None, fallback: str | None = None) -> dict:
    thresholds = thresholds or (*exits.THRESHOLDS, cfg.objective.quicknet_threshold)
    fallback = fallback or cfg.objective.exit_fallback
    curve, per_exit = exits.report(stages, test, cfg.data.eval_batch_size, device, thresholds, fallback,
                                   [layer["test_acc"] for layer in layers], out / "exit_curve.png",
                                   f"{cfg.objective.name} / {cfg.model.name} on {cfg.data.name} (fallback: {fallback})",
                                   cfg.data.batch_size)
    for layer, flops in zip(layers, per_exit):
        layer["inference_flops"] = flops
    return {"exit_fallback": fallback, "exit_curve": curve}


def evaluate_run(out: Path, thresholds=None, fallback: str | None = None) -> dict:
    """`decoupled eval --run DIR`: load the run's config and final checkpoints (every rank's), score
    every exit on the test set, sweep the early-exit rule, update summary.json, plot the curve."""
    if not (out / "config.toml").is_file():
        raise ConfigError(f"--run {out}: no config.toml there; is it a run directory?")
    cfg = load(out / "config.toml")
    device = resolve_device(cfg.train.device)
    data = build_data(cfg.data, cfg.train.seed)
    stages = _stages(cfg, data.input_shape, data.num_classes, device)
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
                   **_exit_curve(cfg, stages, data.test, device, out, layers, thresholds, fallback))
    path.write_text(json.dumps(summary, indent=2))
    return summary


def _rank_report(rank: int, stages: list[Stage], memory: PeakMemory, train_s: float, extra: dict) -> dict:
    samples = sum(s.samples for s in stages) / len(stages)  # network samples its blocks trained on
    return {"rank": rank, "blocks": [s.index for s in stages], **memory.report(),
            "samples_per_s": samples / train_s if train_s > 0 else 0.0, "train_s": train_s,
            "compute_s": sum(s.compute_s for s in stages), **extra}


def _write_summary(cfg, out: Path, world_size: int, device, t_start: float, layers, ensemble, ranks,
                   **extra) -> dict:
    summary = {"mode": cfg.train.mode, "objective": cfg.objective.name, "model": cfg.model.name,
               "dataset": cfg.data.name, "run_dir": str(out), "world_size": world_size, "device": str(device),
               "wall_s": time.perf_counter() - t_start, "layers": layers, "ensemble_test_acc": ensemble,
               "ranks": ranks, **extra}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train(cfg: JobConfig, out: Path | None = None, resume: bool | str = False) -> dict | None:
    """Run the job in `out` (default runs/<timestamp>); returns the summary on rank 0, None on others.

    resume: True continues from the last epoch every rank completed (an error if there is none);
    "auto" does the same but starts afresh when there is no checkpoint yet (torchrun restarts)."""
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
    out = out or default_out()
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, cfg.train.seed)
    stages = _stages(cfg, data.input_shape, data.num_classes, device)
    _prepare_run_dir(cfg, out, resume)
    run = Run(cfg, data, stages, device, out, Recorder(out / "metrics.jsonl"))
    start = 0
    if resume:
        done = checkpoint.epochs(out, 0)
        if not done and resume != "auto":
            raise ConfigError(f"--resume {out}: no checkpoint to resume from in {out / 'checkpoints'}")
        if done:
            run.load_checkpoint(done[-1])
            start = done[-1] + 1
    memory = PeakMemory(device)  # after the model and data exist: measure what training costs

    t0 = time.perf_counter()
    LOOPS[cfg.train.mode](run, start)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0

    ev = run.evaluate()
    layers = _layers(stages, {s.index: a for s, a in zip(stages, ev["layer_acc"])})
    costs = _costs(cfg, stages, layers)
    if cfg.objective.name == "quicknet":  # the early-exit curve is what QuickNets are for
        costs.update(_exit_curve(cfg, stages, data.test, device, out, layers))
    summary = _write_summary(cfg, out, 1, device, t_start, layers, ev["ensemble_acc"],
                             [_rank_report(0, stages, memory, train_s, {})], **costs)
    run.recorder.log(kind="summary", wall_s=summary["wall_s"], ensemble_test_acc=summary["ensemble_test_acc"])
    run.recorder.close()
    return summary


def train_distributed(cfg: JobConfig, out: Path | None, resume: bool | str) -> dict | None:
    t_start = time.perf_counter()
    world = distributed.init(cfg)
    out = distributed.broadcast_from_0(out or default_out(), world)  # one run directory for all ranks
    summary = _train_rank(cfg, out, resume, world, t_start)
    # Only on success: after a failure the peers may be gone and a collective teardown could hang.
    distributed.shutdown()
    return summary


def _train_rank(cfg: JobConfig, out: Path, resume: bool, world: distributed.World, t_start: float):
    rank, device = world.rank, world.device
    torch.manual_seed(cfg.train.seed)
    # Only rank 0 reads the dataset; the others learn its shape from it (or its error).
    data, meta = None, None
    if rank == 0:
        try:
            data = build_data(cfg.data, cfg.train.seed)
            meta = (data.input_shape, data.num_classes, len(data.train), len(data.test))
        except (ConfigError, OSError) as e:
            meta = ConfigError(str(e))
    input_shape, num_classes, n_train, n_test = distributed.broadcast_from_0(meta, world)

    # Build, place and dry-run the blocks; every rank learns every rank's verdict before anyone
    # trains, so a rank that cannot start never leaves its peers waiting for it.
    plan: list[list[int]] = []

    def select(num_blocks: int) -> list[int]:
        plan.extend(distributed.placement(cfg, num_blocks, world.size))
        return plan[rank]

    with distributed.agreement(world, "setup") as verdict:
        stages = _stages(cfg, input_shape, num_classes, device, select)
        verdict.payload = {"shapes": dry_run(stages, input_shape if rank == 0 else stages[0].in_shape, device)}
        if rank == 0:  # only once everything can start; the others open it after this agreement
            _prepare_run_dir(cfg, out, resume)
    handshake(verdict.all, rank)

    epochs = max(block_budgets(cfg, sum(len(p) for p in plan)))
    run = Run(cfg, data, stages, device, out, Recorder(out / "metrics.jsonl"), rank=rank)
    start = 0
    if resume:  # the last epoch every rank completed
        with distributed.agreement(world, "resume") as verdict:
            verdict.payload = checkpoint.epochs(out, rank)
        common = set.intersection(*map(set, verdict.all))
        with distributed.agreement(world, "resume"):
            if not common and resume != "auto":
                raise ConfigError(f"--resume {out}: no epoch has a checkpoint on every rank ({verdict.all})")
            if common:
                run.load_checkpoint(max(common))
        start = max(common) + 1 if common else 0

    t = cfg.dist
    wire = max(cfg.data.batch_size, cfg.data.eval_batch_size)
    recv = Link(world.links[rank], rank - 1, device, t.timeout_s, wire, t.max_inflight) if rank > 0 else None
    send = (Link(world.links[rank + 1], rank + 1, device, t.timeout_s, wire, t.max_inflight)
            if rank < world.size - 1 else None)
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
    layers = _layers(stages, final["layer_acc"])
    _costs(cfg, stages, layers)  # this rank's FLOPs; exits' inference cost is cumulative below
    report = {"layers": layers, "ensemble": final.get("ensemble_acc"),
              "rank": _rank_report(rank, stages, memory, train_s, extra)}
    reports = distributed.gather_to_0(report, world)
    run.recorder.close()
    if rank != 0:
        return None
    layers, offset = [], 0.0
    for r in reports:  # a sample reaching an exit on rank r went through every earlier rank's blocks
        for layer in r["layers"]:
            layer["inference_flops"] += offset
        offset = r["layers"][-1]["inference_flops"]
        layers += r["layers"]
    return _write_summary(cfg, out, world.size, device, t_start, layers, reports[-1]["ensemble"],
                          [r["rank"] for r in reports], placement=plan, backend=world.backend,
                          train_flops=sum(layer["train_flops"] for layer in layers))


def format_summary(summary: dict) -> str:
    lines = [f"{summary['mode']} / {summary['objective']} / {summary['model']} on {summary['dataset']}, "
             f"{summary['world_size']} rank(s): {summary['wall_s']:.1f}s"]
    for layer in summary["layers"]:
        lines.append(f"  block {layer['block']}: test_acc {layer['test_acc']:.4f}  "
                     f"train_samples {layer['train_samples']}  epochs {layer['epochs']}")
    lines.append(f"  ensemble test_acc {summary['ensemble_test_acc']:.4f}")
    if "train_flops" in summary:
        lines.append(f"  train FLOPs {summary['train_flops']:.4g}")
    for r in summary.get("exit_curve", []):
        lines.append(f"  early exit t={r['threshold']:g}: test_acc {r['accuracy']:.4f}  "
                     f"{r['avg_flops'] / 1e6:.4f} MFLOPs/sample  exits {[round(f, 3) for f in r['exit_fraction']]}")
    for r in summary["ranks"]:
        line = (f"  rank {r['rank']} (blocks {r['blocks']}): peak_mem {r['peak_mem_bytes'] / 2**20:.1f} MiB  "
                f"{r['samples_per_s']:.0f} samples/s")
        if "comm_s" in r:
            line += f"  compute {r['compute_s']:.2f}s  comm {r['comm_s']:.2f}s  idle {r['idle_s']:.2f}s"
        lines.append(line)
    return "\n".join(lines)
