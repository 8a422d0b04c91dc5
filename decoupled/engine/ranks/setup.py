"""Everything a rank does before it trains: agree on the data, place and build its blocks, dry-run
them, check that the ranks chain, agree on a resume point, open its links and make its pipeline.

Every phase ends in an agreement (world.py): a rank that cannot start makes every rank exit with
its message, and nobody trains unless all can.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ...job import ConfigError, JobConfig, plugin_code
from ...data import Data, build_data, resolve_augment
from ...metrics import Recorder
from ...objectives import objective_spec
from ...plugins import check_same_code
from ..frozen import cache_mode
from ..run import Run, prepare_run_dir
from ..build import build_rank_stages
from ..stage import Stage
from ..stepping import AllReduce
from ..wire import CODECS
from . import world as W
from .feed import AsyncFeed, SyncFeed
from .groups import Layout, batches_per_epoch
from .pipeline import Pipeline
from .placement import BlockCosts, layout, link_s_per_byte, measure_allreduce, measure_blocks
from .sources import DatasetSource, HandoffCache, HandoffFeed
from .transport import Link

Feed = type[SyncFeed] | type[AsyncFeed]


def block_budgets(cfg: JobConfig, num_blocks: int) -> list[int]:
    """Epochs each block trains (cascade: growing with depth); known to every rank without building heads."""
    spec = objective_spec(cfg.objective.name)
    return [spec.epochs_for(cfg.objective, j, cfg.train) for j in range(num_blocks)]


@torch.no_grad()
def dry_run(stages: list[Stage], in_shape, device) -> list[tuple]:
    """Forward a 2-sample dummy batch through this rank's blocks (eval mode: no RNG draw, no BN
    update) and check every block's real output shape against the one it declared."""
    h = torch.zeros((2, *in_shape), device=device)
    shapes = [tuple(in_shape)]
    for s in stages:
        h = s.features(h)  # before the wire: a scaled code's rows are flat (engine/wire.py)
        if tuple(h.shape[1:]) != s.out_shape:
            raise ConfigError(f"block {s.index} produces {tuple(h.shape[1:])} but declares {s.out_shape}; "
                              "the model builder is inconsistent (model.name)")
        shapes.append(tuple(h.shape[1:]))
    return shapes


def handshake(verdicts: list[dict], group: int) -> None:
    """Each stage group's input shape must be its upstream neighbour's output shape (`verdicts`: one
    per group, from its first rank)."""
    if group > 0:
        up, mine = verdicts[group - 1]["shapes"][-1], verdicts[group]["shapes"][0]
        if up != mine:
            raise ConfigError(f"stage group {group - 1} sends {up} but group {group} expects {mine}: the block "
                              "split does not chain (model.blocks / model.block_sizes / dist.placement)")


def cascade_handoffs(cfg: JobConfig, plan: list[list[int]], start: int, feed: Feed) -> list[int | None]:
    """Per stage group: the epoch whose upstream outputs it caches (async), or None.

    Every block upstream of rank r is frozen from epoch U_r = max budget of those blocks on; if
    epochs remain after U_r, rank r caches epoch U_r and its upstream neighbour stops after it.
    Sync (a lockstep feed) recomputes instead: its results must equal the single-process trainer bit
    for bit. So does budget.OwnSteps: there a block's epochs are its own steps, not the stream's, so
    "frozen from epoch U_r" is not known in advance; the frozen upstream ranks keep streaming
    (forward only) until every rank has made its budget."""
    budgets = block_budgets(cfg, sum(len(blocks) for blocks in plan))
    last = max(budgets) - 1
    out: list[int | None] = [None]
    handoff = (not feed.lockstep and feed.budget_for(cfg.replay).follows_stream
               and cache_mode(cfg.train, cfg.data) != "recompute")
    for r in range(1, len(plan)):
        frozen_from = max(max(budgets[: plan[r][0]]), start)
        use = handoff and frozen_from < last
        out.append(frozen_from if use else None)
    return out


@dataclass
class RankSetup:
    run: Run
    pipeline: Pipeline
    layout: Layout  # the stage groups: blocks and ranks of each
    predicted_stage_s: list[float] | None = None  # dist.placement/replicas "auto": each group's predicted s/epoch

    @property
    def plan(self) -> list[list[int]]:
        return self.layout.blocks


def _measure(cfg: JobConfig, world: W.World, input_shape, num_classes: int) -> BlockCosts | None:
    """dist.placement or dist.replicas "auto": rank 0 times every block's training step (and measures
    its memory) on its device, and with dist.replicas="auto" every rank times an all-reduce of the
    model's gradient bytes on the job's backend; every rank gets the numbers. None otherwise."""
    if "auto" not in (cfg.dist.placement, cfg.dist.replicas):
        return None
    with W.agreement(world, "placement") as verdict:
        if world.rank == 0:
            verdict.payload = measure_blocks(cfg, input_shape, num_classes, world.device)
    costs = verdict.all[0]
    if cfg.dist.replicas == "auto":
        with W.agreement(world, "placement") as verdict:
            verdict.payload = measure_allreduce(sum(costs.grad_bytes), world.device, world.size)
        costs.comm_latency_s = max(v[0] for v in verdict.all)
        costs.comm_s_per_byte = max(v[1] for v in verdict.all)
    return costs


def _print_plan(cfg: JobConfig, lay: Layout, predicted: list[float], costs: BlockCosts, steps: int) -> None:
    """The measured layout, with each group's predicted seconds per epoch and the throughput bound."""
    mib = [round(costs.group_mem(g) / 2**20, 1) for g in lay.blocks]
    # one write per line (as live.py): under PYTHONUNBUFFERED a print is two writes another rank can split
    sys.stdout.write(f"decoupled: dist.placement={cfg.dist.placement} dist.replicas={cfg.dist.replicas}: blocks per "
                     f"group {[len(g) for g in lay.blocks]} ({lay.blocks}), ranks per group {lay.replicas}; predicted "
                     f"s/epoch per group {[round(t, 3) for t in predicted]}, bound "
                     f"{steps * cfg.data.batch_size / max(predicted):.0f} samples/s; measured MiB per rank {mib}\n")
    sys.stdout.flush()


def _data(cfg: JobConfig, world: W.World) -> tuple[Data | None, tuple]:
    """Only rank 0 reads the dataset; the others learn its shape and class sizes from it (or its error)."""
    data, meta = None, None
    if world.rank == 0:
        try:
            data = build_data(cfg.data, cfg.train.seed)
            meta = (data.input_shape, data.num_classes, len(data.train), len(data.test), data.class_counts,
                    len(data.val) if data.val is not None else 0)
        except (ConfigError, OSError) as e:
            meta = ConfigError(str(e))
    # Loading a large dataset takes as long as it takes (minutes for ImageNet-sized folders): the
    # others wait on the deadline-free group; a rank 0 that dies makes torchrun end the job.
    return data, W.broadcast_from_0(meta, world, group=world.patient)


def _resume_epoch(run: Run, world: W.World, resume: bool | str, out: Path) -> int:
    """The newest epoch every rank can resume after (0 = start afresh): each rank has its checkpoint,
    or is frozen by then (Checkpointer.usable_for), and every one of those files loads. A file that
    does not load is reported by name and the next older epoch is tried."""
    ck = run.checkpointer
    with W.agreement(world, "resume") as verdict:
        verdict.payload = ck.epochs()
    candidates = sorted(set().union(*map(set, verdict.all)), reverse=True)
    for epoch in candidates:
        with W.agreement(world, "resume") as verdict:
            mine = ck.usable_for(epoch, run.frozen_after)
            state, why = ck.try_load(mine, map_location=run.device) if mine is not None else (None, None)
            if why:
                print(f"decoupled: rank {run.rank}: {why}; trying an older epoch", file=sys.stderr, flush=True)
            verdict.payload = state is not None
        if all(verdict.all):
            run.load_state(state)
            return epoch + 1
    if resume != "auto":
        raise ConfigError(f"--resume {out}: no epoch has a loadable checkpoint on every rank "
                          f"(checkpoints per rank: {verdict.all if not candidates else 'see the messages above'})")
    return 0


def _build(cfg: JobConfig, world: W.World, meta: tuple, costs: BlockCosts | None, out: Path, resume):
    """Place, build and dry-run this rank's blocks; every rank learns every rank's verdict before anyone
    trains, so a rank that cannot start never leaves its peers waiting for it."""
    rank = world.rank
    input_shape, num_classes, _, _, class_counts, _ = meta
    found: list[Layout] = []

    def select(num_blocks: int) -> list[int]:
        found.append(layout(cfg.dist, num_blocks, world.size, costs))
        return found[0].blocks[found[0].group_of(rank)]

    def replication(num_blocks: int):
        return found[0].block_replicas(), found[0].replica_of(rank)

    with W.agreement(world, "setup") as verdict:
        stages = build_rank_stages(cfg, input_shape, num_classes, world.device, select, replication, class_counts)
        lay = found[0]
        first = lay.group_of(rank) == 0
        verdict.payload = {"shapes": dry_run(stages, input_shape if first else stages[0].in_shape, world.device)}
        if rank == 0:  # only once everything can start; the others open it after this agreement
            prepare_run_dir(cfg, out, resume)
    handshake([verdict.all[lay.ranks(g)[0]] for g in range(len(lay.replicas))], lay.group_of(rank))
    return stages, lay


def to_cpu(obj):
    """A state dict with every tensor on the host (so it pickles the same from any device)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _align_replicas(stages: list[Stage], world: W.World, lay: Layout) -> None:
    """Async resume: the replicas of a group each checkpointed when their own buffers finished the
    epoch, possibly a step apart; all continue from replica 0's state (each keeps its RNG slot)."""
    first = lay.ranks(lay.group_of(world.rank))[0]
    box = [[to_cpu(s.state_dict()) for s in stages] if world.rank == first else None]
    dist.broadcast_object_list(box, src=first, group=world.replica_group)
    for s, sd in zip(stages, box[0]):
        sd.update(rng=s.rng.state_dict(), rng_slots={k: r.state_dict() for k, r in s.rngs.items()})
        s.load_state_dict(sd)


def setup_rank(cfg: JobConfig, out: Path, resume: bool | str, world: W.World, feed: Feed) -> RankSetup:
    """`feed`: SyncFeed or AsyncFeed, the trainer's choice of order (feed.py)."""
    rank, device = world.rank, world.device
    with W.agreement(world, "plug-in code") as verdict:  # Note [plug-ins validated at load]
        verdict.payload = plugin_code(cfg)
    check_same_code(verdict.all)
    torch.manual_seed(cfg.train.seed)
    data, meta = _data(cfg, world)
    input_shape, num_classes, n_train, n_test, _, n_val = meta
    costs = _measure(cfg, world, input_shape, num_classes)
    stages, lay = _build(cfg, world, meta, costs, out, resume)
    group, replicas = lay.group_of(rank), lay.replicas[lay.group_of(rank)]
    if lay.replicas[0] > 1:  # every replica of the source group reads the dataset (seeded: the same)
        with W.agreement(world, "data"):
            if group == 0 and data is None:
                data = build_data(cfg.data, cfg.train.seed)
    steps = -(-n_train // cfg.data.batch_size)  # source batches per epoch
    split = cfg.dist.replica_batch == "split"  # Note [split replicas]: every replica takes every batch
    rounds = batches_per_epoch(steps, replicas, split)
    if split and cfg.dist.sync_bn and 0 < n_train % cfg.data.batch_size < max(lay.replicas):
        raise ConfigError(f"dist.sync_bn=true with dist.replica_batch='split': an epoch's last batch of "
                          f"{n_train % cfg.data.batch_size} rows leaves a replica of dist.replicas={lay.replicas} "
                          "without rows, which would skip SyncBatchNorm's collectives; choose data.batch_size / "
                          "data.limit_train so the last batch has a row for every replica")
    if cfg.dist.sync_bn and feed.lockstep and not split and any(steps % r for r in lay.replicas):
        raise ConfigError(f"dist.sync_bn=true with dist.replicas={lay.replicas}: an epoch of {steps} batches does "
                          "not divide by every group's replicas, and a replica padding the last round would skip "
                          "SyncBatchNorm's collectives; choose data.batch_size / data.limit_train so it divides")
    if cfg.train.eval_every_steps and max(lay.replicas) > 1 and not split:
        # a group's replicas all-reduce every round of R batches: an evaluation inside a round would hold
        # one replica in the round's all-reduce while the other evaluates first (and downstream waits on both).
        # Split replicas close a round with every batch (Note [split replicas]): no evaluation falls inside one
        raise ConfigError(f"train.eval_every_steps={cfg.train.eval_every_steps} with stage groups of several ranks "
                          f"(dist.replicas {lay.replicas}) taking alternate batches: an evaluation between an "
                          "epoch's batches would split a round the replicas all-reduce together; use "
                          "dist.replica_batch='split' (a round per batch), one rank per group (dist.replicas=[]) "
                          "or train.eval_every_steps=0")
    world.connect(lay)
    for s in stages:
        if isinstance(s.stepper, AllReduce):
            # lockstep: the group's rounds per epoch; async epochs end by step count, without padding
            s.join(world.replica_group, cfg.dist.sync_bn, rounds if feed.lockstep else None)
    predicted = None
    if costs is not None:  # each group's predicted seconds per epoch (the model's are per batch)
        costs = dataclasses.replace(costs, split=split, link_s_per_byte=link_s_per_byte(cfg.dist))
        predicted = [costs.stage_s(g, r) * steps for g, r in zip(lay.blocks, lay.replicas)]
        if rank == 0:
            _print_plan(cfg, lay, predicted, costs, steps)

    run = Run(cfg, data, stages, device, out, Recorder(out / "metrics.jsonl"), rank=rank,
              distributed=True)
    start = _resume_epoch(run, world, resume, out) if resume else 0
    if start and not feed.lockstep and world.replica_group is not None:
        _align_replicas(stages, world, lay)
    pipe = _pipeline(run, world, lay, feed, start, steps, (n_train, n_test, num_classes, n_val))
    return RankSetup(run, pipe, lay, predicted)


def _pipeline(run: Run, world: W.World, lay: Layout, feed: Feed, start: int, steps: int, sizes: tuple) -> Pipeline:
    """This rank's links, budget and feed (the dataset, upstream's stream, or that and then the
    cascade hand-off's cache), and the pipeline over them."""
    cfg, rank, device = run.cfg, world.rank, world.device
    group, replica, replicas = lay.group_of(rank), lay.replica_of(rank), lay.replicas[lay.group_of(rank)]
    t = cfg.dist
    wire = max(cfg.data.batch_size, cfg.data.eval_batch_size)
    recv = [Link(world.recv_groups[u], u, device, t.timeout_s, wire, t.max_inflight) for u in lay.upstream(rank)]
    send = [Link(world.send_groups[d], d, device, t.timeout_s, wire, t.max_inflight) for d in lay.downstream(rank)]
    epochs = max(block_budgets(cfg, sum(len(p) for p in lay.blocks)))
    handoffs = cascade_handoffs(cfg, lay.blocks, start, feed)  # per group (never with replicas: config rules)
    stop_after = handoffs[group + 1] if group + 1 < len(lay.blocks) else None  # downstream caches ours by then
    last = epochs - 1 if stop_after is None else stop_after
    rounds = batches_per_epoch(steps, replicas, cfg.dist.replica_batch == "split")
    budget = feed.budget_for(cfg.replay).start(last, rounds, world.board)
    index = functools.partial(feed.batch_index, source_steps=steps)
    if not recv:  # the source group reads the dataset
        d = run.data
        source = DatasetSource(run, d.train, d.test, start, last, augment=resolve_augment(cfg.data),
                               more=budget.more, share=(replica, replicas), batch_index=feed.batch_index, val=d.val)
        return Pipeline(run, source, budget, epochs, recv, send, index, start, (replica, replicas))
    handoff = None
    if handoffs[group] is not None:
        handoff = HandoffCache(run, handoffs[group], cache_mode(cfg.train, cfg.data), *sizes,
                               in_shape=run.stages[0].in_shape)
    r = cfg.replay
    if not feed.lockstep and r.capacity_mb:  # note [replay bound]: a buffer that could hold no batch
        rows = math.prod(run.stages[0].in_shape)
        one = cfg.data.batch_size * (CODECS[cfg.dist.wire_dtype].row_bytes(rows) + 16)  # labels and ids: 16
        if one > r.capacity_mb * 2**20:
            raise ConfigError(f"replay.capacity_mb={r.capacity_mb:g} holds no batch of rank {rank}'s link: one takes "
                              f"{one / 2**20:.3f} MiB (data.batch_size={cfg.data.batch_size} rows of activations in "
                              f"dist.wire_dtype={cfg.dist.wire_dtype!r}'s form, labels, ids); raise replay.capacity_mb "
                              "above it, or bound the buffer in batches (replay.capacity)")
    upstream = feed(recv, rank, cfg.dist, cfg.replay, cfg.train.seed, (replica, replicas), steps,
                    tap=handoff.offer if handoff else None)
    source = HandoffFeed(upstream, handoff, last, budget.more) if handoff else upstream
    return Pipeline(run, source, budget, epochs, recv, send, index, start, (replica, replicas))
