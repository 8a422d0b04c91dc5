"""What each way of training a network predicts on a cluster, from one measurement (measure.py, or
FLOPs for a device this machine does not have: `on_device`): samples/s, the exact per-rank training
memory (memory.ExactMemory's parts), bytes per sample on the slowest link and the best layout.
Pure arithmetic: the equations and their sources are docs/plan.md's, each named here by its term.

Times are seconds per batch of data.batch_size (B) samples, the global batch of every method; a
rate is bytes/s (inf: no limit). A block's time at r rows of a batch is fixed + (t(B) - fixed) x r / B
(`at_rows`): measured at two batch sizes, so a small part (DDP's B/K rows, a microbatch) keeps its
per-call cost.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

from .model import BlockCosts, best_split, groups_of, split_layout

HOST_HEADER = 112  # a send keeps its 14-int64 header's host copy alive with it (transport.pack)


class PlanError(ValueError):
    """Bad input to `decoupled plan` (cli.py): the message names the option."""


class Infeasible(ValueError):
    """A method cannot run this layout at all (K > blocks for a pipeline, no microbatch count)."""


@dataclass
class HostCosts:
    """What communication and its encodings cost the ranks' own processors (docs/plan.md, the host
    terms; model.py Note [host costs]), each measured (host.py, measure.py) or, on a device planned
    from FLOPs, counted in kernel launches (on_device). Seconds; all 0: the terms vanish."""
    allreduce: tuple[float, float] = (0.0, 0.0)  # CPU per all-reduce call, per byte a rank sends in the ring (gloo)
    send: tuple[float, float] = (0.0, 0.0)  # a transport message sent: per message, per byte
    recv: tuple[float, float] = (0.0, 0.0)  # a transport message received: per message, per byte
    # per codec (engine/wire.CODECS): per block, its output's encode (to_wire) and decode (from_wire)
    # at data.batch_size rows ("encode_s", "decode_s") and their per-call parts ("encode_fixed_s", ...)
    codec: dict = field(default_factory=dict)
    powersgd_s: float = 0.0  # one step's PowerSGD compression arithmetic, at rank powersgd_rank
    powersgd_rank: int = 4  # (--powersgd-rank: the plan's Settings.powersgd_rank)

    def coded(self, name: str, what: str, j: int) -> tuple[float, float]:
        """(seconds at data.batch_size, per-call part) of codec `name`'s `what` ("encode" or "decode")
        of block j's output; (0, 0) where not measured."""
        c = self.codec.get(name)
        return (c[f"{what}_s"][j], c[f"{what}_fixed_s"][j]) if c else (0.0, 0.0)


@dataclass
class Profile:
    """One measurement of a network at the batch B it trains with (measure.profile)."""
    batch: int
    local: BlockCosts  # the decoupled step per block (Stage.train_step): step_s, fixed_s, mem, act, grad_bytes
    local_mem: list[dict]  # per block: ExactMemory's parts of its step (params, grads, optimizer, activations)
    row_bytes: dict[str, list[int]]  # per wire codec: one sample's activation at each cut in its form
    numel: list[int]  # per cut: features per sample (the pipelines send float32 activations and gradients)
    fwd_s: list[float]  # e2e network, per block at B: forward
    bwd_s: list[float]  # backward (the last block: with its head and the loss)
    e2e_fixed_s: list[float]  # the per-call part of fwd + bwd
    e2e_act: list[float]  # bytes each block's forward saves in the e2e step (ExactMemory)
    e2e_mem: dict  # ExactMemory's parts of one e2e step
    e2e_params: list[float]  # bytes per block of the e2e network (the last with its head)
    opt_s: float  # one optimizer step over the e2e network
    matrices: list[tuple[int, int]]  # e2e gradients as PowerSGD reshapes them: (rows, cols); vectors (n, 1)
    classes: int = 0  # an evaluation message carries the running ensemble: this many float32 a sample
    notes: list[str] = field(default_factory=list)  # what was scaled or assumed: plan.json says it
    host: HostCosts = field(default_factory=HostCosts)  # the host terms (docs/plan.md); zero: none


@dataclass
class Cluster:
    ranks: int
    link: float  # bytes/s between nodes
    nodes: int = 0  # 0: every rank its own node; else the ranks spread evenly, consecutive ranks per node
    intra: float = math.inf  # bytes/s between ranks of one node

    @property
    def per_node(self) -> int:
        return math.ceil(self.ranks / self.nodes) if self.nodes else 1

    @property
    def ring(self) -> float:
        """A ring all-reduce over every rank goes at its slowest hop's rate."""
        return self.link if self.per_node < self.ranks else self.intra


@dataclass
class Settings:
    message: Callable[..., int]  # (rows, row bytes[, aux width]) -> a message's bytes (transport.message_bytes)
    wire: str = "float32"  # dist.wire_dtype of the job
    eval_batch: int = 0  # data.eval_batch_size; 0: data.batch_size, as the bench sets it (bench/rows.prepare)
    max_inflight: int = 2  # dist.max_inflight
    replay_capacity: int = 4  # replay.capacity (async)
    bucket_bytes: float = 25 * 2 ** 20  # dist.allreduce_bucket_mb
    powersgd_rank: int = 4
    localsgd_period: int = 16
    microbatches: tuple[int, ...] = ()  # the pipelines' candidates; () = every power of two dividing B
    # dist.placement as a list (blocks per rank): sync / sync-int8 / async predicted at that layout where its
    # length is the plan's K, as the engine runs it, instead of the best split; () = search
    placement: tuple[int, ...] = ()


def per_byte(rate: float) -> float:
    return 0.0 if math.isinf(rate) else 1.0 / rate


def at_rows(t: float, fixed: float, rows: float, batch: int) -> float:
    """A step measured at `batch` rows taking `t`, at `rows` rows (its per-call part `fixed` stays)."""
    return fixed + (t - fixed) * rows / batch


def _memory(parts: dict) -> dict:
    """ExactMemory's report shape: the parts and their total (the bench's exact_mem)."""
    parts = {k: int(round(v)) for k, v in parts.items()}
    return {**parts, "total_bytes": sum(parts.values())}


def _sum(dicts: list[dict], key: str) -> float:
    return sum(d[key] for d in dicts)


# ---------------------------------------------------------------------------- decoupled: sync, async

def _costs(p: Profile, c: Cluster, s: Settings, codec: str, split: bool) -> BlockCosts:
    """The engine's cost model (model.py) on this cluster: the cut's messages at the link's rate, the
    transport's and the all-reduce's host work (Note [host costs]), and every block's step with
    `codec` at its boundaries instead of the job's (codec_s)."""
    step, fixed = codec_s(p, s, codec)
    return dataclasses.replace(p.local, step_s=step, fixed_s=fixed,
                               out_bytes=[float(s.message(p.batch, b)) for b in p.row_bytes[codec]],
                               link_s_per_byte=per_byte(c.link), comm_s_per_byte=per_byte(c.link),
                               ranks_per_node=c.per_node if c.nodes else 0, intra_s_per_byte=per_byte(c.intra),
                               split=split, send_host=p.host.send, recv_host=p.host.recv,
                               allreduce_host=p.host.allreduce)


def codec_s(p: Profile, s: Settings, codec: str) -> tuple[list[float], list[float]]:
    """Every block's decoupled step (and its per-call part) with `codec` on the wire: the measured step
    (Stage.train_step) already encodes its output in the job's codec (s.wire) and reads a float32
    input; a block reads what its upstream encoded, so it decodes too (block 0 reads the data):
    step + encode(codec) - encode(job's) + decode(codec) of the input."""
    h, n = p.host, len(p.local.step_s)
    step, fixed = list(p.local.step_s), list(p.local.fixed_s or [0.0] * n)
    for j in range(n):
        for (t, f), sign in ((h.coded(codec, "encode", j), 1), (h.coded(s.wire, "encode", j), -1),
                             (h.coded(codec, "decode", j - 1) if j else (0.0, 0.0), 1)):
            step[j], fixed[j] = step[j] + sign * t, fixed[j] + sign * f
        step[j], fixed[j] = max(step[j], 0.0), min(max(fixed[j], 0.0), max(step[j], 0.0))
    return step, fixed


def decoupled(p: Profile, c: Cluster, s: Settings, method: str) -> dict:
    """sync / async / sync-int8: one rank per stage group, the link-aware best split (K <= blocks);
    sync-auto: split replicas too (best_layout under Note [split replicas]). Every stage's step is the
    slower of its compute and its send (Note [link-aware stages]); the pipeline goes at its slowest
    stage's. Async trains the same fresh stream (the link and the slowest stage set its pace) and
    replays instead of idling: a faster rank draws T / its own step batches per fresh one."""
    codec = "int8" if method == "sync-int8" else s.wire
    split = method == "sync-auto"
    costs = _costs(p, c, s, codec, split)
    n, k = len(costs.step_s), c.ranks
    if split:
        counts, reps = split_layout(costs, n, k)
    else:
        if k > n:
            raise Infeasible(f"{k} ranks > {n} blocks")
        if len(s.placement) == k:  # the job's own layout (cli.py checked that it covers the blocks)
            counts = list(s.placement)
        else:
            counts = best_split(costs.step_s, k, cut_s=lambda i, g: costs.transfer_s([i], 1, g),
                                extra_s=lambda j, i: sum(costs.host_s(range(j, i))))
        reps = [1] * k
    groups = groups_of(counts)
    firsts = [sum(reps[:g]) for g in range(len(groups))]
    compute = [costs.group_s(b, r, f) for b, r, f in zip(groups, reps, firsts)]
    transfer = [costs.transfer_s(b, r, f) for b, r, f in zip(groups, reps, firsts)]
    step = max(max(a, b) for a, b in zip(compute, transfer))
    mems = [_decoupled_mem(p, s, codec, groups, reps, g, split, method == "async") for g in range(len(groups))]
    worst = max(range(len(mems)), key=lambda g: mems[g]["total_bytes"])
    # per batch on cut g: alternate replicas send it whole, from one of them; split ones in as many
    # parts as the larger of the two groups has replicas (groups.split_route)
    parts = [max(reps[g], reps[g + 1]) if split else 1 for g in range(len(groups) - 1)]
    sent = [q * s.message(math.ceil(p.batch / q), p.row_bytes[codec][groups[g][-1]]) for g, q in enumerate(parts)]
    # the bench's wire_bytes_per_sample: every link's training bytes over the samples they carried
    out = {"samples_per_s": p.batch / step, "step_s": step,
           "terms": {"compute_s": compute, "transfer_s": transfer},
           "layout": {"placement": groups, "replicas": reps, "microbatches": None},
           "exact_train_mem_bytes": mems[worst]["total_bytes"], "exact_mem": mems[worst],
           "exact_mem_per_rank": [m["total_bytes"] for m, r in zip(mems, reps) for _ in range(r)],
           "wire_bytes_per_sample": sum(sent) / (p.batch * (len(groups) - 1)) if sent else None,
           # per rank: its share of its cut's messages, and a replica's ring all-reduce of its group's gradients
           # (split replicas every batch, alternate ones every R-th)
           "link_bytes_per_sample": max((sent[g] / r if g < len(sent) else 0.0) + (
               2 * (r - 1) / r * sum(costs.grad_bytes[j] for j in groups[g]) / (1 if split else r))
               for g, r in enumerate(reps)) / p.batch}
    if method == "async":
        out["replay_draws_per_fresh"] = min(step / compute[-1], 1e9) if compute[-1] else None
    return out


def _decoupled_mem(p: Profile, s: Settings, codec: str, groups, reps, g: int, split: bool, replay: bool) -> dict:
    """A rank of group g, as ExactMemory counts it: its blocks' state, the largest step's activations
    (at its rows), what its links hold (held_bytes) and a replica's all-reduce copy. Held: its sends in
    flight, each a whole message's buffer with its host header, a training batch's or an evaluation
    batch's (with the running ensemble), whichever is larger, and once the announcement of the larger
    (transport.py: its size goes first, in a transfer of the smaller); downstream of the first stage,
    its posted receive and sync's inbox of max_inflight or async's replay buffer: the peak, reached
    whenever upstream runs ahead (an evaluation's forward-only batches do); a rank that keeps pace with
    its upstream holds less (docs/plan.md: measured)."""
    blocks, r = groups[g], reps[g]
    rows = math.ceil(p.batch / r) if split else p.batch
    mine = [p.local_mem[j] for j in blocks]
    ev = s.eval_batch or p.batch  # evaluation batches go whole to one replica

    def sizes(rows_: int, cut: int) -> list[int]:  # a training and an evaluation message, smaller first
        return sorted([s.message(rows_, p.row_bytes[codec][cut]), s.message(ev, p.row_bytes[codec][cut], p.classes)])
    held = 0.0
    if g + 1 < len(groups):
        small, big = sizes(rows, blocks[-1])
        held += s.max_inflight * (big + HOST_HEADER) + (small + HOST_HEADER) * (small < big)
    if g > 0:
        held += ((s.replay_capacity if replay else s.max_inflight) + 1) * sizes(rows, groups[g - 1][-1])[1]
    parts = {"params_bytes": _sum(mine, "params_bytes"), "grads_bytes": _sum(mine, "grads_bytes"),
             "optimizer_bytes": _sum(mine, "optimizer_bytes"),
             "activations_bytes": max(m["activations_bytes"] for m in mine) * rows / p.batch, "held_bytes": held}
    if r > 1:
        parts["allreduce_bytes"] = min(parts["grads_bytes"], s.bucket_bytes)
    return _memory(parts)


# ---------------------------------------------------------------------------- data parallel

def _e2e_s(p: Profile, rows: float, blocks=None) -> tuple[float, float]:
    """(forward, backward) seconds of the e2e network's `blocks` (all) at `rows` rows."""
    fwd = bwd = 0.0
    for j in blocks if blocks is not None else range(len(p.fwd_s)):
        both = p.fwd_s[j] + p.bwd_s[j]
        f = at_rows(both, p.e2e_fixed_s[j], rows, p.batch) / both if both else 0.0
        fwd, bwd = fwd + p.fwd_s[j] * f, bwd + p.bwd_s[j] * f
    return fwd, bwd


def _replicated_mem(p: Profile, rows: float, shards: int = 1, comm_state: float = 0.0) -> dict:
    """Every rank the e2e network's state (FSDP: its 1/K shard) and the e2e step's activations at its
    rows. FSDP's gathered parameters, which autograd saves for backward, are no registered Parameter
    (the shards are): ExactMemory counts them among the activations, and so does this."""
    m = p.e2e_mem
    gathered = m["params_bytes"] if shards > 1 else 0.0
    parts = {"params_bytes": m["params_bytes"] / shards, "grads_bytes": m["grads_bytes"] / shards,
             "optimizer_bytes": m["optimizer_bytes"] / shards,
             "activations_bytes": m["activations_bytes"] * rows / p.batch + gathered, "held_bytes": 0.0}
    if comm_state:
        parts["comm_state_bytes"] = comm_state
    return _memory(parts)


def _ring(nbytes: float, c: Cluster) -> float:
    """Bytes one rank sends in a ring all-reduce of `nbytes`: 2 (K-1)/K of them."""
    return 2 * (c.ranks - 1) / c.ranks * nbytes


def powersgd_bytes(p: Profile, rank: int) -> tuple[float, float]:
    """(bytes PowerSGD all-reduces per step, bytes of its P and Q), as torch's powerSGD_hook decides:
    every gradient viewed as n x m (its first dimension by the rest; a vector n x 1), at rank
    r = min(n, m, rank), goes as P (n x r) and Q (m x r) when (n + m) r x 2 < n m (its
    min_compression_rate, 2), else whole."""
    sent = pq = 0.0
    for n, m in p.matrices:
        r = min(n, m, rank)
        if (n + m) * r * 2 < n * m:
            sent += 4 * (n + m) * r
            pq += 4 * (n + m) * r
        else:
            sent += 4 * n * m
    return sent, pq


def data_parallel(p: Profile, c: Cluster, s: Settings, method: str) -> dict:
    """ddp: each rank B/K rows, the gradient all-reduce overlapping backward but for its last bucket
    (dist.allreduce_bucket_mb, DDP's bucket_cap_mb default too); ddp-powersgd: PowerSGD's compressed
    all-reduce after backward (error feedback: a gradient's copy); localsgd: no gradient
    all-reduce, the parameters averaged every H steps (a blocking all-reduce); fsdp: parameters
    all-gathered per block in forward and in backward, gradients reduce-scattered, all of it
    prefetched under compute; state sharded 1/K."""
    k = c.ranks
    rows = math.ceil(p.batch / k)
    fwd, bwd = _e2e_s(p, rows)
    grads, params = p.e2e_mem["grads_bytes"], p.e2e_mem["params_bytes"]
    sec = per_byte(c.ring)
    state = extra = 0.0

    def host(calls: float, ring_bytes: float) -> float:  # the CPU a rank's collectives take (gloo; 0 on NCCL)
        return calls * p.host.allreduce[0] + ring_bytes * p.host.allreduce[1]
    if method == "ddp":  # buckets all-reduce as backward fills them; the last (the first layers') after it
        sent = _ring(grads, c)
        frac = min(1.0, s.bucket_bytes / grads) if grads else 0.0
        last = sent * sec * frac
        hosted = host(math.ceil(grads / s.bucket_bytes), sent) if grads else 0.0
        host_last = host(1, sent * frac) if grads else 0.0
        # the host's share competes with backward for the cores; the wire's does not
        step = fwd + max(bwd + hosted - host_last, sent * sec - last) + max(last, host_last) + p.opt_s
    elif method == "ddp-powersgd":  # one bucket (gloo needs it: docs/plan.md), compressed after backward
        nbytes, pq = powersgd_bytes(p, s.powersgd_rank)
        sent, state, extra = _ring(nbytes, c), grads + pq, p.host.powersgd_s
        hosted = host(3, sent)  # the hook's all-reduces: the uncompressed tensors, the Ps, the Qs
        step = fwd + bwd + extra + max(sent * sec, hosted) + p.opt_s
    elif method == "localsgd":
        sent, state = _ring(params, c) / s.localsgd_period, params
        hosted = host(1, _ring(params, c)) / s.localsgd_period  # one flat all-reduce of the parameters
        step = fwd + bwd + p.opt_s + max(sent * sec, hosted)
    else:  # fsdp: all-gather twice, reduce-scatter once, (K-1)/K of the bytes each
        sent = 3 * (k - 1) / k * params
        hosted = host(3 * len(p.fwd_s), sent)  # three collectives per block (each block its own unit)
        step = max(fwd + bwd + hosted, sent * sec) + p.opt_s / k
    mem = _replicated_mem(p, rows, k if method == "fsdp" else 1, state)
    return {"samples_per_s": p.batch / step, "step_s": step,
            "terms": {"compute_s": fwd + bwd + p.opt_s + extra, "comm_s": sent * sec, "host_s": hosted},
            "layout": {"placement": [list(range(len(p.fwd_s)))], "replicas": [k], "microbatches": None},
            "exact_train_mem_bytes": mem["total_bytes"], "exact_mem": mem,
            "exact_mem_per_rank": [mem["total_bytes"]] * k,
            "exact_mem_lower_bound": method == "fsdp", "link_bytes_per_sample": sent / p.batch}


# ---------------------------------------------------------------------------- pipelines: gpipe, 1f1b

def microbatch_counts(s: Settings, batch: int, k: int) -> list[int]:
    cands = s.microbatches or [2 ** i for i in range(batch.bit_length()) if batch % 2 ** i == 0]
    return [m for m in cands if batch % m == 0 and m >= k]


def pipeline(p: Profile, c: Cluster, s: Settings, method: str) -> dict:
    """gpipe / 1f1b on K stages of the e2e network, at the best microbatch count M (dividing B, >= K):
    a batch takes (M + K - 1) microbatch steps of the slowest stage, the bubble (K-1)/(M+K-1)
    of it idle; a stage's microbatch step is the slower of its compute and its sends (activations
    forward and gradients backward, float32, both from its own link). GPipe keeps all M microbatches'
    activations, 1F1B at most K - s on stage s."""
    n, k = len(p.fwd_s), c.ranks
    if k > n:
        raise Infeasible(f"{k} ranks > {n} blocks")
    ms = microbatch_counts(s, p.batch, k)
    if not ms:
        raise Infeasible(f"no microbatch count divides data.batch_size={p.batch} and is >= {k} stages")
    def hop(g: int) -> float:  # seconds per byte from stage g to g + 1 (and back)
        same = c.nodes and g // c.per_node == (g + 1) // c.per_node
        return per_byte(c.intra if same else c.link)
    best = None
    h = p.host

    def host(j: int, i: int, m: int) -> float:
        """The host work of a stage of blocks j..i-1 per batch as m microbatches: on each edge it has,
        per microbatch one message sent and one received (activations one way, their gradients the
        other), float32 with no header (Note [host costs]: the transport's constants)."""
        edges = [e for e, on in ((j - 1, j > 0), (i - 1, i < n)) if on]
        return sum(m * (h.send[0] + h.recv[0]) + (h.send[1] + h.recv[1]) * 4 * p.numel[e] * p.batch for e in edges)
    for m in ms:
        per = [m * sum(_e2e_s(p, p.batch / m, [j])) for j in range(n)]  # a batch as m microbatches
        cut = [4 * p.numel[j] * p.batch for j in range(n)]  # float32 activations (and their gradients back)
        groups = groups_of(best_split(per, k, cut_s=lambda i, g: cut[i] * hop(g),
                                      extra_s=lambda j, i: host(j, i, m)))
        stage = []
        for g, blocks in enumerate(groups):  # a stage sends activations on and gradients back on its link
            out = cut[blocks[-1]] * hop(g) if g + 1 < k else 0.0
            back = cut[groups[g - 1][-1]] * hop(g - 1) if g else 0.0
            stage.append(max(sum(per[j] for j in blocks) + host(blocks[0], blocks[-1] + 1, m), out + back))
        step = max(stage) * (m + k - 1) / m + max(p.opt_s * sum(p.e2e_params[j] for j in b) / sum(p.e2e_params)
                                                   for b in groups)
        if best is None or step < best[0]:
            best = (step, m, groups, stage)
    step, m, groups, stage = best
    mems = [_pipeline_mem(p, groups, g, m, method) for g in range(k)]
    worst = max(range(k), key=lambda g: mems[g]["total_bytes"])
    # a stage sends its activations on and the gradient of its input back: float32, per sample
    sent = max(4 * ((p.numel[b[-1]] if g + 1 < k else 0) + (p.numel[groups[g - 1][-1]] if g else 0))
               for g, b in enumerate(groups))
    return {"samples_per_s": p.batch / step, "step_s": step,
            "terms": {"stage_s": stage, "bubble": (k - 1) / (m + k - 1)},
            "layout": {"placement": groups, "replicas": [1] * k, "microbatches": m},
            "exact_train_mem_bytes": mems[worst]["total_bytes"], "exact_mem": mems[worst],
            "exact_mem_per_rank": [x["total_bytes"] for x in mems], "link_bytes_per_sample": float(sent)}


def _pipeline_mem(p: Profile, groups, g: int, m: int, method: str) -> dict:
    """A stage keeps, per microbatch in flight, what its blocks save in the e2e step, the input it
    received (in the e2e network the block before saved that storage) and the output it sent (kept for
    the backward its gradient drives): all M microbatches in GPipe, min(M, K - g) in 1F1B."""
    share = sum(p.e2e_params[j] for j in groups[g]) / sum(p.e2e_params)
    held = min(m, len(groups) - g) / m if method == "1f1b" else 1.0
    edges = 4 * p.batch * ((p.numel[groups[g - 1][-1]] if g else 0) +
                           (p.numel[groups[g][-1]] if g + 1 < len(groups) else 0))
    e = p.e2e_mem
    return _memory({"params_bytes": e["params_bytes"] * share, "grads_bytes": e["grads_bytes"] * share,
                    "optimizer_bytes": e["optimizer_bytes"] * share,
                    "activations_bytes": (sum(p.e2e_act[j] for j in groups[g]) + edges) * held, "held_bytes": 0.0})


METHODS: dict[str, Callable[[Profile, Cluster, Settings, str], dict]] = {
    "sync": decoupled, "sync-int8": decoupled, "sync-auto": decoupled, "async": decoupled,
    "ddp": data_parallel, "ddp-powersgd": data_parallel, "localsgd": data_parallel, "fsdp": data_parallel,
    "gpipe": pipeline, "1f1b": pipeline}
ONE_RANK_PER_GROUP = ("sync", "sync-int8", "async", "gpipe", "1f1b")  # K <= blocks


def predict(p: Profile, c: Cluster, s: Settings, method: str) -> dict:
    return METHODS[method](p, c, s, method)


def on_device(p: Profile, flops_local: list[float], flops_e2e: list[float], flops_fwd: list[float],
              layers: list[int], tensors: int, tflops: float, efficiency: float, launch_s: float) -> Profile:
    """The profile on a device this machine does not have: every step from its FLOPs (flops.py, per
    sample) / (tflops x efficiency), plus a floor of launch_s per kernel (3 per layer a training step:
    forward, input gradient, weight gradient; 1 a forward), the optimizer one launch per parameter
    tensor. Memory and bytes are the measurement's: they do not depend on the device."""
    rate = tflops * 1e12 * efficiency
    b = p.batch
    fixed = [3 * n * launch_s for n in layers]
    local = dataclasses.replace(p.local, step_s=[f * b / rate + x for f, x in zip(flops_local, fixed)], fixed_s=fixed)
    fwd = [f * b / rate + n * launch_s for f, n in zip(flops_fwd, layers)]
    bwd = [(e - f) * b / rate + 2 * n * launch_s for e, f, n in zip(flops_e2e, flops_fwd, layers)]
    note = (f"times from FLOPs at {tflops:g} TFLOPS x {efficiency:g} efficiency, {launch_s * 1e6:g} us per kernel "
            "launch (3 per layer a training step), not measured")
    host_note = ("host terms on a device planned from FLOPs (NCCL): collectives and transfers take no host CPU "
                 "(all-reduce host term 0, transport per-byte 0); a transport message costs "
                 f"{SEND_LAUNCHES} kernel launches to send and {RECV_LAUNCHES} to receive, a codec's encode and "
                 "decode their launches (docs/plan.md), PowerSGD's compression its FLOPs; assumed, not measured")
    return dataclasses.replace(p, local=local, fwd_s=fwd, bwd_s=bwd, e2e_fixed_s=fixed, opt_s=tensors * launch_s,
                               host=device_host(p, rate, launch_s), notes=[*p.notes, note, host_note])


# kernels a transport message takes: pack (header upload, concatenation, padding) and isend; irecv, the
# header's download and the next irecv posted
SEND_LAUNCHES, RECV_LAUNCHES = 4, 3
# kernels of one encode / decode (engine/wire.Codec, precision.Precision.to_wire's finiteness fold): a scaled
# code's row scales, division, clamp, rounding, cast and concatenation; a cast's one cast; float32's none
CODEC_LAUNCHES = {"scaled": (15, 3), "cast": (1, 1), "float32": (0, 0)}
POWERSGD_LAUNCHES = 10  # per gradient compressed: error in, 3 matrix products, orthogonalisation, error out


def device_host(p: Profile, rate: float, launch_s: float) -> HostCosts:
    """The host terms on a device planned from FLOPs at `rate` FLOP/s (on_device): no host copies (NCCL),
    kernel launches per message and per encode / decode, PowerSGD's compression from its FLOPs (per
    gradient it compresses, n x m at rank r: three products of 2 n m r and an orthogonalisation of
    about 4 n r^2) at the profile's PowerSGD rank."""
    n = len(p.local.step_s)
    codec = {}
    for name in p.host.codec:  # engine/wire.CODECS' names: the scaled codes are int8 and the float8s
        kind = "float32" if name == "float32" else "scaled" if name == "int8" or name.startswith("float8") else "cast"
        enc, dec = (x * launch_s for x in CODEC_LAUNCHES[kind])
        codec[name] = {"encode_s": [enc] * n, "encode_fixed_s": [enc] * n, "decode_s": [dec] * n,
                       "decode_fixed_s": [dec] * n}
    psgd = 0.0
    for nn_, m in p.matrices:
        r = min(nn_, m, p.host.powersgd_rank)
        if (nn_ + m) * r * 2 < nn_ * m:
            psgd += (6 * nn_ * m * r + 4 * nn_ * r * r) / rate + POWERSGD_LAUNCHES * launch_s
    return HostCosts(send=(SEND_LAUNCHES * launch_s, 0.0), recv=(RECV_LAUNCHES * launch_s, 0.0), codec=codec,
                     powersgd_s=psgd, powersgd_rank=p.host.powersgd_rank)
