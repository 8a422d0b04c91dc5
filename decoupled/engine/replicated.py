"""A stage held by R replicas (dist.replicas) takes one optimizer step per R batches, on their union:

    grad = sum_i grad(n_i * loss_i) / N,   N = sum_i n_i   (batch i has n_i samples)

Two ways to get there, equal bit for bit where the sum's order allows (always at R = 2):
- `Accumulate` (train.mode="simultaneous", the reference): one process holds all R slots; slot i
  is the i-th batch of a round; autograd accumulates the R gradients, the step closes the round.
- `AllReduce` (sync / async): replica i holds slot i only; every batch is a round, closed by one
  all-reduce (sum) of the gradients over the group's process group, so every replica steps with the
  same gradient and the parameters stay identical. At the end of a sync epoch whose batches do not
  divide by R, a replica without a batch in the last round joins it with zero gradient and n = 0.

Every slot has its own RNG stream (dropout), seeded from (seed, block, slot); slot 0's is the stream
of a stage without replicas. BatchNorm: each slot normalises its own batch (training-mode statistics
are per replica); the running statistics are averaged over the slots when the round closes (float
buffers: sum / R; a slot without a batch contributes the round's starting values), and integer
buffers (num_batches_tracked) advance by one per round. With dist.sync_bn (CUDA) SyncBatchNorm
normalises over the union instead; then the averaging leaves identical buffers as they are.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..device import StepTimer
from .ranks.transport import PeerError, issue


def _buffers(stage) -> list[torch.Tensor]:
    return [b for m in (stage.block, stage.objective) for b in m.buffers()]


class Rounds:
    """What both ways share: the round's bookkeeping and its closing arithmetic."""

    def __init__(self, stage, replicas: int):
        self.stage, self.replicas = stage, replicas
        self.missing = False  # AllReduce: this replica lacked some gradient in the round being closed
        self.pos = 0  # batches of the current round taken by this process
        self.n = 0  # their samples
        self.start: list[torch.Tensor] = []  # the buffers when the round began
        self.epoch_batches = 0  # batches this epoch (AllReduce pads the last round with it)

    round_size = 1  # batches this process takes per round
    defer = False  # whether a full round waits for settle() to close (AllReduce: see there)
    due = False  # a full round not closed yet

    def slot(self) -> int:
        raise NotImplementedError

    def end(self, n: int) -> None:
        """After a batch's backward: count it; the round's last batch closes the round (or, deferred,
        is due to close at the next settle)."""
        self.n += n
        self.pos += 1
        self.epoch_batches += 1
        if self.pos == self.round_size:
            self.due = True
            if not self.defer:
                self.settle()

    def settle(self) -> None:
        """Close a round that is due. Called before anything reads or changes the stage's state (the
        next batch, the epoch's padding and end, which come before any checkpoint), so deferring
        never changes what is computed."""
        if self.due:
            self.due = False
            self.close()

    def begin(self) -> None:
        """Before a batch's forward: a new round zeroes the gradients and records the buffers; a later
        slot of the same round starts from those buffers again, as its replica would."""
        self.settle()
        bufs = _buffers(self.stage)
        if self.pos == 0:
            self.stage.optimizer.zero_grad(set_to_none=False)
            self.start = [b.detach().clone() for b in bufs]
        else:
            for b, s in zip(bufs, self.start):
                b.copy_(s)

    def _finish(self, float_sums: list[torch.Tensor], n: torch.Tensor, had: torch.Tensor | None = None) -> None:
        """Gradients / N (`n`: a float32 tensor of one element, on the device: no host sync), float
        buffers = their sum over slots / R, integer counters + 1; then the step. `had` (AllReduce):
        per parameter, how many replicas gave it a gradient; 0 = none (read on the host only when
        some parameter may lack one, which the stage knows from its own backward)."""
        s = self.stage
        n = n.clamp(min=1.0)
        params = s.local_parameters()
        if had is not None and self.missing:
            for p, h in zip(params, had.tolist()):
                if h == 0:
                    p.grad = None
        for p in params:
            if p.grad is not None:
                p.grad.div_(n)
        floats = iter(float_sums)
        for b, start in zip(_buffers(s), self.start):
            if b.is_floating_point():
                b.copy_(next(floats).div_(self.replicas))
            elif b.dtype != torch.bool:
                b.copy_(start + 1)
        t0 = s.timer.start()  # the step is compute; the all-reduce before it is not
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.timer.stop(t0)
        s.updates += 1
        self.pos, self.n = 0, 0

    def pad_epoch(self, rounds: int | None) -> None:
        self.epoch_batches = 0


class Accumulate(Rounds):
    """The reference: one process plays every slot of a round in turn."""

    def __init__(self, stage, replicas: int):
        super().__init__(stage, replicas)
        self.round_size = replicas
        self.slot_buffers: list[list[torch.Tensor]] = []

    def slot(self) -> int:
        return self.pos

    def end(self, n: int) -> None:
        self.slot_buffers.append([b.detach().clone() for b in _buffers(self.stage) if b.is_floating_point()])
        super().end(n)

    def close(self) -> None:
        """The round's step; slots without a batch (an epoch's last round) contribute the start buffers."""
        if self.pos == 0:
            return
        start = [b for b in self.start if b.is_floating_point()]
        slots = self.slot_buffers + [start] * (self.replicas - len(self.slot_buffers))
        sums = [sum(parts[1:], parts[0].clone()) for parts in zip(*slots)] if start else []
        self.slot_buffers = []
        self._finish(sums, torch.full((1,), float(self.n), device=self.stage.device))

    def pad_epoch(self, rounds: int | None) -> None:
        self.close()  # a partial last round steps on what it has
        super().pad_epoch(rounds)


class AllReduce(Rounds):
    """One replica of a group: its batches are slot `replica` of successive rounds.

    The round's all-reduce waits for the slowest replica, so it is deferred (`defer`): the rank sends
    the batch's activations downstream first, then settles (pipeline.train_batch), and downstream
    never waits for this group's slowest replica. The step only has to happen before the stage's next
    forward, which `begin` ensures; the outputs were computed before it either way."""

    defer = True

    def __init__(self, stage, replicas: int, replica: int, group=None):
        super().__init__(stage, replicas)
        self.replica, self.group = replica, group  # the group: Stage.join, once the ranks are connected
        self.timer = StepTimer(stage.device)  # the all-reduces: communication, not compute

    def slot(self) -> int:
        return self.replica

    def close(self) -> None:
        """One all-reduce of [gradients, float buffers, which parameters had a gradient, n] over the
        group, then the step. A parameter no replica gave a gradient stays without one, so the
        optimizer skips it as it does in the reference."""
        s = self.stage
        params = s.local_parameters()
        # by fill kernels: a host-to-device copy of a pageable scalar would synchronise the stream
        had = [torch.full((1,), float(p.grad is not None), device=s.device) for p in params]
        # a parameter ends without a gradient only if every replica had none, so only a replica that
        # had none itself needs to read the counts (on the host)
        self.missing = any(p.grad is None for p in params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        floats = [b for b in _buffers(s) if b.is_floating_point()]
        parts = [p.grad.reshape(-1) for p in params] + [b.reshape(-1).float() for b in floats]
        flat = torch.cat(parts + had + [torch.full((1,), float(self.n), device=s.device)])
        t0 = self.timer.start()
        self._all_reduce(flat)
        self.timer.stop(t0)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        sums = []
        for b in floats:
            sums.append(flat[offset:offset + b.numel()].view_as(b).to(b.dtype))
            offset += b.numel()
        self._finish(sums, flat[-1:], flat[offset:offset + len(params)])

    def _all_reduce(self, flat: torch.Tensor) -> None:
        try:
            with issue(flat.device):  # note [NCCL issue lock]: the receiver threads issue NCCL calls too
                dist.all_reduce(flat, group=self.group)
        except RuntimeError as e:  # a replica died or hung: name it, as a failed link names its peer
            me = dist.get_rank()
            others = [r for r in dist.get_process_group_ranks(self.group) if r != me]
            names = ", ".join(map(str, others))
            raise PeerError(f"rank {me}: gradient all-reduce with replica rank {names} failed or timed out "
                            f"(dist.timeout_s): {e}", others[0] if len(others) == 1 else None) from e

    def pad_epoch(self, rounds: int | None) -> None:
        """Sync: a replica with fewer batches this epoch than the group has rounds joins the last one
        with nothing (zero gradient, n = 0), so the group's all-reduces pair up."""
        self.settle()
        while rounds is not None and self.epoch_batches < rounds:
            s = self.stage
            self.begin()
            if s.scaler.is_enabled():
                s.scaler.scale(torch.zeros((), device=s.device))  # the scale exists before its first step
            self.epoch_batches += 1
            self.close()
        super().pad_epoch(rounds)

    @property
    def comm_s(self) -> float:
        return self.timer.seconds
