"""Sample routing between blocks (QuickNets across ranks): a block passes on only the samples it
has not learned, and the next block re-cuts what it receives into batches of its configured size.

Every block has its own Rebatcher on its input, whichever rank it sits on, so the computation does
not depend on the placement: the single-process `simultaneous` trainer and the `sync` engine feed
every block the same sequence of batches, and stay equal bit for bit.
"""
from __future__ import annotations

from typing import Iterator

import torch


class Rebatcher:
    """FIFO of routed samples, cut into batches of `batch_size`; the remainder at epoch end."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        if len(y):
            self.parts.append((x, y, ids))
            self.count += len(y)

    def _take(self, n: int):
        xs, ys, ids = (torch.cat(t) for t in zip(*self.parts))
        rest = (xs[n:], ys[n:], ids[n:])
        self.parts = [rest] if len(rest[1]) else []
        self.count -= n
        return xs[:n], ys[:n], ids[:n]

    def full(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while self.count >= self.batch_size:
            yield self._take(self.batch_size)

    def flush(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Everything left, as full batches then one smaller one: every sample exactly once."""
        yield from self.full()
        if self.count:
            yield self._take(self.count)
