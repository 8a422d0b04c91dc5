"""Which consecutive blocks each stage group holds, and how many ranks hold each group
(groups.py): dist.placement and dist.replicas as given, an even split with one rank per group, or
("auto") the layout whose slowest group is fastest, from every block's training step measured at
start-up. The cost model and the measurements are decoupled/plan's (model.py: BlockCosts and the
layout searches; measure.py), shared with the bench's pipeline split and `decoupled plan`; this module
feeds them the job: its config, its stages, its backend's all-reduce and the wire's message size.

With dist.link_mbps (the link between stage groups) each stage's time is the slower of its compute
and its send of the cut's output (Note [link-aware stages], plan/model.py), so on a slow link the
search cuts where the messages are smallest. It assumes one core (or device) per rank: on an
oversubscribed machine the measured times exceed it.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from ...config import ConfigError, DistConfig
from ...config.schema import split_layout_check
from ...job import JobConfig
from ...plan.measure import measure_allreduce as _time_allreduce, measure_blocks as _time_blocks
from ...plan.model import BlockCosts, best_layout, best_replicas, best_split, groups_of, split_layout
from ..build import build_stages
from ..wire import CODECS
from .groups import Layout
from .transport import message_bytes

MiB = 2 ** 20

__all__ = ["BlockCosts", "best_layout", "best_replicas", "best_split", "split_layout", "layout", "link_s_per_byte",
           "placement", "measure_blocks", "measure_allreduce", "reference_replication"]


def link_s_per_byte(d: DistConfig) -> float:
    """dist.link_mbps (Mbit/s) as seconds per byte; 0: no link known."""
    return 8 / (d.link_mbps * 1e6) if d.link_mbps else 0.0


def placement(cfg: JobConfig, num_blocks: int, world: int, costs: list[float] | None = None,
              mem: list[float] | None = None) -> list[list[int]]:
    """Consecutive blocks per rank, one rank per group whatever dist.replicas says (the bench's
    pipelines and per-rank stage timings): see `layout`."""
    measured = BlockCosts(costs, mem or [0.0] * num_blocks, [0.0] * num_blocks) if costs is not None else None
    lay = layout(dataclasses.replace(cfg.dist, replicas=[]), num_blocks, world, measured)
    return [lay.blocks[lay.group_of(r)] for r in range(world)]


def layout(d: DistConfig, num_blocks: int, world: int, costs: BlockCosts | None = None) -> Layout:
    """The stage groups: dist.placement (blocks per group) and dist.replicas (ranks per group) as given,
    "auto" from measured `costs`, else an even split with one rank per group (earlier groups take the
    remainder). Raises ConfigError before anything trains."""
    cap = d.max_stage_mem_mb * MiB
    replicas = d.replicas
    split = d.replica_batch == "split"
    if costs is not None:
        costs = dataclasses.replace(costs, split=split, link_s_per_byte=link_s_per_byte(d))
    if replicas == "auto":
        if split:  # Note [split replicas]: only layouts whose neighbouring groups may exchange rows
            fixed = None if d.placement == "auto" else _given(d.placement, num_blocks, None)
            return _make(*split_layout(costs, num_blocks, world, cap, fixed))
        if d.placement == "auto":
            counts, replicas = best_layout(costs, num_blocks, world, cap)
            return _make(counts, replicas)
        counts = _given(d.placement, num_blocks, None)
        return _make(counts, best_replicas(costs, groups_of(counts), world))
    replicas = list(replicas) or [1] * world
    if split:
        split_layout_check(replicas)
    if sum(replicas) != world:
        raise ConfigError(f"dist.replicas={replicas} holds {sum(replicas)} ranks but the world has {world}; "
                          f"make the counts sum to {world} (--nproc-per-node x nodes) or launch {sum(replicas)} ranks")
    groups = len(replicas)
    if groups > num_blocks:
        raise ConfigError(f"world size {world} > {num_blocks} blocks: every rank needs a block; launch at most "
                          f"{num_blocks} ranks (--nproc-per-node) or split the model finer (model.blocks)"
                          if groups == world else
                          f"dist.replicas={replicas} asks for {groups} stage groups but the model has {num_blocks} "
                          "blocks; use fewer groups or split the model finer (model.blocks)")
    if d.placement == "auto":
        counts = best_split(costs.step_s, groups, costs.group_mem if cap else None, cap, replicas,
                            lambda i, g: costs.transfer_s([i], replicas[g], sum(replicas[:g])))
    elif d.placement:
        counts = _given(d.placement, num_blocks, groups)
    else:
        q, r = divmod(num_blocks, groups)
        counts = [q + (i < r) for i in range(groups)]
    return _make(counts, replicas)


def _given(counts, num_blocks: int, groups: int | None) -> list[int]:
    counts = list(counts)
    if (groups is not None and len(counts) != groups) or sum(counts) != num_blocks:
        what = f"one block count per stage group ({groups} groups)" if groups is not None else "block counts"
        raise ConfigError(f"dist.placement={counts} must list {what} summing to the {num_blocks} blocks")
    return counts


def _make(counts: list[int], replicas: list[int]) -> Layout:
    return Layout(groups_of(counts), list(replicas))


def measure_blocks(cfg: JobConfig, input_shape, num_classes: int, device: torch.device,
                   steps: int = 3) -> BlockCosts:
    """Every block's training step on a batch of the real input shape, on this device, on a throwaway
    copy of the blocks (plan/measure.measure_blocks), and the message each block's output makes on
    the wire at data.batch_size in dist.wire_dtype's form (transport.message_bytes)."""
    stages = build_stages(cfg, input_shape, num_classes, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((cfg.data.batch_size, *input_shape), generator=g).to(device)
    y = torch.randint(0, num_classes, (cfg.data.batch_size,), generator=g).to(device)
    costs = _time_blocks(stages, x, y, device, steps)
    codec = CODECS[cfg.dist.wire_dtype]
    costs.out_bytes = [float(message_bytes(cfg.data.batch_size, codec.row_bytes(math.prod(s.out_shape))))
                       for s in stages]
    return costs


def measure_allreduce(nbytes: float, device: torch.device, world: int, steps: int = 5) -> tuple[float, float]:
    """(latency s, s per byte) of an all-reduce on the job's default process group (every rank calls it)."""
    return _time_allreduce(dist.all_reduce, nbytes, device, world, steps)


def reference_replication(d: DistConfig):
    """The simultaneous trainer with dist.replicas (the reference of sync with replicas): build_stages'
    `replication`, the blocks of each group accumulating as many batches per step as the group has
    replicas (stepping.Accumulate). None without replicas."""
    if not any(r > 1 for r in d.replicas):
        return None
    return lambda n: (layout(d, n, sum(d.replicas)).block_replicas(), None)
