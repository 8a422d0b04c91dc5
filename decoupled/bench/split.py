"""The pipeline baselines' own best split: contiguous groups of blocks, one per rank, that minimise
the slowest group's summed cost (its per-batch forward + backward time in the e2e network)."""
from __future__ import annotations


def best_split(costs: list[float], k: int) -> list[int]:
    """Blocks per group (like dist.placement) of the contiguous split of `costs` into `k` non-empty
    groups whose largest summed cost is smallest. Exact (dynamic programming, O(k n^2)); among equal
    maxima the split with the earliest, then smallest, first groups wins, so the answer is deterministic."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} blocks into {k} non-empty groups")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[g][i]: the smallest largest-group cost of the first i blocks in g groups; cut: where group g starts
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for i in range(g, n - (k - g) + 1):
            for j in range(g - 1, i):  # the g-th group is blocks j..i-1
                v = max(best[g - 1][j], prefix[i] - prefix[j])
                if v < best[g][i] - 1e-12 * max(1.0, abs(v)):
                    best[g][i], cut[g][i] = v, j
    sizes, i = [], n
    for g in range(k, 0, -1):
        j = cut[g][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]
