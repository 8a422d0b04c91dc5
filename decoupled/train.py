"""One training job: config -> data -> stages -> the mode's loop -> run directory.

The run directory holds config.toml (resolved), metrics.jsonl, checkpoints/ and summary.json.
Single-process modes (e2e, sequential, simultaneous, quicknet) run their loop (engine/loops/) here;
sync and async run the same stages on torchrun ranks (engine/ranks/).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from . import exits, summary as S
from .config import DISTRIBUTED_MODES, ConfigError, JobConfig
from .data import build_data
from .device import resolve_device, synchronize
from .engine.ranks import world as W
from .engine.ranks.feed import AsyncFeed, SyncFeed
from .engine.ranks.placement import reference_replication
from .engine.ranks.setup import build_rank_stages, setup_rank
from .engine.evaluate import evaluate
from .engine.loops import LOOPS
from .engine.run import Run, prepare_run_dir
from .metrics import PeakMemory, Recorder

RESUMABLE = ("simultaneous", "sync", "async")


def default_out() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def train(cfg: JobConfig, out: Path | None = None, resume: bool | str = False) -> dict | None:
    """Run the job in `out` (default runs/<timestamp>); returns the summary on rank 0, None on others.

    resume: True continues from the last epoch every rank completed (an error if there is none);
    "auto" does the same but starts afresh when there is no checkpoint yet (torchrun restarts)."""
    from .live import require_tensorboard
    require_tensorboard(cfg)  # before anything trains
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
    replication = reference_replication(cfg.dist) if cfg.train.mode == "simultaneous" else None
    stages = build_rank_stages(cfg, data.input_shape, data.num_classes, device,
                               replication=replication, class_counts=data.class_counts)
    prepare_run_dir(cfg, out, resume)
    run = Run(cfg, data, stages, device, out, Recorder(out / "metrics.jsonl"))
    start = 0
    if resume:
        start = _resume_single(run, resume, out)
    memory = PeakMemory(device)  # after the model and data exist: measure what training costs
    run.live.memory = memory

    run.live.start(stages)
    t0 = time.perf_counter()
    LOOPS[cfg.train.mode](run, start)
    synchronize(device)
    train_s = time.perf_counter() - t0

    ev = run.evaluate()
    val_acc = None
    if data.val is not None:  # reported only: no decision is taken on it after training
        vev = evaluate(stages, data.val, cfg.data.eval_batch_size, device)
        val_acc = {s.index: a for s, a in zip(stages, vev["layer_acc"])}
    layers = S.layers(stages, {s.index: a for s, a in zip(stages, ev["layer_acc"])}, val_acc)
    costs = S.costs(cfg, stages, layers)
    if exits.wanted(cfg):
        costs.update(S.exit_curve(cfg, stages, data.test, device, out, layers))
    summary = S.write(cfg, out, 1, device, t_start, layers, ev["ensemble_acc"],
                      [S.rank_report(0, stages, memory, train_s, {})], **costs)
    run.recorder.log(kind="summary", wall_s=summary["wall_s"], ensemble_test_acc=summary["ensemble_test_acc"])
    run.recorder.close()
    run.live.close()
    return summary


def _resume_single(run: Run, resume: bool | str, out: Path) -> int:
    """The newest checkpoint that loads; one that does not is reported by name and skipped."""
    for epoch in reversed(run.checkpointer.epochs()):
        state, why = run.checkpointer.try_load(epoch, map_location=run.device)
        if state is not None:
            run.load_state(state)
            return epoch + 1
        print(f"decoupled: {why}; trying an older epoch", file=sys.stderr, flush=True)
    if resume != "auto":
        raise ConfigError(f"--resume {out}: no checkpoint to resume from in {out / 'checkpoints'}")
    return 0


def train_distributed(cfg: JobConfig, out: Path | None, resume: bool | str) -> dict | None:
    t_start = time.perf_counter()
    world = W.init(cfg)
    out = W.broadcast_from_0(out or default_out(), world)  # one run directory for all ranks
    summary = _train_rank(cfg, out, resume, world, t_start)
    # Only on success: after a failure the peers may be gone and a collective teardown could hang.
    W.shutdown()
    return summary


def _train_rank(cfg: JobConfig, out: Path, resume: bool | str, world: W.World, t_start: float) -> dict | None:
    setup = setup_rank(cfg, out, resume, world, AsyncFeed if cfg.train.mode == "async" else SyncFeed)
    run, pipe = setup.run, setup.pipeline
    memory = PeakMemory(world.device)
    run.live.memory = memory

    run.live.start(run.stages)
    t0 = time.perf_counter()
    pipe.run_loop()
    synchronize(world.device)
    train_s = time.perf_counter() - t0

    final = pipe.results[max(pipe.results)]
    extra = pipe.rank_metrics()
    if pipe.buffer is not None:
        extra["replay"] = pipe.buffer.stats.as_dict()
    layers = S.layers(run.stages, final["layer_acc"])
    S.costs(cfg, run.stages, layers)  # this rank's FLOPs; exits' inference cost is cumulative below
    lay = setup.layout
    extra.update(stage=lay.group_of(world.rank), replica=lay.replica_of(world.rank),
                 params_sha=S.params_sha(run.stages))
    report = {"layers": layers, "ensemble": final.get("ensemble_acc"), "tested": final["n"],
              "correct": final["correct"], "ensemble_correct": final.get("ensemble_correct"),
              "rank": S.rank_report(world.rank, run.stages, memory, train_s, extra)}
    S.save_rank_report(out, world.rank, report)  # kept even if the final exchange never happens
    # the early-exit curve: this rank's exits' answers in the final evaluation, and its blocks' costs
    exit_part = ((pipe.tally.last_exits, exits.block_costs(run.stages, cfg.data.batch_size))
                 if exits.wanted(cfg) else None)
    gathered = W.gather_to_0((report, exit_part), world, group=world.patient)
    run.recorder.close()
    run.live.close()
    if world.rank != 0:
        return None
    reports = [r for r, _ in gathered]
    groups = [[reports[r] for r in lay.ranks(g)] for g in range(len(lay.replicas))]
    layers = S.merge_rank_layers(groups)
    curve = S.joined_exit_fields(cfg, [p for _, p in gathered], out, layers) if exits.wanted(cfg) else {}
    sink = groups[-1]  # each replica of the last group scored the ensemble on its share of the test set
    ensemble = sum(r["ensemble_correct"] for r in sink) / max(sum(r["tested"] for r in sink), 1)
    return S.write(cfg, out, world.size, world.device, t_start, layers, ensemble,
                   [r["rank"] for r in reports], placement=setup.plan, replicas=lay.replicas, backend=world.backend,
                   **({"predicted_stage_s": setup.predicted_stage_s} if setup.predicted_stage_s else {}),
                   train_flops=sum(layer["train_flops"] for layer in layers), **curve)
