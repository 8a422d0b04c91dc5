"""Sample routing between blocks (QuickNets across blocks and ranks): a block passes on only the
samples it has not learned, and the next block re-cuts what it receives into batches of its
configured size.

An objective that routes declares it in its spec (objectives/__init__.py, `build_router`); its
stage then owns one router, which owns everything routing needs: the learned-sample rule, the
commitment head's optimizer, the re-batcher on the stage's input and its own state. Every block
has its own router wherever it runs, so the computation does not depend on the placement: the
single-process `simultaneous` trainer and the `sync` engine feed every block the same sequence of
batches, and stay equal bit for bit.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from ..config import JobConfig
from ..optim import build_optimizer


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

    def state_dict(self) -> dict:
        return {"parts": self.parts, "count": self.count}

    def load_state_dict(self, sd: dict) -> None:
        self.parts, self.count = sd["parts"], sd["count"]


class LearnedSampleRouter:
    """QuickNets' rule: keep (pass on) the samples the block's exit has not learned. While the block
    trains, its commitment head first takes one BCE step on "the exit is right" (online, since every
    block trains at the same time here); a frozen block only applies the rule."""

    def __init__(self, objective, cfg: JobConfig, index: int, lr: float):
        self.objective = objective
        self.optimizer = build_optimizer(objective.commit.parameters(), cfg.optim, lr)
        self.rebatcher = Rebatcher(cfg.data.batch_size) if index > 0 else None  # block 0 gets full batches

    def keep(self, h: torch.Tensor, res, y: torch.Tensor, work) -> torch.Tensor:
        """(N,) bool: the samples to pass on. `res` is the training step's LocalOutput (None when
        the block is frozen); `work` counts the commitment steps for flops.train_flops."""
        obj, h = self.objective, h.float()  # h arrives in the wire dtype (dist.wire_dtype)
        if res is None:
            with torch.no_grad():
                obj.eval()
                res = obj(h, y)
                return ~obj.learned(res, obj.commitment(h), y)
        obj.train()
        c = obj.commitment(h)
        loss = F.binary_cross_entropy_with_logits(c, (res.pred == y).to(c.dtype))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        obj.commit_trained.fill_(True)
        work["commit_step"] += len(y)
        return ~obj.learned(res, c.detach(), y)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "rebatcher": self.rebatcher.state_dict() if self.rebatcher else None}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.rebatcher is not None and sd.get("rebatcher"):
            self.rebatcher.load_state_dict(sd["rebatcher"])
