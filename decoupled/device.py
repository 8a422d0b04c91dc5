"""The one place that turns train.device into a torch.device, and that times device work.

CUDA kernels run asynchronously: a host clock read right after launching them measures the launch,
not the work. `synchronize` makes a wall-clock reading honest at the end of a timed region (and is
a no-op on CPU); the hot loops never call it.
"""
from __future__ import annotations

import os

import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    """"auto" = cuda when available; under torchrun cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA device is visible; use train.device='cpu' or 'auto'")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
