"""The cost model of a layout: pure arithmetic on measured numbers (measure.py makes them), with no
torch, no process group and no job config, so the engine's dist.placement = "auto" (engine/ranks/
placement.py), the bench's pipeline split and `decoupled plan` (methods.py) share it.

Units: seconds per batch of the source (data.batch_size samples) and bytes; a rate is bytes/s.

Each replica of a group of blocks B held by R ranks takes every R-th batch, so per batch of the
source it needs (sum(step_s[B]) + allreduce(B)) / R seconds of compute, where allreduce(B) is 0 for
R = 1 and otherwise |B| x latency (each block's step all-reduces on its own) + 2 (R-1)/R x bytes(B)
x seconds per byte (a ring all-reduce moves that much per rank). With dist.replica_batch="split"
(Note [split replicas], engine/ranks/groups.py) every replica takes 1/R of every batch's rows and
all-reduces after each: sum(step_s[B]) / R + allreduce(B) (compute taken as proportional to rows).

Note [link-aware stages]. A group also sends its last block's output on to the next group: out_bytes
(the message a batch makes on the wire, the codec's form with its header, labels and ids:
engine/ranks/transport.message_bytes) x link_s_per_byte, divided by R (each replica sends its own
batches, or rows, on its own link). Sends overlap compute (dist.max_inflight isends in flight), so
a stage's step time is the slower of the two, max(compute, transfer), and the layout search
minimises the slowest stage's. Only the sending side is charged: links are full duplex, and what a
group receives is its upstream's transfer, already that group's term. The last group sends nothing.
With no link known (link_s_per_byte = 0) a stage's time is its compute: the search is unchanged.

Note [host costs]. On a CPU backend (gloo) the transport's copies and a collective's TCP traffic and
reductions run on the cores that compute, so they are compute, not link: `send_host` and
`recv_host` (fixed seconds per message, seconds per byte; decoupled/plan/host.py measures them
between two local gloo processes) add to the group's compute for the message it sends on and the
one it receives, and `allreduce_host` (per call, per byte a rank sends in the ring) makes a
replica's blocking all-reduce the slower of its wire time and its host time. All three are 0 unless
given (the engine's dist.placement = "auto" measures the all-reduce it runs instead: comm_*), and 0
for a device planned from FLOPs on NCCL, whose transfers need no host copies.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError

MiB = 2 ** 20


@dataclass
class BlockCosts:
    """Per block, measured at start-up (measure.measure_blocks); `comm_*` from measure.measure_allreduce."""
    step_s: list[float]  # one training step of one batch
    mem: list[float]  # bytes of the block's state: parameters, gradients, optimizer state (memory.ExactMemory's)
    grad_bytes: list[float]  # what a replica all-reduces per step
    comm_s_per_byte: float = 0.0
    comm_latency_s: float = 0.0  # one all-reduce of a single element
    split: bool = False  # dist.replica_batch="split": replicas split every batch (Note [split replicas])
    act: list[float] = field(default_factory=list)  # the activations its step saves (peak, ExactMemory's)
    out_bytes: list[float] = field(default_factory=list)  # the message its output makes per batch on the wire
    link_s_per_byte: float = 0.0  # between neighbouring groups (Note [link-aware stages]); 0: unknown
    # the part of step_s a step costs whatever its rows (launches, Python): split replicas' parts keep it
    fixed_s: list[float] = field(default_factory=list)
    # ranks are spread over nodes, this many consecutive ranks each (0: one link rate for all); ranks of
    # one node reach each other at intra_s_per_byte, for their all-reduces and their sends alike
    ranks_per_node: int = 0
    intra_s_per_byte: float = 0.0
    # Note [host costs]: (fixed seconds, seconds per byte) of the CPU a message or an all-reduce takes
    send_host: tuple[float, float] = (0.0, 0.0)  # per message sent, per byte of it
    recv_host: tuple[float, float] = (0.0, 0.0)  # per message received, per byte of it
    allreduce_host: tuple[float, float] = (0.0, 0.0)  # per all-reduce call, per byte a rank sends in the ring

    def _rates(self, first: int | None, count: int) -> tuple[float, float]:
        """(all-reduce, send) seconds per byte among the ranks first..first+count-1."""
        if self.ranks_per_node and first is not None and first // self.ranks_per_node == \
                (first + count - 1) // self.ranks_per_node:
            return self.intra_s_per_byte, self.intra_s_per_byte
        return self.comm_s_per_byte, self.link_s_per_byte

    def group_s(self, blocks: range | list[int], replicas: int, first: int | None = None) -> float:
        """Compute seconds per batch of the source, for the group of `blocks` held by `replicas` ranks
        (the first of them `first`, where the ranks' nodes matter)."""
        blocks = list(blocks)
        t = sum(self.step_s[j] for j in blocks)
        comm = 0.0
        if replicas > 1:
            nbytes = 2 * (replicas - 1) / replicas * sum(self.grad_bytes[j] for j in blocks)
            per_byte = self._rates(first, replicas)[0]
            # a blocking all-reduce: the slower of its wire and its host work (Note [host costs])
            comm = max(len(blocks) * self.comm_latency_s + nbytes * per_byte,
                       len(blocks) * self.allreduce_host[0] + nbytes * self.allreduce_host[1])
        msg_fixed, msg_bytes = self.host_s(blocks)
        if not self.split:
            return (t + msg_fixed + msg_bytes + comm) / replicas
        fixed = (sum(self.fixed_s[j] for j in blocks) if self.fixed_s else 0.0) + msg_fixed
        return fixed + (t + msg_fixed - fixed + msg_bytes) / replicas + comm

    def host_s(self, blocks: range | list[int]) -> tuple[float, float]:
        """(per-message part, per-byte part) of the CPU a group's transport takes per batch of the
        source (Note [host costs]): sending its last block's output on, receiving its first block's input."""
        blocks = list(blocks)
        fixed = per = 0.0
        if self.out_bytes and blocks[-1] < len(self.step_s) - 1:
            fixed, per = self.send_host[0], self.send_host[1] * self.out_bytes[blocks[-1]]
        if self.out_bytes and blocks[0] > 0:
            fixed, per = fixed + self.recv_host[0], per + self.recv_host[1] * self.out_bytes[blocks[0] - 1]
        return fixed, per

    def transfer_s(self, blocks: range | list[int], replicas: int, first: int | None = None) -> float:
        """Seconds per batch of the source a replica of the group spends sending (Note [link-aware
        stages]); with nodes, at the intra-node rate when the group and the next group's first rank
        share one."""
        last = list(blocks)[-1]
        if last == len(self.step_s) - 1:
            return 0.0
        return self.out_bytes[last] * self._rates(first, replicas + 1)[1] / replicas if self.out_bytes else 0.0

    def stage_s(self, blocks: range | list[int], replicas: int, first: int | None = None) -> float:
        """The group's step time: the slower of its compute and its transfer."""
        return max(self.group_s(blocks, replicas, first), self.transfer_s(blocks, replicas, first))

    def group_mem(self, blocks: range | list[int]) -> float:
        """Bytes a rank holding `blocks` needs: every block's state, and the largest step's activations
        (a rank steps its blocks one after another; each step's graph is freed before the next)."""
        blocks = list(blocks)
        return sum(self.mem[j] for j in blocks) + max((self.act[j] for j in blocks), default=0.0) * bool(self.act)

    def need_mib(self) -> list[float]:
        return [round(self.group_mem([j]) / MiB, 1) for j in range(len(self.mem))]


def best_split(costs: list[float], k: int, mem=None, cap: float = 0.0, replicas: list[int] | None = None,
               cut_s=None, extra_s=None) -> list[int]:
    """Blocks per group (like dist.placement) of the contiguous split of `costs` (seconds per batch) into
    `k` non-empty groups whose slowest group is fastest; a group's time is its summed cost, divided by
    replicas[g] when given, or its transfer `cut_s(i, g)` (group g ending with block i, not the last)
    when that is slower (Note [link-aware stages]), plus `extra_s(j, i)` when given (the group of blocks
    j..i-1: its transport's host work, Note [host costs]); with `mem` and `cap`, only splits whose every group
    needs at most `cap` bytes (`mem`: a group's bytes, BlockCosts.group_mem, or each block's, summed).
    Exact (dynamic programming, O(k n^2)); among equal maxima the split with the earliest, then
    smallest, first groups wins, so the answer is deterministic."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} blocks into {k} non-empty groups")
    need = mem if callable(mem) or mem is None else (lambda blocks: sum(mem[j] for j in blocks))
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[g][i]: the smallest slowest-group time of the first i blocks in g groups; cut: where group g starts
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        reps = replicas[g - 1] if replicas else 1
        for i in range(g, n - (k - g) + 1):
            send = cut_s(i - 1, g - 1) if cut_s is not None and i < n else 0.0
            for j in range(g - 1, i):  # the g-th group is blocks j..i-1
                if need is not None and need(range(j, i)) > cap:
                    continue  # would not fit in dist.max_stage_mem_mb
                own = prefix[i] - prefix[j] + (extra_s(j, i) if extra_s is not None else 0.0)
                v = max(best[g - 1][j], own / reps, send)
                if v < best[g][i] - 1e-12 * max(1.0, abs(v)):
                    best[g][i], cut[g][i] = v, j
    if best[k][n] == inf:
        raise ConfigError(f"dist.max_stage_mem_mb={cap / MiB:g}: no split of the {n} blocks over {k} ranks fits "
                          f"(blocks need {[round(need([j]) / MiB, 1) for j in range(n)]} MiB); raise the cap or add "
                          "ranks")
    sizes, i = [], n
    for g in range(k, 0, -1):
        j = cut[g][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def groups_of(counts: list[int]) -> list[list[int]]:
    """Blocks per group -> the blocks of each group."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [list(range(s, s + c)) for s, c in zip(starts, counts)]


def best_replicas(costs: BlockCosts, groups: list[list[int]], world: int) -> list[int]:
    """Ranks per group for a fixed split: one each, then every spare rank to the group that is slowest
    at that moment (optimal for the slowest group, as each group's time falls with its ranks)."""
    if world < len(groups):
        raise ConfigError(f"dist.placement has {len(groups)} stage groups but the world has {world} ranks; "
                          "every group needs a rank")
    reps = [1] * len(groups)
    for _ in range(world - len(groups)):
        g = max(range(len(groups)), key=lambda i: (costs.stage_s(groups[i], reps[i], sum(reps[:i])), -i))
        reps[g] += 1
    return reps


def best_layout(costs: BlockCosts, n: int, world: int, cap: float = 0.0) -> tuple[list[int], list[int]]:
    """dist.placement="auto" with dist.replicas="auto": the contiguous groups and their rank counts
    (summing to `world`) whose slowest group (BlockCosts.stage_s) is fastest, each group within
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
                if cap and costs.group_mem(range(j, i)) > cap:
                    continue
                for rr in range(1, r + 1):
                    v = max(best[j][r - rr], costs.stage_s(range(j, i), rr, r - rr))
                    if v < best[i][r] - 1e-12 * max(1.0, abs(v)):
                        best[i][r], how[i][r] = v, (j, rr)
    if best[n][world] == inf:
        raise ConfigError(f"dist.max_stage_mem_mb={cap / MiB:g}: no layout of the {n} blocks on {world} ranks fits "
                          f"(blocks need {costs.need_mib()} MiB); raise the cap")
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
                if cap and costs.group_mem(range(j, i)) > cap:
                    continue
                for rr in range(1, r + 1):
                    t = costs.stage_s(range(j, i), rr, r - rr)
                    # the previous group's replicas that may neighbour rr (none yet: 0), in increasing order
                    for prev in range(world + 1) if rr == 1 else sorted({0, 1, rr}):
                        before = best[j][r - rr][prev]
                        if before == inf:
                            continue
                        v = max(before, t)
                        if v < best[i][r][rr] - 1e-12 * max(1.0, abs(v)):
                            best[i][r][rr], how[i, r, rr] = v, (j, prev)
    last = min(range(1, world + 1), key=lambda rr: (best[n][world][rr], rr))
    if best[n][world][last] == inf:
        raise ConfigError(f"dist.max_stage_mem_mb={cap / MiB:g}: no layout of the {n} blocks on {world} ranks fits "
                          f"(blocks need {costs.need_mib()} MiB); raise the cap")
    counts, reps, i, r, rr = [], [], n, world, last
    while i > 0:
        j, prev = how[i, r, rr]
        counts.append(i - j)
        reps.append(rr)
        i, r, rr = j, r - rr, prev
    return counts[::-1], reps[::-1]
