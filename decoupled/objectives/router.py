"""Sample routing between blocks (QuickNets across blocks and ranks): a block passes on only the
samples it has not learned, and the next block re-cuts what it receives into batches of its
configured size.

An objective that routes declares it in its spec (objectives/__init__.py, `build_router`); its
stage then owns one router, which owns everything routing needs: the learned-sample rule, the
commitment head's optimizer, the re-batcher on the stage's input and its own state. Every block
has its own router wherever it runs, so the computation does not depend on the placement: the
single-process `simultaneous` trainer and the `sync` engine feed every block the same sequence of
batches, and stay equal bit for bit.

Class-balanced re-batching (objective.quicknet_balance, as the sequential trainer draws its epochs):
the re-batcher pools what the block receives, and each time the pool holds a batch it cuts one by
drawing `data.batch_size` pooled samples WITHOUT replacement, sample i with the sequential trainer's
weight `class_sample_weights(y_i, counts0, balance)` (counts0 = the class sizes of the whole training
set). The rest stay pooled for the next cut and the epoch end flushes the pool, so every received
sample is still trained on exactly once per epoch; balancing only decides which batch it lands in
(a rarer class gets in sooner). The k-th cut draws from generator(seed, "rebatch", block, k): it
depends only on what the block received, never on where it runs, and `k` is the checkpointed state.
"none" keeps the plain FIFO: batches in arrival order, no draw.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..optim import build_optimizer
from ..rng import generator
from .quicknet import class_sample_weights


class Rebatcher:
    """Pool of routed samples, cut into batches of `batch_size`; the remainder at epoch end.

    balance "none": FIFO. Otherwise each cut draws its samples from the pool by class weight
    (module docstring); `class_counts` are the training set's class sizes, `seed` the job seed."""

    def __init__(self, batch_size: int, balance: str = "none", class_counts: torch.Tensor | None = None,
                 seed: int = 0, index: int = 0):
        self.batch_size, self.balance, self.class_counts = batch_size, balance, class_counts
        self.seed, self.index = seed, index
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.count = 0
        self.cuts = 0  # batches cut so far: names the generator of the next draw

    def add(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        if len(y):
            self.parts.append((x, y, ids))
            self.count += len(y)

    def _order(self, y: torch.Tensor, n: int) -> torch.Tensor | None:
        """A permutation of the pool that puts the next batch's `n` samples first, both parts in
        arrival order; None: the pool's own order (FIFO, or the whole pool is the batch)."""
        if self.balance == "none" or n == len(y):
            return None
        if self.class_counts is None:  # stages built for timing or scoring never route real data
            raise ValueError(f"block {self.index}: class-balanced re-batching ({self.balance!r}) needs the "
                             "training set's class counts (build_stages(class_counts=...))")
        w = class_sample_weights(y.cpu(), self.class_counts, self.balance)
        g = generator(self.seed, "rebatch", self.index, self.cuts)
        left = torch.ones(len(y), dtype=torch.uint8)
        left[torch.multinomial(w, n, replacement=False, generator=g)] = 0
        return torch.argsort(left, stable=True).to(y.device)

    def _take(self, n: int):
        xs, ys, ids = (torch.cat(t) for t in zip(*self.parts))
        order = self._order(ys, n)
        if order is not None:
            xs, ys, ids = xs[order], ys[order], ids[order]
        self.cuts += 1
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
        return {"parts": self.parts, "count": self.count, "cuts": self.cuts}

    def load_state_dict(self, sd: dict) -> None:
        self.parts, self.count = sd["parts"], sd["count"]
        self.cuts = sd.get("cuts", 0)  # checkpoints from before balancing cut FIFO only


class LearnedSampleRouter:
    """QuickNets' rule: keep (pass on) the samples the block's exit has not learned. While the block
    trains, its commitment head first takes one BCE step on "the exit is right" (online, since every
    block trains at the same time here); a frozen block only applies the rule."""

    def __init__(self, objective, cfg, index: int, lr: float, class_counts: torch.Tensor | None):
        self.objective = objective
        self.optimizer = build_optimizer(objective.commit.parameters(), cfg.optim, lr)
        # block 0 gets the data loader's full batches, drawn uniformly like every trainer's epoch
        self.rebatcher = (Rebatcher(cfg.data.batch_size, cfg.objective.quicknet_balance, class_counts,
                                    cfg.train.seed, index) if index > 0 else None)

    def keep(self, h: torch.Tensor, res, y: torch.Tensor, work) -> torch.Tensor:
        """(N,) bool: the samples to pass on. `res` is the training step's LocalOutput (None when
        the block is frozen); `work` counts the commitment steps for flops.train_flops. `h`: the block's
        output as the next block reads it (Stage.decode), so every mode routes on the same values."""
        obj = self.objective
        if res is None:
            with torch.no_grad():
                obj.eval()
                res = obj(h, y)
                return ~obj.learned(res, obj.commitment(h), y)
        c, _ = obj.commitment_step(h, res.pred == y, self.optimizer)
        work["commit_step"] += len(y)
        return ~obj.learned(res, c, y)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "rebatcher": self.rebatcher.state_dict() if self.rebatcher else None}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.rebatcher is not None and sd.get("rebatcher"):
            self.rebatcher.load_state_dict(sd["rebatcher"])
