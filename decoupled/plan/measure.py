"""The measurements the cost model (model.py) and the planner (methods.py) run on: stages already
built (engine/build.py makes them from the job config; nothing here reads it) and, for an
all-reduce, the collective to time, passed in, so nothing here needs a process group.

Memory is counted one way everywhere: memory.ExactMemory, the bench's exact training memory (each
storage once, parameters never counted as activations), around the very steps that are timed.
Times are seconds per batch: the median of `steps` after one warm-up. All of it runs on throwaway
stages: the training run's weights are untouched.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..device import synchronize
from ..memory import ExactMemory
from .model import BlockCosts


def median_s(fn, device: torch.device, steps: int, clock=time.perf_counter) -> float:
    """Seconds of one call of `fn`: the median of `steps` calls after one warm-up (`clock`: wall
    time, or time.process_time for the CPU the process spends, every thread of it)."""
    times = []
    for _ in range(steps + 1):
        t0 = clock()
        fn()
        synchronize(device)
        times.append(clock() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def state_bytes(m: ExactMemory) -> int:
    """A block's state, as ExactMemory counts it: parameters, gradients, optimizer state."""
    return m.params_bytes + m.grads_bytes + m.optimizer_bytes


def measure_blocks(stages, x: torch.Tensor, y: torch.Tensor, device: torch.device, steps: int = 3,
                   parts: list | None = None) -> BlockCosts:
    """Every block's training step (forward, local backward, head, optimizer: Stage.train_step) on the
    batch (x, y), each block on the one before's output: seconds, the block's state bytes and the
    activations the step saves (ExactMemory's peak), and the bytes a replica all-reduces. `parts`, when
    given, receives each block's ExactMemory report (the planner's breakdown)."""
    step_s, mem, act, grads = [], [], [], []
    for s in stages:
        out = []

        def step(s=s, x=x):
            out[:] = [s.train_step(x, y)[0]]
        with ExactMemory(s.parameters(), device) as m:
            step_s.append(median_s(step, device, steps))
        mem.append(float(state_bytes(m)))
        act.append(float(m.activations_bytes))
        grads.append(float(sum(p.numel() * p.element_size() for p in s.local_parameters())))
        if parts is not None:
            parts.append(m.report()["exact_mem"])
        x = s.decode(out[0])
    return BlockCosts(step_s, mem, grads, act=act)


def measure_allreduce(all_reduce, nbytes: float, device: torch.device, world: int,
                      steps: int = 5) -> tuple[float, float]:
    """(latency s, s per byte) of `all_reduce` (every rank calls it: engine/ranks/placement.py passes
    torch.distributed's on the job's default group): one of a single element, then one of `nbytes`,
    which a ring moves 2 (W-1)/W x per rank."""
    if world < 2 or nbytes <= 0:
        return 0.0, 0.0
    latency, full = (_allreduce_s(all_reduce, n, device, steps) for n in (1, max(1, int(nbytes) // 4)))
    return latency, max(full - latency, 0.0) / (2 * (world - 1) / world * nbytes)


def _allreduce_s(all_reduce, numel: int, device: torch.device, steps: int, clock=time.perf_counter) -> float:
    buf = torch.zeros(numel, device=device)
    synchronize(device)
    return median_s(lambda: all_reduce(buf), device, steps, clock)


def host_allreduce(all_reduce, numels, device: torch.device, world: int, steps: int = 5):
    """The time one rank spends in `all_reduce` on an unlimited link (two local gloo processes: its
    TCP copies, its reductions and the handshakes between them, on the cores that compute;
    docs/plan.md's host term), per call and per byte the rank sends in the ring (2 (W-1)/W of the
    buffer): at each of `numels` float32 elements, the fewest seconds of 3 medians of `steps` calls
    (other load only adds). Returns (wall-clock points, CPU points), each [(bytes sent, seconds)],
    for host.fit_line: the model charges the first (the rank computes nothing meanwhile); the
    second, its CPU alone (time.process_time, every thread), is kept for comparison."""
    _allreduce_s(all_reduce, max(numels), device, 1)  # warm-up: the ring's connections and buffers
    wall, cpu = [], []
    for n in numels:
        nbytes = 2 * (world - 1) / world * 4 * n
        wall.append((nbytes, min(_allreduce_s(all_reduce, n, device, steps) for _ in range(3))))
        cpu.append((nbytes, min(_allreduce_s(all_reduce, n, device, steps, time.process_time) for _ in range(3))))
    return wall, cpu


def measure_codecs(shapes, rows: int, codecs, device: torch.device, steps: int = 3) -> dict:
    """Per codec (engine/wire.CODECS names): the seconds of its encode (Precision.to_wire) and decode
    (from_wire) of each block's output, `rows` samples of each shape in `shapes`."""
    from ..engine.wire import CODECS
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn((rows, *shape), generator=g).to(device) for shape in shapes]
    out = {}
    for name in codecs:
        c = CODECS[name]
        enc, dec = [], []
        for h, shape in zip(hs, shapes):
            x = c.encode(h)
            enc.append(median_s(lambda: c.encode(h), device, steps))
            dec.append(median_s(lambda: c.decode(x, shape), device, steps))
        out[name] = {"encode_s": enc, "decode_s": dec}
    return out


def powersgd_work(matrices, rank: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """(gradient, Q, error) of each gradient PowerSGD compresses at `rank` (methods.powersgd_bytes' rule)."""
    g = torch.Generator().manual_seed(0)
    work = []
    for n, m in matrices:
        r = min(n, m, rank)
        if (n + m) * r * 2 < n * m:
            work.append(tuple(t.to(device) for t in (torch.randn(n, m, generator=g), torch.randn(m, r, generator=g),
                                                     torch.zeros(n, m))))
    return work


def measure_powersgd(matrices, rank: int, device: torch.device, steps: int = 3) -> float:
    """Seconds of PowerSGD's compression arithmetic in one step (torch's powerSGD_hook, per gradient it
    compresses): the error fed back in, P = M Q, P orthogonalised (the hook's _orthogonalize), Q = M^T P,
    the approximation P Q^T and the new error; the all-reduces are not in it."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize
    work = powersgd_work(matrices, rank, device)

    def step():
        for grad, q, err in work:
            m = grad + err
            p = m @ q
            _orthogonalize(p.unsqueeze(0))
            q2 = m.t() @ p
            torch.sub(m, p @ q2.t(), out=err)
    return median_s(step, device, steps) if work else 0.0


def e2e_step(stage, last: bool):
    """One block's share of end-to-end backprop on a batch (h, y): train-mode forward (with its input's
    gradient for every block after the first), then backward; the last block adds its head and the
    cross-entropy, the others stand in ones for the gradient from downstream. The bench's pipeline
    split (bench/stages.py) and the planner time the same step."""
    def step(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = h.detach().requires_grad_(stage.index > 0)
        out = stage.block(h)
        if last:
            F.cross_entropy(stage.objective.head(out), y).backward()
        else:
            out.backward(torch.ones_like(out))
        return out
    return step


@dataclass
class E2E:
    """The end-to-end network (every block, the last block's head, one cross-entropy) at one batch."""
    fwd_s: list[float]  # per block: its forward (train mode, autograd recording)
    bwd_s: list[float]  # per block: its backward
    act: list[float]  # per block: what its forward adds to the saved activations (the last: head and loss too)
    mem: dict  # ExactMemory's report of one whole step (parameters, gradients, optimizer state, activations)
    opt_s: float  # one optimizer step over every parameter


def measure_e2e(stages, x: torch.Tensor, y: torch.Tensor, device: torch.device, optimizer,
                steps: int = 3) -> E2E:
    """The e2e network's blocks timed one at a time (e2e_step, on inputs the blocks before made), then
    one whole step counted by ExactMemory: the saved activations after each block's forward give its
    share; `optimizer(params)` builds the network's optimizer (the job's)."""
    fwd, bwd, h = [], [], x
    for s in stages:
        s.block.train(), s.objective.train()
        step, last = e2e_step(s, s is stages[-1]), s is stages[-1]
        both = median_s(lambda: step(h, y), device, steps)
        inp = h.detach().requires_grad_(s.index > 0)
        forward = median_s(lambda: s.objective.head(s.block(inp)) if last else s.block(inp), device, steps)
        fwd.append(min(forward, both))
        bwd.append(both - fwd[-1])
        with torch.no_grad():
            h = s.block(h)
    params = [p for s in stages for p in s.block.parameters()] + list(stages[-1].objective.head.parameters())
    opt = optimizer(params)
    for p in params:
        p.grad = None
    act, live = [], 0
    with ExactMemory(params, device) as m:
        h = x
        for s in stages:
            h = s.block(h)
            if s is stages[-1]:
                h = F.cross_entropy(s.objective.head(h), y)
            act.append(float(m.live - live))
            live = m.live
        h.backward()
        opt_s = median_s(opt.step, device, steps)
    return E2E(fwd, bwd, act, m.report()["exact_mem"], opt_s)


def profile(build, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device, optimizer, steps: int = 3,
            classes: int | None = None, codecs=("float32", "int8"), powersgd_rank: int = 4):
    """The planner's measurement (methods.Profile) of the network `build()` makes (fresh stages), for
    training at `batch` rows: the decoupled steps and the e2e network, each at len(x) rows and at a
    quarter of them (the per-call part of a step: methods.at_rows), activations scaled by
    batch / len(x) where the two differ (plan.json says so), parameters and bytes exact; the
    encode and decode of every block's output by each of `codecs` (the same two sizes) and
    PowerSGD's compression arithmetic at `powersgd_rank` (the host terms measured in this process;
    host.py measures the communication's)."""
    from ..engine.wire import CODECS
    from .methods import HostCosts, Profile
    b0 = len(x)
    b1 = max(2, b0 // 4)
    local, parts, e2e, stages = _measure_at(build(), x, y, device, optimizer, steps)
    local1, _, e2e1, _ = _measure_at(build(), x[:b1], y[:b1], device, optimizer, steps) if b1 < b0 else \
        (local, None, e2e, None)

    def fit(t0: list[float], t1: list[float]) -> tuple[list[float], list[float]]:
        """(time at `batch`, its per-call part) of each block, on the line through the two sizes; where
        timing noise tilts that line (a smaller batch faster per row, or slower in all), in proportion
        to the rows, or all per call."""
        at, fixed = [], []
        for a, c in zip(t0, t1):
            slope = (a - c) / (b0 - b1) if b1 < b0 else a / b0
            f = a - slope * b0
            slope, f = (0.0, a) if slope < 0 else (a / b0, 0.0) if f < 0 else (slope, f)
            at.append(f + slope * batch)
            fixed.append(f)
        return at, fixed

    scale = batch / b0
    local.step_s, local.fixed_s = fit(local.step_s, local1.step_s)
    local.act = [a * scale for a in local.act]
    for p in parts:
        p["activations_bytes"] *= scale
    both, e2e_fixed = fit([f + b for f, b in zip(e2e.fwd_s, e2e.bwd_s)],
                          [f + b for f, b in zip(e2e1.fwd_s, e2e1.bwd_s)])
    share = [f / (f + b) if f + b else 0.5 for f, b in zip(e2e.fwd_s, e2e.bwd_s)]
    e2e.mem["activations_bytes"] *= scale
    numel = [math.prod(s.out_shape) for s in stages]
    params = [sum(p.numel() * p.element_size() for p in s.block.parameters()) for s in stages]
    head = list(stages[-1].objective.head.parameters())
    params[-1] += sum(p.numel() * p.element_size() for p in head)
    shapes = [p.shape for s in stages for p in s.block.parameters()] + [p.shape for p in head]
    matrices = [(s[0], math.prod(s[1:])) if len(s) > 1 else (math.prod(s), 1) for s in shapes]
    outs = [s.out_shape for s in stages]
    coded = measure_codecs(outs, b0, codecs, device, steps)
    coded1 = measure_codecs(outs, b1, codecs, device, steps) if b1 < b0 else coded
    for name in codecs:
        for what in ("encode", "decode"):
            at, fixed = fit(coded[name][f"{what}_s"], coded1[name][f"{what}_s"])
            coded[name][f"{what}_s"], coded[name][f"{what}_fixed_s"] = at, fixed
    host = HostCosts(codec=coded, powersgd_s=measure_powersgd(matrices, powersgd_rank, device, steps),
                     powersgd_rank=powersgd_rank)
    notes = [] if b0 == batch else [f"measured at batch {b0} (and {b1}) and scaled to {batch}: times on the line "
                                    "through the two sizes, activations in proportion to the rows"]
    return Profile(batch=batch, local=local, local_mem=parts,
                   row_bytes={name: [c.row_bytes(k) for k in numel] for name, c in CODECS.items()}, numel=numel,
                   fwd_s=[t * s for t, s in zip(both, share)], bwd_s=[t * (1 - s) for t, s in zip(both, share)],
                   e2e_fixed_s=e2e_fixed, e2e_act=[a * scale for a in e2e.act], e2e_mem=e2e.mem,
                   e2e_params=[float(p) for p in params], opt_s=e2e.opt_s,
                   matrices=matrices, classes=int(y.max()) + 1 if classes is None else classes, notes=notes,
                   host=host)


def _measure_at(stages, x, y, device, optimizer, steps: int):
    parts: list = []
    local = measure_blocks(stages, x, y, device, steps, parts)
    return local, parts, measure_e2e(stages, x, y, device, optimizer, steps), stages
