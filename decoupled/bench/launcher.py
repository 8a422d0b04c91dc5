"""Jobs, launchers, and the supervisor that runs a job's processes as one.

A `Job` is what one measurement runs: `python -m MODULE_ARGS...` as one process (nproc 0) or as a
torchrun job of nproc ranks, with its intra-op thread count and any extra environment. A launcher
renders it into the processes that run it:
  Local        on this machine: one process, or one torchrun agent with --standalone (the command
               `decoupled train --nproc-per-node N` runs, decoupled/launch.py)
  cluster.Nodes  one torchrun agent per emulated node, each inside its node's network namespace
`run` starts them, waits, and stops every one (each process, then what it started) on the first
failure, on the timeout, or when the bench itself is interrupted: an agent left alone would wait
for a peer that is gone until its rendezvous times out.

Note [one launcher per bench]. Every process of one bench invocation (rows, the stages worker,
tuning candidates, seeds, sweeps, the guard) runs through the launcher in use (`using`, set by
bench/cli.py for the whole invocation; Local otherwise), so no part of a bench can run somewhere
else than the rest, and the functions between the CLI and `run` do not pass a launcher along.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..launch import torchrun_command

GRACE_S = 10.0  # a stopped agent's time to stop its own workers (SIGTERM) before everything is killed
POLL_S = 0.2


@dataclass(frozen=True)
class Job:
    module_args: list[str]  # `python -m` these
    nproc: int = 0  # torchrun ranks; 0: one plain process
    threads: int = 1  # OMP_NUM_THREADS of every process (env)
    env: dict = field(default_factory=dict)  # on top of env()


def env(threads: int, mmap_threshold: int = 0) -> dict:
    # One process = `threads` intra-op threads (1 per rank on CPU): no rank steals another's core.
    e = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if mmap_threshold:
        # glibc raises its mmap threshold whenever a large block is freed, so after the first step
        # activations come from the heap and VmHWM grows with fragmentation (block 0 of a VGG alone:
        # 45 MiB after one step, 76 MiB after five). A fixed threshold maps every tensor above it
        # on its own and unmaps it when freed: VmHWM then tracks live tensor bytes. It costs page
        # faults (train steps 1.3-2.7x slower), so only the memory-only sweep uses it by default.
        e["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    return e


@dataclass(frozen=True)
class Proc:
    argv: list[str]
    env: dict  # on top of the job's environment
    name: str = ""  # "" for the job's first process (its log is the job's log); else a suffix of its own log

    def line(self) -> str:
        """The process as a shell line (what the log's first line and a row's `cmd` say)."""
        return " ".join([*(f"{k}={v}" for k, v in self.env.items()), *self.argv])


class Local:
    """Everything on this machine (the bench's default)."""
    link = None  # no link between ranks but this machine's loopback
    where = None  # where a row ran, as resume.py keys it
    record = None  # the link's record (cluster.Nodes: its measured rate)

    @staticmethod
    def tx_bytes() -> list[int]:
        return []

    def render(self, job: Job) -> list[Proc]:
        if job.nproc:
            return [Proc(torchrun_command(job.nproc, job.module_args), {})]
        return [Proc([sys.executable, "-m", *job.module_args], {})]


_IN_USE: list = [Local()]


@contextlib.contextmanager
def using(launcher):
    """Run every job of the block through `launcher` (Note [one launcher per bench])."""
    _IN_USE.append(launcher)
    try:
        yield launcher
    finally:
        _IN_USE.pop()


def launcher():
    return _IN_USE[-1]


@contextlib.contextmanager
def signals_exit():
    """SIGTERM and SIGHUP raise SystemExit (128 + the signal) instead of ending the process where it
    stands, so every `finally` on the way out runs: `run` stops its job's processes, cluster.Cluster
    removes its namespaces. Python does so for SIGINT (KeyboardInterrupt) already."""
    import threading
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)
    before = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def describe(job: Job) -> str:
    """The job's processes as shell lines, as the launcher in use runs them."""
    return " & ".join(p.line() for p in launcher().render(job))


def log_of(log: Path, p: Proc) -> Path:
    return log if not p.name else log.with_name(f"{log.stem}.{p.name}{log.suffix}")


def run(job: Job, log: Path, timeout: float, mmap_threshold: int = 0) -> str | None:
    """Run one job's processes; None if every one exited 0, else the error: the first failure's exit
    code and log tail (the others stopped), or the timeout. Each process logs to its own file (the
    first to `log`), which starts with its command line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    base = {**env(job.threads, mmap_threshold), **job.env}
    procs, files, started = launcher().render(job), [], []
    try:
        for p in procs:
            f = open(log_of(log, p), "w")
            files.append(f)
            f.write(p.line() + "\n\n")
            f.flush()
            # a session of its own: a Ctrl-C of the bench reaches the bench alone, which stops the job
            started.append(subprocess.Popen(p.argv, env={**base, **p.env}, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        t0 = time.monotonic()
        while True:
            codes = [s.poll() for s in started]
            bad = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
            if bad is not None:
                return _failure(procs[bad], codes[bad], log_of(log, procs[bad]))
            if all(c == 0 for c in codes):
                return None
            if time.monotonic() - t0 > timeout:
                return f"timed out after {timeout:.0f}s (see {log})"
            time.sleep(POLL_S)
    finally:
        stop(started)
        for f in files:
            f.close()


def _failure(p: Proc, code: int, log: Path) -> str:
    tail = [line for line in log.read_text().splitlines()[1:] if line.strip()][-6:]  # [0] is the command
    return f"{p.name + ': ' if p.name else ''}exit code {code}: " + " | ".join(tail)


def stop(started: list[subprocess.Popen]) -> None:
    """Stop every process still running and everything it started. torchrun's workers run in
    sessions of their own, so they are found (psutil) before their agent is asked to stop them
    (SIGTERM), and killed if they outlive it by GRACE_S."""
    import psutil
    alive = [s for s in started if s.poll() is None]
    trees = {}
    for s in alive:
        try:
            trees[s] = psutil.Process(s.pid).children(recursive=True)
        except psutil.Error:
            trees[s] = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(s.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for s in alive:
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.wait(max(0.0, deadline - time.monotonic()))
    for s, kids in trees.items():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(s.pid, signal.SIGKILL)
        for k in kids:
            with contextlib.suppress(psutil.Error):
                k.kill()  # psutil refuses a pid that was reused by another process
        s.wait()
