"""How a stage turns its local loss into optimizer steps. Every stepper owns the stage's optimizer and
LR schedule, and `_step` is the one optimizer step (through the precision's loss scaler):

- `Plain`: one step per batch.
- A stage held by R replicas (dist.replicas) takes one step per R batches, on their union:

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
from torch import nn

from ..device import StepTimer, accel
from ..memory import count_comm
from .precision import Precision
from .ranks.transport import PeerError
from .stats import StageStats


class Stepper:
    """What every stepper shares: the optimizer, its schedule, and the one step."""

    slots: tuple[int, ...] = (0,)  # the RNG slots this process plays
    parts = 1  # the parts this process splits every batch into (Note [split replicas]: the reference's R)

    def __init__(self, *, optimizer: torch.optim.Optimizer, scheduler, precision: Precision, stats: StageStats):
        self.optimizer, self.scheduler = optimizer, scheduler
        self.precision, self.stats = precision, stats

    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _step(self) -> None:
        scaler = self.precision.scaler
        scaler.step(self.optimizer)
        scaler.update()
        self.stats.updates += 1

    def begin(self) -> int:
        """Before a batch's forward; returns the RNG slot the batch draws from."""
        return 0

    def backward_and_step(self, loss: torch.Tensor, n: int) -> None:
        """After a batch's forward: `loss` is its mean over its `n` samples."""
        raise NotImplementedError

    def settle(self) -> None:
        """Close a step that was deferred (AllReduce); nothing to do otherwise."""

    def end_batch(self) -> None:
        """After the parts of one batch (Note [split replicas]); nothing to do otherwise."""

    def pad_epoch(self) -> None:
        """At a training epoch's end, after its last batch."""

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])


class Plain(Stepper):
    """One optimizer step per batch."""

    def backward_and_step(self, loss: torch.Tensor, n: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.scaler.scale(loss).backward()
        self._step()


class Rounds(Stepper):
    """What both replica steppers share: the round's bookkeeping and its closing arithmetic.
    `modules`: the stage's block and objective, whose buffers a round averages."""

    round_size = 1  # batches this process takes per round
    defer = False  # whether a full round waits for settle() to close (AllReduce: see there)

    def __init__(self, replicas: int, modules: list[nn.Module], **parts):
        super().__init__(**parts)
        self.replicas, self.modules = replicas, modules
        self.missing = False  # AllReduce: this replica lacked some gradient in the round being closed
        self.pos = 0  # batches of the current round taken by this process
        self.n = 0  # their samples
        self.start: list[torch.Tensor] = []  # the buffers when the round began
        self.epoch_batches = 0  # batches this epoch (AllReduce pads the last round with it)
        self.due = False  # a full round not closed yet

    def buffers(self) -> list[torch.Tensor]:
        return [b for m in self.modules for b in m.buffers()]

    def slot(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def begin(self) -> int:
        """A new round zeroes the gradients and records the buffers; a later slot of the same round
        starts from those buffers again, as its replica would."""
        self.settle()
        bufs = self.buffers()
        if self.pos == 0:
            self.optimizer.zero_grad(set_to_none=False)
            self.start = [b.detach().clone() for b in bufs]
        else:
            for b, s in zip(bufs, self.start):
                b.copy_(s)
        return self.slot()

    def backward_and_step(self, loss: torch.Tensor, n: int) -> None:
        """Weighted by its samples: the round's step is on the union of its batches. The round's last
        batch closes the round (or, deferred, makes it due to close at the next settle)."""
        self.precision.scaler.scale(loss * n).backward()
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

    def _average(self, float_sums: list[torch.Tensor], n: torch.Tensor, had: torch.Tensor | None = None) -> None:
        """Gradients / N (`n`: a float32 tensor of one element, on the device: no host sync), float
        buffers = their sum over slots / R, integer counters + 1. `had` (AllReduce): per parameter,
        how many replicas gave it a gradient; 0 = none (read on the host only when some parameter may
        lack one, which this replica knows from its own backward)."""
        n = n.clamp(min=1.0)
        params = self.params()
        if had is not None and self.missing:
            for p, h in zip(params, had.tolist()):
                if h == 0:
                    p.grad = None
        for p in params:
            if p.grad is not None:
                p.grad.div_(n)
        floats = iter(float_sums)
        for b, start in zip(self.buffers(), self.start):
            if b.is_floating_point():
                b.copy_(next(floats).div_(self.replicas))
            elif b.dtype != torch.bool:
                b.copy_(start + 1)
        self.pos, self.n = 0, 0

    def pad_epoch(self) -> None:
        self.epoch_batches = 0


class Accumulate(Rounds):
    """The reference: one process plays every slot of a round in turn. `split` (Note [split replicas]):
    a round is one batch, its slots the batch's parts."""

    def __init__(self, replicas: int, modules: list[nn.Module], split: bool = False, **parts):
        super().__init__(replicas, modules, **parts)
        self.round_size = replicas
        self.parts = replicas if split else 1
        self.slots = tuple(range(replicas))
        self.slot_buffers: list[list[torch.Tensor]] = []

    def slot(self) -> int:
        return self.pos

    def backward_and_step(self, loss: torch.Tensor, n: int) -> None:
        self.slot_buffers.append([b.detach().clone() for b in self.buffers() if b.is_floating_point()])
        super().backward_and_step(loss, n)

    def close(self) -> None:
        """The round's step; slots without a batch (an epoch's last round) contribute the start buffers.
        Closed by the round's last batch, inside that train step's timing."""
        if self.pos == 0:
            return
        start = [b for b in self.start if b.is_floating_point()]
        slots = self.slot_buffers + [start] * (self.replicas - len(self.slot_buffers))
        sums = [sum(parts[1:], parts[0].clone()) for parts in zip(*slots)] if start else []
        self.slot_buffers = []
        self._average(sums, torch.full((1,), float(self.n), device=self.precision.device))
        self._step()

    def end_batch(self) -> None:
        """A batch of fewer rows than parts left its last slots empty: its round steps on what it has."""
        if self.parts > 1:
            self._close_partial()

    def pad_epoch(self) -> None:
        self._close_partial()  # a partial last round steps on what it has
        super().pad_epoch()

    def _close_partial(self) -> None:
        t0 = self.stats.timer.start()  # outside any train step: the step is compute
        self.close()
        self.stats.timer.stop(t0)


class AllReduce(Rounds):
    """One replica of a group: its batches are slot `replica` of successive rounds.

    The round's all-reduce waits for the slowest replica, so it is deferred (`defer`): the rank sends
    the batch's activations downstream first, then settles (pipeline.train_batch), and downstream
    never waits for this group's slowest replica. The step only has to happen before the stage's next
    forward, which `begin` ensures; the outputs were computed before it either way."""

    defer = True

    def __init__(self, replicas: int, modules: list[nn.Module], replica: int, bucket_bytes: float = 25 * 2**20,
                 **parts):
        super().__init__(replicas, modules, **parts)
        self.replica = replica
        self.bucket_bytes = bucket_bytes  # dist.allreduce_bucket_mb
        self.slots = (replica,)
        self.group = None  # the stage group's process group: join, once the ranks are connected
        self.epoch_rounds: int | None = None  # sync: the group's rounds per epoch (pads the last)
        self.comm = StepTimer(self.precision.device)  # the all-reduces: communication, not compute

    def join(self, group, epoch_rounds: int | None) -> None:
        self.group, self.epoch_rounds = group, epoch_rounds

    def slot(self) -> int:
        return self.replica

    def close(self) -> None:
        """All-reduces (sums) over the group of the gradients, in buckets of at most
        dist.allreduce_bucket_mb, then of [float buffers, which parameters had a gradient, n]; then the
        step. A parameter no replica gave a gradient stays without one, so the optimizer skips it as
        it does in the reference. Each bucket is a flat copy, reduced and copied back before the next
        is made, so a replica holds one bucket's copy at a time (memory.ExactMemory's allreduce_bytes:
        the largest). Every replica holds the same parameters, so the buckets and their order are the
        same on each (R2 of note [NCCL communicators]); a sum is elementwise, so bucketing changes no
        result. Not overlapped with the backward: a gradient hook runs on autograd's device thread on
        CUDA, and issuing the group's all-reduces from there and from the training thread would break
        R1 (one thread per communicator); the deferral after the send (above) is the overlap kept."""
        device = self.precision.device
        params = self.params()
        # by fill kernels: a host-to-device copy of a pageable scalar would synchronise the stream
        had = [torch.full((1,), float(p.grad is not None), device=device) for p in params]
        # a parameter ends without a gradient only if every replica had none, so only a replica that
        # had none itself needs to read the counts (on the host)
        self.missing = any(p.grad is None for p in params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        floats = [b for b in self.buffers() if b.is_floating_point()]
        rest = torch.cat([b.reshape(-1).float() for b in floats] + had
                         + [torch.full((1,), float(self.n), device=device)])
        t0 = self.comm.start()
        for bucket in self._buckets(params):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            count_comm(flat)  # training memory too (memory.ExactMemory's allreduce_bytes)
            self._all_reduce(flat)
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
            del flat
        count_comm(rest)
        self._all_reduce(rest)
        self.comm.stop(t0)
        sums, offset = [], 0
        for b in floats:
            sums.append(rest[offset:offset + b.numel()].view_as(b).to(b.dtype))
            offset += b.numel()
        self._average(sums, rest[-1:], rest[offset:offset + len(params)])
        t0 = self.stats.timer.start()  # the step is compute; the all-reduce before it is not
        self._step()
        self.stats.timer.stop(t0)

    def _buckets(self, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
        """Consecutive parameters, each bucket at most bucket_bytes (a larger parameter alone)."""
        buckets: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in params:
            n = p.numel() * p.grad.element_size()
            if buckets[-1] and size + n > self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += n
        return [b for b in buckets if b]

    def _all_reduce(self, flat: torch.Tensor) -> None:
        try:
            accel(flat.device).all_reduce(flat, self.group)  # note [NCCL issue lock]: receivers issue calls too
        except RuntimeError as e:  # a replica died or hung: name it, as a failed link names its peer
            me = dist.get_rank()
            others = [r for r in dist.get_process_group_ranks(self.group) if r != me]
            names = ", ".join(map(str, others))
            raise PeerError(f"rank {me}: gradient all-reduce with replica rank {names} failed or timed out "
                            f"(dist.timeout_s): {e}", others[0] if len(others) == 1 else None) from e

    def pad_epoch(self) -> None:
        """Sync: a replica with fewer batches this epoch than the group has rounds joins the last one
        with nothing (zero gradient, n = 0), so the group's all-reduces pair up. Async epochs end by
        step count, without padding (epoch_rounds None)."""
        self.settle()
        while self.epoch_rounds is not None and self.epoch_batches < self.epoch_rounds:
            self.join_empty()
        super().pad_epoch()

    def join_empty(self) -> None:
        """Join the group's next round with nothing (zero gradient, n = 0): an epoch's padding, or a
        batch whose part here has no rows (Note [split replicas])."""
        self.settle()
        self.begin()
        scaler = self.precision.scaler
        if scaler.is_enabled():
            scaler.scale(torch.zeros((), device=self.precision.device))  # the scale exists before its first step
        self.epoch_batches += 1
        self.close()

    @property
    def comm_s(self) -> float:
        return self.comm.seconds
