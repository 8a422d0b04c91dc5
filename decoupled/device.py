"""The one place that turns train.device into a torch.device, and that times device work.

CUDA kernels run asynchronously: a host clock read right after launching them measures the launch,
not the work. `synchronize` makes a wall-clock reading honest at the end of a timed region (and is
a no-op on CPU); the hot loops never call it.
"""
from __future__ import annotations

import os
import time

import torch

from .config import ConfigError


def local_cuda_index() -> int:
    """This process's GPU: LOCAL_RANK modulo the visible devices, so one GPU per process made visible
    with CUDA_VISIBLE_DEVICES (every rank then sees a single device 0) works as well as all visible."""
    local, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    return local % visible if visible else local


def resolve_device(name: str) -> torch.device:
    """"auto" = cuda when available; under torchrun cuda:(LOCAL_RANK mod visible devices)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA device is visible; use train.device='cpu' or 'auto'")
        return torch.device("cuda", local_cuda_index())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Seconds spent in timed regions of work. CPU: the wall clock. CUDA: a pair of events around each
    region, read back lazily (when `seconds` is asked for, at epoch ends), so timing adds no host
    sync to the hot loop and measures the kernels, not their launch."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.total = 0.0
        self.pending: list = []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, t0) -> None:
        if not self.cuda:
            self.total += time.perf_counter() - t0
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.pending.append((t0, ev))
        if len(self.pending) > 256:  # fold in what has finished, without waiting
            while self.pending and self.pending[0][1].query():
                a, b = self.pending.pop(0)
                self.total += a.elapsed_time(b) / 1000

    @property
    def seconds(self) -> float:
        for a, b in self.pending:
            b.synchronize()
            self.total += a.elapsed_time(b) / 1000
        self.pending.clear()
        return self.total
