"""Running benchmark and ablation processes, and reading what they leave behind: one fresh process
(or torchrun job) per measurement, its own thread count, a log, a timeout; the machine's facts.
Shared by `decoupled bench` and analysis/ablate.py."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..launch import torchrun_command


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def timed(stamps: list[float]) -> list[float]:
    """Epoch wall times from end-of-epoch stamps; the first stamp closes the warm-up epoch, so
    N+1 stamps give N timed epochs."""
    return [b - a for a, b in zip(stamps, stamps[1:])]


def machine() -> dict:
    import torch

    from ..device import cuda_available, gpu_names
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "loadavg_start": list(os.getloadavg()), "cuda": cuda_available(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    names = gpu_names()
    if names:
        info["gpus"] = names
    return info


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


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


def torchrun(k: int, module_args: list[str]) -> list[str]:
    """K local ranks: the launcher `decoupled train --nproc-per-node K` uses (decoupled/launch.py)."""
    return torchrun_command(k, module_args)


def train_command(config: str | None, sets: list[str], out: Path, ranks: int = 0, threads_env=None) -> list[str]:
    """`decoupled train` with --set overrides into `out`: one process, or torchrun with `ranks`."""
    args = ["decoupled", "train", *(["--config", str(config)] if config else []),
            *[a for o in sets for a in ("--set", o)], "--out", str(out)]
    return torchrun(ranks, args) if ranks else [sys.executable, "-m", *args]


def run(cmd: list[str], log: Path, threads: int, timeout: float, mmap_threshold: int = 0) -> str | None:
    """Run one row's process; None if it worked, else the error (exit code + the log's tail)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        try:
            p = subprocess.run(cmd, env=env(threads, mmap_threshold), stdout=f, stderr=subprocess.STDOUT,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f}s (see {log})"
    if p.returncode != 0:
        tail = [l for l in log.read_text().splitlines()[1:] if l.strip()][-6:]  # [0] is the command
        return f"exit code {p.returncode}: " + " | ".join(tail)
    return None
