"""The pipeline baselines of `decoupled bench`: the e2e network (every block, then the last block's
head and one global cross-entropy) pipelined over K ranks with torch.distributed.pipelining
(PipelineStage + ScheduleGPipe or Schedule1F1B; "alpha" in PyTorch's docs).

    torchrun --nproc-per-node=K -m decoupled.bench.gpipe CONFIG.toml OUT.json MICROBATCHES [SCHEDULE [SPLIT]]

SCHEDULE: gpipe (default) | 1f1b (needs MICROBATCHES >= K). SPLIT: blocks per rank, comma-separated
(e.g. 3,1): the bench passes each baseline its own best contiguous split (plan/model.best_split on the
measured per-block e2e costs); default: dist.placement or the engine's even split.
Trains config epochs (the first is warm-up) and writes one bench row to OUT.json. Every rank steps
its own optimizer's LR schedule (optim.build_scheduler) once after every epoch, as the e2e trainer
steps the network's; train.activation_checkpointing recomputes each block in the backward chunk, as
e2e does; early stopping, the plateau rule, train.e2e_loss="local" and any train.precision but fp32
are refused before the process group starts (Note [baseline settings] in bench/worker.py). The row
records how it trained (bench/worker.run_fields; data_order_sha over the trained, full batches, and
the partial last batch's drop among its declared_differences) and every rank's LR per epoch (`lrs`). With
train.eval_every (bench --curve) the test accuracy of the network's output after those epochs, outside
the timed window: the test batches flow through the ranks' modules in eval mode by plain send / recv
(every rank knows every batch's size and every block's output shape, so no header), scored on the
last rank; `curve` as the other rows' (train_s: the last rank's cumulative epoch wall time; with
train.eval_every_steps also between an epoch's full batches, on train.eval_subset, cut out of it).

What breaks, measured on torch 2.14.1 / gloo / CPU:
- a stage infers its microbatch shapes at the first step and keeps them: a smaller last batch fails
  on the last stage ("Expected input batch_size (16) to match target batch_size (10)") or in the
  p2p receive. We drop the partial last batch of every epoch and report how many samples that is.
- the schedule's p2p waits cover both transfer and waiting on the neighbour (the bubble); from
  outside gloo they cannot be told apart. comm_s is the time inside `schedule.step` outside the
  stage's forward/backward chunks (p2p waits plus the schedule's own bookkeeping), idle_s the rest
  of the wall time outside compute (data loading, Python). Measured through public methods only:
  no private torch function is patched. (The gloo multi-Work batch-p2p bug, pytorch/pytorch#132644,
  is fixed in this torch by PR #152938: `_wait_batch_p2p` waits on every Work.)

Timing: compute_s (the chunks and the optimizer step) by the device's events (device.StepTimer:
host clocks on CPU, CUDA events on GPU, so the kernels and not their launch, as the engine times its
rows; read at epoch ends). comm_s is a host-clock figure (time in the schedule minus the chunks'),
valid only where the device is the host (bench/worker.host_timed): on CUDA a host clock around
`schedule.step` times queued NCCL calls and launches, not their completion, so there comm_s is null
(unavailable, said in the row's notes) and idle_s is the wall time outside compute. Batches are
uploaded as the decoupled rows' are (rank 0 its inputs, the last rank its labels; pinned,
non_blocking, the next batch's copy issued before the current step: bench/worker.streamed), and the
last stage's losses stay on the device until the epoch's timed window has closed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..job import load
from ..data import batches, build_data, resolve_augment
from ..device import StepTimer, accel
from ..engine.ranks.placement import placement
from ..engine.ranks.world import shutdown
from ..engine.build import init_module
from ..engine.evaluate import evaluates_at, mid_epoch_test
from ..memory import ExactMemory
from ..metrics import PeakMemory
from ..models import build_model
from ..objectives import build_objective
from ..optim import build_optimizer, build_scheduler
from ..rng import derive_seed
from .curve import point
from .runner import median
from .worker import host_timed, order_sha, refuse, run_fields, start, streamed


class TimedStage(PipelineStage):
    """A PipelineStage that times its forward and backward chunks (pure compute) with `timer`, a
    device.StepTimer (the device's events: the kernels on CUDA, the host clock on CPU)."""
    timer: StepTimer

    def forward_one_chunk(self, *args, **kwargs):
        t0 = self.timer.start()
        try:
            return super().forward_one_chunk(*args, **kwargs)
        finally:
            self.timer.stop(t0)

    def backward_one_chunk(self, *args, **kwargs):
        t0 = self.timer.start()
        try:
            return super().backward_one_chunk(*args, **kwargs)
        finally:
            self.timer.stop(t0)


class Checkpointed(nn.Module):
    """A block whose activations are recomputed in the backward chunk (train.activation_checkpointing,
    torch.utils.checkpoint as the e2e trainer applies it per block); a plain forward in eval mode."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False) if self.training else self.block(x)


def build_module(cfg, data, rank: int, world: int, device) -> tuple[nn.Module, list[list[int]], list[tuple]]:
    """This rank's blocks, initialised from the same seeds as the engine's stages; the last rank adds
    the last block's head (the e2e classifier). Also the plan and every block's output shape."""
    seed = cfg.train.seed
    built = build_model(cfg.model, data.input_shape, data.num_classes)
    plan = placement(cfg, len(built.blocks), world)
    parts = []
    for j in plan[rank]:
        init_module(built.blocks[j], derive_seed(seed, "block", j))
        block = Checkpointed(built.blocks[j]) if cfg.train.activation_checkpointing else built.blocks[j]
        parts += [block, built.outlets[j]]  # outlet: dropout after the block (model.dropout_position)
    if rank == world - 1:
        last = len(built.blocks) - 1
        head = build_objective(cfg.objective, built.shapes[last], data.num_classes).head
        init_module(head, derive_seed(seed, "head", last))
        parts.append(head)
    return nn.Sequential(*parts).to(device), plan, built.shapes


@torch.no_grad()
def accuracy(module: nn.Module, cfg, split, plan, shapes, rank: int, world: int, device) -> float | None:
    """Accuracy of the pipelined network on a split (the test set, or the validation split; None except
    on the last rank), batch by batch down the
    ranks; eval mode, so BatchNorm uses its running statistics as every other row's evaluation. Batches
    are uploaded as in training; the last rank counts on the device and reads the count once."""
    module.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for b, (x, y) in streamed(batches(split, cfg.data.eval_batch_size, shuffle=False), device,
                              uploads(rank, world)):
        if rank == 0:
            h = x
        else:
            h = torch.empty((len(b.y), *shapes[plan[rank][0] - 1]), device=device)
            dist.recv(h, rank - 1)
        h = module(h)
        if rank < world - 1:
            dist.send(h.contiguous(), rank + 1)
        else:
            correct += (h.argmax(-1) == y).sum()
    module.train()
    return int(correct) / len(split) if rank == world - 1 else None


def uploads(rank: int, world: int):
    """What a rank uploads of a batch: the inputs on the first rank, the labels on the last."""
    return lambda x, y: (x if rank == 0 else None, y if rank == world - 1 else None)


def full(train, B: int, dropped: list):
    """The full batches of an epoch (see the module docstring: shapes are fixed at the first step);
    the samples of the others are added to dropped[0]."""
    for b in train:
        if len(b.y) == B:
            yield b
        else:
            dropped[0] += len(b.y)


SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def train_epochs(cfg, data, device, stage: TimedStage, schedule, opt, scheduler, rank: int, world: int,
                 evaluate) -> dict:
    """Every epoch through the schedule: per-epoch wall / compute / comm seconds and samples, the
    samples dropped from partial last batches, the last stage's losses, the LR of every epoch, the
    first epoch's optimizer steps and data order, and (train.eval_every) the curve, `evaluate()` after
    the epochs it names, outside the timer. The LR schedule steps after every epoch, outside the
    timer, as the e2e trainer steps it (EarlyStopping.after_epoch)."""
    B, seed = cfg.data.batch_size, cfg.train.seed
    epochs, dropped, losses_seen, curve, train_s, lrs, order = [], 0, [], [], 0.0, [], []
    dev, stepping, on_host = accel(device), StepTimer(device), host_timed(device)
    S = len(data.train) // B  # source steps per epoch: the full batches (the partial last one is dropped)
    mid_epoch = cfg.train.eval_every_steps > 0  # every rank scores the test subset at the same step
    for epoch in range(cfg.train.epochs):
        t0, trained, in_schedule, step_losses, cut = time.perf_counter(), 0, 0.0, [], [0]
        wall = 0.0  # the epoch's training time before t0 (its mid-epoch evaluations cut out)
        lrs.append(opt.param_groups[0]["lr"])  # the LR this epoch trains at
        chunks0, stepping0 = stage.timer.seconds, stepping.seconds
        train = batches(data.train, B, seed=seed, epoch=epoch, augment=resolve_augment(cfg.data))
        for b, (x, y) in streamed(full(train, B, cut), device, uploads(rank, world)):
            opt.zero_grad(set_to_none=True)
            losses: list = []
            args = (x,) if rank == 0 else ()
            kwargs = {"target": y, "losses": losses} if rank == world - 1 else {}
            t_step = time.perf_counter()
            schedule.step(*args, **kwargs)
            in_schedule += time.perf_counter() - t_step
            s = stepping.start()
            opt.step()
            stepping.stop(s)
            trained += len(b.y)
            if epoch == 0:  # the trained (full) batches, as drawn: every rank the same
                order.append(b.ids)
            if losses:  # the microbatches' losses, on the device until the timed window closes
                step_losses.append([loss.detach() for loss in losses])
            count = epoch * S + b.step + 1
            if mid_epoch and evaluates_at(cfg.train, count, S):  # Note [mid-epoch evaluation]
                dev.synchronize()
                wall += time.perf_counter() - t0
                acc, tested = evaluate(mid=True)
                curve.append(point(count, S, train_s + wall, acc, tested))
                t0 = time.perf_counter()
        dev.synchronize()
        wall += time.perf_counter() - t0
        scheduler.step()  # once per epoch, every rank its own, as the e2e trainer (no plateau rule: refused)
        chunks = stage.timer.seconds - chunks0
        # in the schedule, outside the chunks: host clocks on both sides, so only where they time the work
        comm = in_schedule - chunks if on_host else None
        epochs.append({"wall_s": wall, "compute_s": chunks + stepping.seconds - stepping0, "comm_s": comm,
                       "samples": trained})
        if step_losses:  # each step's mean over its microbatches, read in one transfer
            losses_seen += torch.stack([torch.stack(ls).mean() for ls in step_losses]).tolist()
        dropped += cut[0] * (epoch == 0)
        train_s += wall
        if cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0:
            curve.append(point((epoch + 1) * S, S, train_s, evaluate()[0]))
    return {"epochs": epochs, "dropped": dropped, "losses": losses_seen, "curve": curve, "lrs": lrs,
            "steps": len(order), "order": order_sha(order)}


def train_rank(cfg, data, microbatches: int, schedule_name: str, rank: int, world: int, device) -> tuple:
    """This rank's training and its report, with its plan and dropped samples. The stage and schedule
    live only in here: freed when this returns, before the group is destroyed (Note [teardown] in
    engine/ranks/world.py)."""
    module, plan, shapes = build_module(cfg, data, rank, world, device)
    opt = build_optimizer(module.parameters(), cfg.optim, cfg.optim.lr)
    scheduler = build_scheduler(opt, cfg.optim, cfg.train.epochs)  # this stage's: the e2e trainer's, per rank
    stage = TimedStage(module, rank, world, device)
    stage.timer = StepTimer(device)
    schedule = SCHEDULES[schedule_name](stage, n_microbatches=microbatches,
                                        loss_fn=lambda out, y: F.cross_entropy(out, y))
    memory = PeakMemory(device)

    test = mid_epoch_test(data.test, cfg.train) if cfg.train.eval_every_steps else None

    def evaluate(mid: bool = False, split=None) -> tuple[float | None, int]:
        """(accuracy on the last rank, samples scored): the whole test set, mid-epoch its subset, or
        `split` (the validation split)."""
        split = split if split is not None else test if mid else data.test
        with memory.evaluating():
            return accuracy(module, cfg, split, plan, shapes, rank, world, device), len(split)

    with ExactMemory(list(module.parameters()), device, allocator_peak=memory.peak_bytes) as exact:
        ran = train_epochs(cfg, data, device, stage, schedule, opt, scheduler, rank, world, evaluate)
    # data.val_fraction: the network's final accuracy on the held-out split (tuning reads it; the last rank's)
    val_acc = evaluate(split=data.val)[0] if data.val is not None else None
    epochs, dropped, losses_seen, curve = ran["epochs"], ran["dropped"], ran["losses"], ran["curve"]
    timed = epochs[1:] or epochs
    per = lambda key: sum(e[key] for e in timed) / len(timed)  # noqa: E731
    comm = per("comm_s") if timed[0]["comm_s"] is not None else None
    report = {"rank": rank, "blocks": plan[rank], **memory.report(), **exact.report(),
              "epoch_s": median([e["wall_s"] for e in timed]),
              "compute_s": per("compute_s"), "comm_s": comm,
              "idle_s": max(per("wall_s") - per("compute_s") - (comm or 0.0), 0.0),
              "samples": timed[-1]["samples"], "last_loss": losses_seen[-1] if losses_seen else None,
              "curve": curve, "lrs": ran["lrs"], "data_order_sha": ran["order"],
              "optimizer_steps_per_epoch": ran["steps"], "val_acc": val_acc}
    return report, plan, dropped


def main(cfg_path: str, out: str, microbatches: int, schedule_name: str = "gpipe",
         split: list[int] | None = None) -> None:
    cfg = load(cfg_path)
    refuse(cfg, schedule_name, autocast=False)  # before the process group: no rank waits for a refusing peer
    if split:
        cfg.dist.placement = list(split)  # placement() checks it against the world and the blocks
    backend, device, rank, world = start(cfg)
    seed = cfg.train.seed
    torch.manual_seed(seed)
    data = build_data(cfg.data, seed)  # every rank: rank 0 needs the inputs, the last rank the labels

    mine, plan, dropped = train_rank(cfg, data, microbatches, schedule_name, rank, world, device)
    reports = [None] * world if rank == 0 else None
    dist.gather_object(mine, reports, dst=0)
    if rank == 0:
        epoch_s = reports[-1]["epoch_s"]  # the last stage closes every step
        row = {"mode": schedule_name, "samples_per_s": reports[-1]["samples"] / epoch_s, "epoch_s": epoch_s,
               "microbatches": microbatches, "split": [len(g) for g in plan],
               "ranks": reports, "placement": plan, "backend": backend,
               "train_loss_last": reports[-1]["last_loss"],
               "dropped_samples_per_epoch": dropped,
               **run_fields(cfg, reports[-1]["optimizer_steps_per_epoch"], reports[-1]["data_order_sha"],
                            [f"the partial last batch of every epoch is dropped ({dropped} samples; stage shapes "
                             "are fixed at the first step): fewer optimizer steps per epoch, and data_order_sha "
                             "is the order of the full batches"] if dropped else []),
               "lrs": reports[-1]["lrs"], "val_acc": reports[-1]["val_acc"],
               "notes": ["global loss at the last stage (e2e backprop through every block, pipelined)",
                         f"{SCHEDULES[schedule_name].__name__} with {microbatches} microbatches of "
                         f"{cfg.data.batch_size // microbatches} samples",
                         "partial last batches are dropped: stage shapes are fixed at the first step"]}
        if reports[-1]["comm_s"] is None:
            row["notes"].append("comm_s unavailable: it is host time in the schedule outside the chunks, and on "
                                f"{device.type} a host clock times the p2p calls' launch, not their completion "
                                "(idle_s is then the wall time outside compute)")
        if cfg.train.eval_every:
            row["curve"] = reports[-1]["curve"]  # scored on the last rank, on its clock
        for r in reports:
            r.pop("curve")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(row, indent=2))
    shutdown()


if __name__ == "__main__":
    if not 4 <= len(sys.argv) <= 6 or (len(sys.argv) > 4 and sys.argv[4] not in SCHEDULES):
        sys.exit("usage: torchrun --nproc-per-node=K -m decoupled.bench.gpipe CONFIG.toml OUT.json MICROBATCHES "
                 "[gpipe|1f1b [SPLIT e.g. 3,1]]")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "gpipe",
         [int(v) for v in sys.argv[5].split(",")] if len(sys.argv) > 5 else None)
