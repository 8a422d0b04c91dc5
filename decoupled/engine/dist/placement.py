"""Which consecutive blocks each rank holds: dist.placement, an even split, or ("auto") the split
whose slowest rank is fastest, from every block's training step measured at start-up. The same
split search gives the pipeline baselines of `decoupled bench` their own best split."""
from __future__ import annotations

import time

import torch

from ...config import ConfigError, JobConfig
from ...device import synchronize
from ..stage import build_stages

MiB = 2 ** 20


def placement(cfg: JobConfig, num_blocks: int, world: int, costs: list[float] | None = None,
              mem: list[float] | None = None) -> list[list[int]]:
    """Consecutive blocks per rank: dist.placement if given, "auto" from measured `costs` (and `mem`
    under dist.max_stage_mem_mb), else an even split (earlier ranks take the remainder). Raises
    ConfigError before anything trains."""
    if world > num_blocks:
        raise ConfigError(f"world size {world} > {num_blocks} blocks: every rank needs a block; launch at most "
                          f"{num_blocks} ranks (--nproc-per-node) or split the model finer (model.blocks)")
    counts = cfg.dist.placement
    if counts == "auto":
        cap = cfg.dist.max_stage_mem_mb * MiB
        counts = best_split(costs, world, mem if cap else None, cap)
    elif counts:
        counts = list(counts)
        if len(counts) != world or sum(counts) != num_blocks:
            raise ConfigError(f"dist.placement={counts} must list one block count per rank ({world} ranks) "
                              f"summing to the {num_blocks} blocks")
    else:
        q, r = divmod(num_blocks, world)
        counts = [q + (i < r) for i in range(world)]
    starts = [sum(counts[:i]) for i in range(world)]
    return [list(range(s, s + c)) for s, c in zip(starts, counts)]


def measure_blocks(cfg: JobConfig, input_shape, num_classes: int, device: torch.device,
                   steps: int = 3) -> tuple[list[float], list[float]]:
    """Every block's training step (forward, local backward, head, optimizer: Stage.train_step) on a
    batch of the real input shape, on this device: seconds (median of `steps` after one warm-up) and
    bytes (parameters, gradients and optimizer state, plus the activations the step saves for its
    backward). On a throwaway copy of the blocks: the training run's weights are untouched."""
    stages = build_stages(cfg, input_shape, num_classes, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((cfg.data.batch_size, *input_shape), generator=g).to(device)
    y = torch.randint(0, num_classes, (cfg.data.batch_size,), generator=g).to(device)
    costs, mem = [], []
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
        x = h.float()
    return costs, mem


def best_split(costs: list[float], k: int, mem: list[float] | None = None, cap: float = 0.0) -> list[int]:
    """Blocks per group (like dist.placement) of the contiguous split of `costs` into `k` non-empty
    groups whose largest summed cost is smallest; with `mem` and `cap`, only splits whose every group
    sums to at most `cap` bytes. Exact (dynamic programming, O(k n^2)); among equal maxima the split
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
                v = max(best[g - 1][j], prefix[i] - prefix[j])
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
