"""Which consecutive blocks each stage group holds, and how many ranks hold each group
(groups.py): dist.placement and dist.replicas as given, an even split with one rank per group, or
("auto") the layout whose slowest group is fastest, from every block's training step measured at
start-up. The same split search gives the pipeline baselines of `decoupled bench` their own best split.

The cost model: each replica of a group of blocks B held by R ranks takes every R-th batch, so per
batch of the source it needs (sum(step_s[B]) + allreduce(B)) / R seconds, where allreduce(B) is 0
for R = 1 and otherwise |B| x latency (each block's step all-reduces on its own) + 2 (R-1)/R x
bytes(B) x seconds per byte (a ring all-reduce moves that much per rank), both measured on the job's
own backend at start-up. With dist.replica_batch="split" (Note [split replicas], groups.py) every
replica takes 1/R of every batch's rows and all-reduces after each: sum(step_s[B]) / R + allreduce(B)
(compute taken as proportional to rows), and only layouts whose neighbouring groups hold equal
replica counts, or one of them a single rank, are searched. It assumes one core (or
device) per rank: on an oversubscribed machine the measured times exceed it.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...config import ConfigError, DistConfig
from ...config.schema import split_layout_check
from ...job import JobConfig
from ...device import synchronize
from ..build import build_stages
from .groups import Layout

MiB = 2 ** 20


@dataclass
class BlockCosts:
    """Measured at start-up (measure_blocks), per block; `comm_s_per_byte` from measure_allreduce."""
    step_s: list[float]  # one training step of one batch
    mem: list[float]  # bytes a rank holding the block needs
    grad_bytes: list[float]  # what a replica all-reduces per step
    comm_s_per_byte: float = 0.0
    comm_latency_s: float = 0.0  # one all-reduce of a single element
    split: bool = False  # dist.replica_batch="split": replicas split every batch (Note [split replicas])

    def group_s(self, blocks: range | list[int], replicas: int) -> float:
        """Seconds per batch of the source, for the group of `blocks` held by `replicas` ranks."""
        t = sum(self.step_s[j] for j in blocks)
        comm = 0.0
        if replicas > 1:
            nbytes = sum(self.grad_bytes[j] for j in blocks)
            comm = len(blocks) * self.comm_latency_s + 2 * (replicas - 1) / replicas * nbytes * self.comm_s_per_byte
        return t / replicas + comm if self.split else (t + comm) / replicas


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
        costs = dataclasses.replace(costs, split=split)
    if replicas == "auto":
        if split:  # Note [split replicas]: only layouts whose neighbouring groups may exchange rows
            fixed = None if d.placement == "auto" else _given(d.placement, num_blocks, None)
            return _make(*split_layout(costs, num_blocks, world, cap, fixed))
        if d.placement == "auto":
            counts, replicas = best_layout(costs, num_blocks, world, cap)
            return _make(counts, replicas)
        counts = _given(d.placement, num_blocks, None)
        return _make(counts, best_replicas(costs, _groups(counts), world))
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
        counts = best_split(costs.step_s, groups, costs.mem if cap else None, cap, replicas)
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


def _groups(counts: list[int]) -> list[list[int]]:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [list(range(s, s + c)) for s, c in zip(starts, counts)]


def _make(counts: list[int], replicas: list[int]) -> Layout:
    return Layout(_groups(counts), list(replicas))


def measure_blocks(cfg: JobConfig, input_shape, num_classes: int, device: torch.device,
                   steps: int = 3) -> BlockCosts:
    """Every block's training step (forward, local backward, head, optimizer: Stage.train_step) on a
    batch of the real input shape, on this device: seconds (median of `steps` after one warm-up) and
    bytes (parameters, gradients and optimizer state, plus the activations the step saves for its
    backward). On a throwaway copy of the blocks: the training run's weights are untouched."""
    stages = build_stages(cfg, input_shape, num_classes, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((cfg.data.batch_size, *input_shape), generator=g).to(device)
    y = torch.randint(0, num_classes, (cfg.data.batch_size,), generator=g).to(device)
    costs, mem, grads = [], [], []
    for s in stages:
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        times = []
        for _ in range(steps + 1):
            saved[0] = 0
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                h, _ = s.train_step(x, y)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        state = sum(p.numel() * p.element_size() for p in s.parameters()) * 2  # weights and gradients
        state += sum(t.numel() * t.element_size() for st in s.optimizer.state.values()
                     for t in st.values() if torch.is_tensor(t))
        costs.append(sorted(times[1:])[len(times[1:]) // 2])
        mem.append(float(state + saved[0]))
        grads.append(float(sum(p.numel() * p.element_size() for p in s.local_parameters())))
        x = s.decode(h)
    return BlockCosts(costs, mem, grads)


def measure_allreduce(nbytes: float, device: torch.device, world: int, steps: int = 5) -> tuple[float, float]:
    """(latency s, s per byte) of an all-reduce on the job's default process group (every rank calls
    it): one of a single element, then one of `nbytes`, which a ring moves 2 (W-1)/W x per rank."""
    if world < 2 or nbytes <= 0:
        return 0.0, 0.0

    def timed(numel: int) -> float:
        buf, times = torch.zeros(numel, device=device), []
        for _ in range(steps + 1):
            synchronize(device)
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[len(times[1:]) // 2]

    latency, full = timed(1), timed(max(1, int(nbytes) // 4))
    return latency, max(full - latency, 0.0) / (2 * (world - 1) / world * nbytes)


def best_split(costs: list[float], k: int, mem: list[float] | None = None, cap: float = 0.0,
               replicas: list[int] | None = None) -> list[int]:
    """Blocks per group (like dist.placement) of the contiguous split of `costs` into `k` non-empty
    groups whose largest summed cost is smallest; with `mem` and `cap`, only splits whose every group
    sums to at most `cap` bytes; with `replicas`, group g's cost is divided by replicas[g].
    Exact (dynamic programming, O(k n^2)); among equal maxima the split
    with the earliest, then smallest, first groups wins, so the answer is deterministic."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} blocks into {k} non-empty groups")
    prefix, mprefix = [0.0], [0.0]
    for c, m in zip(costs, mem or [0.0] * n):
        prefix.append(prefix[-1] + float(c))
        mprefix.append(mprefix[-1] + float(m))
    inf = float("inf")
    # best[g][i]: the smallest largest-group cost of the first i blocks in g groups; cut: where group g starts
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for i in range(g, n - (k - g) + 1):
            for j in range(g - 1, i):  # the g-th group is blocks j..i-1
                if mem is not None and mprefix[i] - mprefix[j] > cap:
                    continue  # would not fit in dist.max_stage_mem_mb
                v = max(best[g - 1][j], (prefix[i] - prefix[j]) / (replicas[g - 1] if replicas else 1))
                if v < best[g][i] - 1e-12 * max(1.0, abs(v)):
                    best[g][i], cut[g][i] = v, j
    if best[k][n] == inf:
        raise ConfigError(f"dist.max_stage_mem_mb={cap / MiB:g}: no split of the {n} blocks over {k} ranks fits "
                          f"(blocks need {[round(m / MiB, 1) for m in mem]} MiB); raise the cap or add ranks")
    sizes, i = [], n
    for g in range(k, 0, -1):
        j = cut[g][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def best_replicas(costs: BlockCosts, groups: list[list[int]], world: int) -> list[int]:
    """Ranks per group for a fixed split: one each, then every spare rank to the group that is slowest
    at that moment (optimal for the slowest group, as each group's time falls with its ranks)."""
    if world < len(groups):
        raise ConfigError(f"dist.placement has {len(groups)} stage groups but the world has {world} ranks; "
                          "every group needs a rank")
    reps = [1] * len(groups)
    for _ in range(world - len(groups)):
        g = max(range(len(groups)), key=lambda i: (costs.group_s(groups[i], reps[i]), -i))
        reps[g] += 1
    return reps


def best_layout(costs: BlockCosts, n: int, world: int, cap: float = 0.0) -> tuple[list[int], list[int]]:
    """dist.placement="auto" with dist.replicas="auto": the contiguous groups and their rank counts
    (summing to `world`) whose slowest group (BlockCosts.group_s) is fastest, each group within
    `cap` bytes when given. Exact dynamic programming over (blocks, ranks); ties go to the layout
    found first (smaller last groups, fewer replicas: an all-reduce is a
    synchronisation the pipeline does not need)."""
    inf = float("inf")
    # best[i][r]: the smallest slowest-group time of the first i blocks on r ranks; how[i][r]: (j, rr)
    best = [[inf] * (world + 1) for _ in range(n + 1)]
    how = [[(0, 0)] * (world + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for i in range(1, n + 1):
        for r in range(1, world + 1):
            for j in range(i - 1, -1, -1):  # the smallest last group first: ties keep the pipeline
                if cap and sum(costs.mem[j:i]) > cap:
                    continue
                for rr in range(1, r + 1):
                    v = max(best[j][r - rr], costs.group_s(range(j, i), rr))
                    if v < best[i][r] - 1e-12 * max(1.0, abs(v)):
                        best[i][r], how[i][r] = v, (j, rr)
    if best[n][world] == inf:
        raise ConfigError(f"dist.max_stage_mem_mb={cap / MiB:g}: no layout of the {n} blocks on {world} ranks fits "
                          f"(blocks need {[round(m / MiB, 1) for m in costs.mem]} MiB); raise the cap")
    counts, reps, i, r = [], [], n, world
    while i > 0:
        j, rr = how[i][r]
        counts.append(i - j)
        reps.append(rr)
        i, r = j, r - rr
    return counts[::-1], reps[::-1]


def split_layout(costs: BlockCosts, n: int, world: int, cap: float = 0.0,
                 fixed: list[int] | None = None) -> tuple[list[int], list[int]]:
    """best_layout (or, with `fixed` blocks per group, best_replicas) for dist.replica_batch="split":
    the layout whose slowest group is fastest among those whose neighbouring groups hold equal replica
    counts or one of them a single rank (Note [split replicas]). Dynamic programming over (blocks,
    ranks, the last group's replicas); ties go to the layout found first, as in best_layout."""
    inf = float("inf")
    ends = None if fixed is None else [sum(fixed[:g]) for g in range(len(fixed) + 1)]
    if ends is not None and world < len(fixed):
        raise ConfigError(f"dist.placement has {len(fixed)} stage groups but the world has {world} ranks; "
                          "every group needs a rank")
    # best[i][r][last]: the smallest slowest-group time of the first i blocks on r ranks whose last group
    # has `last` replicas (0: no group yet); how: (j, rr, the previous group's replicas)
    best = [[[inf] * (world + 1) for _ in range(world + 1)] for _ in range(n + 1)]
    how: dict = {}
    best[0][0][0] = 0.0
    for i in range(1, n + 1):
        if ends is not None and i not in ends:
            continue
        starts = range(i - 1, -1, -1) if ends is None else [ends[ends.index(i) - 1]]
        for r in range(1, world + 1):
            for j in starts:
                if cap and sum(costs.mem[j:i]) > cap:
                    continue
                for rr in range(1, r + 1):
                    t = costs.group_s(range(j, i), rr)
                    for prev in range(world + 1):
                        before = best[j][r - rr][prev]
                        if before == inf or (prev and prev != rr and 1 not in (prev, rr)):
                            continue
                        v = max(before, t)
                        if v < best[i][r][rr] - 1e-12 * max(1.0, abs(v)):
                            best[i][r][rr], how[i, r, rr] = v, (j, prev)
    last = min(range(1, world + 1), key=lambda rr: (best[n][world][rr], rr))
    if best[n][world][last] == inf:
        raise ConfigError(f"dist.max_stage_mem_mb={cap / MiB:g}: no layout of the {n} blocks on {world} ranks fits "
                          f"(blocks need {[round(m / MiB, 1) for m in costs.mem]} MiB); raise the cap")
    counts, reps, i, r, rr = [], [], n, world, last
    while i > 0:
        j, prev = how[i, r, rr]
        counts.append(i - j)
        reps.append(rr)
        i, r, rr = j, r - rr, prev
    return counts[::-1], reps[::-1]


def reference_replication(d: DistConfig):
    """The simultaneous trainer with dist.replicas (the reference of sync with replicas): build_stages'
    `replication`, the blocks of each group accumulating as many batches per step as the group has
    replicas (stepping.Accumulate). None without replicas."""
    if not any(r > 1 for r in d.replicas):
        return None
    return lambda n: (layout(d, n, sum(d.replicas)).block_replicas(), None)
