"""The host's share of communication on a CPU backend, measured between two local gloo processes
(docs/plan.md, "The model": the host terms; plan/model.py Note [host costs]).

On gloo a collective's TCP copies and reductions, and the transport's packing, copies and
rendezvous, run on the same cores as the ranks' compute: time a rank does not compute in.

- `allreduce`: measure.host_allreduce on torch.distributed's all_reduce (the very collective DDP,
  local SGD and a replica group run) at a few sizes, fitted as a fixed part per call plus a part
  per byte a rank sends in the ring (2 (W-1)/W of the buffer): wall-clock time on an unlimited link,
  the time the rank spends in the collective (its CPU alone, time.process_time, is kept beside it:
  about a third of it here, the rest the handshakes of the ring's steps);
- `send`, `recv`: the CPU time (time.process_time: every thread of the process, gloo's included; a
  busy machine slows the measurement's clock but not what it counts) of the project's transport
  (engine/ranks/transport.Link, the decoupled ranks' links: its sends and its receiver thread run
  beside the compute) carrying training messages of a few sizes (transport.message_bytes), each
  side's per message (the fewest of ROUNDS rounds, the sizes in turn, after a warm-up) fitted as a
  fixed part plus a part per byte. The sender pauses PACE_S before each message, as a training
  step separates them: back to back, gloo's receiving threads stay busy between messages (on this
  2-core machine, under load, 2-3 ms of CPU a 5 kB message against ~0.3 ms paced), which training
  does not see.

Two processes on loopback: a link's rate does not enter (that is the model's wire term); what is
left is the host's work. `measure_host` spawns them (seconds: two fresh interpreters import torch).
"""
from __future__ import annotations

import os
import socket
import time
from queue import Empty
from dataclasses import dataclass

ALLREDUCE_NUMEL = (1024, 262_144, 2_097_152)  # 4 KiB, 1 MiB, 8 MiB of float32
MESSAGE_WIDTHS = (16, 1024, 8192)  # float32 features a sample, 64 samples a message: ~5 KiB .. ~2 MiB
MESSAGE_ROWS = 64
ROUNDS = 3
PACE_S = 0.002  # the sender's pause before each message: a training step's worth of time between messages


@dataclass
class HostFit:
    fixed_s: float = 0.0  # CPU seconds per call / message
    s_per_byte: float = 0.0  # CPU seconds per byte (a ring's bytes per rank, or a message's)


def fit_line(points: list[tuple[float, float]]) -> HostFit:
    """Least squares of seconds on bytes, both parts kept non-negative (a negative intercept: all per
    byte; a negative slope: all fixed, the mean)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    fixed = my - slope * mx
    if slope < 0:
        return HostFit(max(my, 0.0), 0.0)
    if fixed < 0:
        return HostFit(0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points))
    return HostFit(fixed, slope)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, steps: int, messages: int, queue) -> None:
    """One of the two processes: the all-reduces, then the transport (rank 0 sends, rank 1 receives)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from ..engine.ranks.transport import Kind, Link, Message, message_bytes
    from ..engine.wire import CODECS
    from .measure import host_allreduce
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        ar, ar_cpu = (fit_line(p) for p in host_allreduce(dist.all_reduce, ALLREDUCE_NUMEL, cpu, 2, steps))
        group = dist.new_group([0, 1])
        link = Link(group, 1 - rank, cpu, 120.0, MESSAGE_ROWS, max_inflight=2)
        n = MESSAGE_ROWS

        def cpu_per_message(width: int, count: int) -> float:
            m = Message(Kind.TRAIN, 0, 0, torch.randn(n, width), torch.zeros(n, dtype=torch.int64), torch.arange(n))
            dist.barrier(group)
            link.send(m) if rank == 0 else link.recv()  # a size change is announced first: not timed
            link.flush()
            dist.barrier(group)
            c0 = time.process_time()
            for _ in range(count):
                if rank == 0:
                    time.sleep(PACE_S)  # no CPU: process_time does not count it
                    link.send(m)
                else:
                    link.recv()
            link.flush()
            return (time.process_time() - c0) / count
        for width in (max(MESSAGE_WIDTHS), min(MESSAGE_WIDTHS)):  # warm-up: connections, buffers, threads
            cpu_per_message(width, messages)
        best = {w: float("inf") for w in MESSAGE_WIDTHS}
        for _ in range(ROUNDS):  # the sizes in turn, the fewest CPU seconds of each (other load only adds)
            for w in MESSAGE_WIDTHS:
                best[w] = min(best[w], cpu_per_message(w, messages))
        points = [(float(message_bytes(n, CODECS["float32"].row_bytes(w))), best[w]) for w in MESSAGE_WIDTHS]
        dist.barrier(group)
        queue.put((rank, {"allreduce": ar, "allreduce_cpu": ar_cpu, "message": fit_line(points), "points": points}))
    finally:
        dist.destroy_process_group()


def measure_host(steps: int = 5, messages: int = 30, timeout_s: float = 300.0) -> dict:
    """{"allreduce": HostFit, "send": HostFit, "recv": HostFit, "points": raw} from two local gloo
    processes: each all-reduce fit the larger of the two ranks' (they run the same ring)."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, steps, messages, queue), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < 2:
            try:
                rank, res = queue.get(timeout=1.0)
                got[rank] = res
            except Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    why = f"failed (exit codes {dead})" if dead else f"timed out after {timeout_s:g} s"
                    raise RuntimeError(f"the two gloo processes {why}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    ar = max((got[r]["allreduce"] for r in (0, 1)), key=lambda f: (f.s_per_byte, f.fixed_s))
    ar_cpu = max((got[r]["allreduce_cpu"] for r in (0, 1)), key=lambda f: (f.s_per_byte, f.fixed_s))
    return {"allreduce": ar, "send": got[0]["message"], "recv": got[1]["message"],
            "points": {"send": got[0]["points"], "recv": got[1]["points"],
                       "allreduce_cpu": {"fixed_s": ar_cpu.fixed_s, "s_per_byte": ar_cpu.s_per_byte}}}
