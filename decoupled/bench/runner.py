"""What benchmark and ablation processes share, and reading what they leave behind: one fresh process
(or torchrun job) per measurement (its launcher, environment, log and timeout: launcher.py); the
machine's facts. Shared by `decoupled bench` and analysis/ablate.py."""
from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

from .launcher import Job


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


def train_command(config: str | None, sets: list[str], out: Path, ranks: int = 0, threads: int = 1) -> Job:
    """`decoupled train` with --set overrides into `out`: one process, or a torchrun job of `ranks`."""
    args = ["decoupled", "train", *(["--config", str(config)] if config else []),
            *[a for o in sets for a in ("--set", o)], "--out", str(out)]
    return Job(args, ranks, threads)
