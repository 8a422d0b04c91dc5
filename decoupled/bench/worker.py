"""What the baseline workers (dataparallel.py: ddp / fsdp; gpipe.py: gpipe / 1f1b) share: the one
start-up of a torchrun worker, the batch stream with the next batch's copy overlapping the current
step (as the decoupled rows stream theirs: engine/ranks/sources.prefetched), and which clocks may
time what.

Device differences go through `decoupled.device.accel(device)` (note [one code path]): neither worker
branches on the device type.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ..device import accel
from ..engine.ranks.sources import prefetched
from ..engine.ranks.world import start_process_group


def start(cfg) -> tuple[str, torch.device, int, int]:
    """The engine's worker start-up (world.start_process_group: backend and device, NCCL defaults,
    this thread bound to its device, the default group created eagerly on it). Returns (backend,
    device, rank, world size)."""
    backend, device, _ = start_process_group(cfg)
    return backend, device, dist.get_rank(), dist.get_world_size()


def host_timed(device: torch.device) -> bool:
    """Whether host clocks time the work of `device`: only where the device is the host. On an
    accelerator a host clock read after a kernel launch or a communication call measures its launch,
    not its work (the device's events do: device.StepTimer), so a figure that only host clocks can
    give is reported as unavailable (None) there (the device layer's `host_clock`)."""
    return accel(device).host_clock


def streamed(batches: Iterable, device: torch.device, take: Callable) -> Iterator[tuple]:
    """(batch, its device tensors): `take(x, y)` picks the host tensors this rank uses (its part of the
    batch; None for one it does not use), uploaded from pinned memory by non_blocking copies, the next
    batch's copies issued before the current batch is yielded (sources.prefetched), so on CUDA they
    overlap the current step. On the host the upload is the identity."""
    dev = accel(device)

    def to_device(x, y, ids):
        return [None if t is None else dev.upload(t)[0] for t in take(x, y)]
    return prefetched(batches, to_device)
