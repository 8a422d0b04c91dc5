"""The data-parallel baselines of `decoupled bench`: the e2e network (every block, the last block's
head, one cross-entropy, built exactly as `train.mode = "e2e"` builds it) on K ranks, each with all of
the network (torch DDP, with its comm hook: ddp, ddp-bf16, ddp-powersgd, localsgd) or a shard of it
(FSDP2: `fully_shard` per block, then the root); bench/strategies.py wraps each.

    torchrun --nproc-per-node=K -m decoupled.bench.dataparallel CONFIG.toml OUT.json ROW [--bucket-mb MB ...]

Trains config epochs (the bench's first is warm-up) and writes one bench row to OUT.json; with
train.eval_every > 0 also the row's curve (test accuracy after every epoch, outside the timed window;
train.eval_every_steps: between an epoch's batches too, on train.eval_subset, as bench/curve.py's points).
Honours the LR schedule (stepped after every epoch, as e2e steps it), train.precision (autocast around
the forward and the loss, a GradScaler for fp16: ShardedGradScaler under FSDP) and
train.activation_checkpointing as the e2e trainer does; refuses early stopping, the plateau rule and
train.e2e_loss="local" before the process group starts (Note [baseline settings] in bench/worker.py).
The row records how it trained (bench/worker.run_fields): global batch, optimizer steps per epoch,
schedule, precision, the first epoch's data order (data_order_sha) and the LR of every epoch (`lrs`).

Note [global batch]: every rank draws the same global batches (data.batches, the e2e row's seed and
order) and takes its part, torch.tensor_split into K nearly equal parts: a batch that K does not
divide gives the first ranks one sample more, and a batch smaller than K leaves some ranks an empty
part (they still run the step, contributing zero). Each rank's loss is its part's summed
cross-entropy times K / len(batch), so the all-reduce's mean over ranks is exactly the global batch's
mean loss whatever the split; on one rank it is the e2e row's loss, computed the same way.

The bench flags a row's strategy reads (bench/knobs.py: --bucket-mb, --powersgd-rank, ...) follow
the row's name; the row records them (`knobs`).

Timing, by the device's events (device.StepTimer: host clocks on CPU, CUDA events on GPU, so the
work and not its launch; read at epoch ends, no host sync in the loop), as the engine times its rows:
compute_s is forward + backward + optimizer step (it includes the all-reduce's or the FSDP
collectives' exposed part: what backward and the step wait for); DDP's comm_s is the gradient
all-reduces' own duration, issue to completion: a comm hook starts a timer when it issues a bucket's
all-reduce and stops it in the future's callback, which runs once the all-reduce has finished (gloo)
or, on CUDA, with a stream current that is ordered after the NCCL kernels (so its event marks their
completion, not their launch); it overlaps backward, so compute + comm can exceed the wall time.
localsgd's averagings run inside the optimizer step, in series: they are comm_s and left out of
compute_s. comm_bytes_per_sample: the bytes the ranks hand to all-reduces across ranks in their
training steps (strategies.Payload), summed over ranks, per training sample; a ring all-reduce puts
2(K-1)/K of that on the links, all of it for K = 2. FSDP2's collectives run on its own streams inside
its pre- and post-hooks and are not separable from compute: comm_s and comm_bytes_per_sample are null
(unavailable, said in the row's notes). idle_s is the rest of the epoch's wall time (data, Python).
Batches are uploaded as the decoupled rows' are: each rank takes its part on the host, copies it from
pinned memory without blocking, and the next batch's copy is issued before the current step
(bench/worker.streamed).

Memory (decoupled/memory.py): DDP runs with gradient_as_bucket_view, so its gradients are its
all-reduce buckets and count once; PowerSGD's error feedback and P / Q memories are comm_state_bytes,
the flat copy local SGD's averager all-reduces is allreduce_bytes; FSDP's parameters, gradients and
optimizer state are the local shards, and the unsharded parameters it all-gathers around each
block's forward and backward are transient communication buffers, not counted (they are parameters,
which the activation count leaves out). The process peak of training (peak_mem_bytes) and of
evaluation (eval_peak_mem_bytes) are measured apart, as for every row (metrics.PeakMemory.evaluating).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import argparse

from ..job import load
from ..data import batches, build_data, num_batches, resolve_augment
from ..device import StepTimer, accel
from ..engine.evaluate import evaluates_at, mid_epoch_test
from ..engine.build import build_rank_stages
from ..engine.precision import AUTOCAST
from ..engine.ranks.world import shutdown
from ..memory import ExactMemory
from ..metrics import PeakMemory
from ..optim import build_optimizer, build_scheduler
from .curve import point
from .knobs import Knobs, add_arguments, from_args
from .runner import median
from .strategies import STRATEGIES, Comm, Strategy
from .worker import order_sha, refuse, run_fields, start, streamed


class E2ENet(nn.Module):
    """The e2e row's network as one module: blocks with their outlets (model.dropout_position), then
    the last block's head; with `checkpointed` (train.activation_checkpointing) each block's activations
    are recomputed in the backward pass, as the e2e trainer does."""

    def __init__(self, stages, checkpointed: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(s.block for s in stages)
        self.outlets = nn.ModuleList(s.outlet for s in stages)
        self.head = stages[-1].objective.head
        self.checkpointed = checkpointed

    def forward(self, x):
        for block, outlet in zip(self.blocks, self.outlets):
            x = outlet(checkpoint(block, x, use_reentrant=False) if self.checkpointed and self.training else block(x))
        return self.head(x)


def amp(cfg, strategy: Strategy, device):
    """train.precision as the e2e trainer applies it: (a torch.autocast context factory, the loss
    scaler: enabled for fp16 only). Under FSDP each rank holds only its shard's gradients, so the
    scaler is torch's ShardedGradScaler, which all-reduces the non-finite check: every rank then skips
    or takes the same steps and keeps the same scale (DDP's gradients are all-reduced already: the
    plain GradScaler, the e2e trainer's, sees the same ones on every rank; localsgd refuses fp16)."""
    dtype, fp16 = AUTOCAST[cfg.train.precision], cfg.train.precision == "fp16"
    if strategy.sharded and fp16:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        scaler = ShardedGradScaler(device.type)
    else:
        scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    return (lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)), scaler


def part(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a global batch (Note [global batch])."""
    return torch.tensor_split(t, world)[rank]


def loss_of(logits, y, n: int, world: int) -> torch.Tensor:
    """Note [global batch]: the mean over ranks of these is the global batch's mean cross-entropy."""
    if world == 1:
        return F.cross_entropy(logits, y)  # the e2e row's own expression
    return F.cross_entropy(logits, y, reduction="sum") * (world / n)


def accuracy(model: nn.Module, test, eval_batch: int, device, rank: int, world: int) -> float:
    """Accuracy of the network on a split (the test set, or the validation split), each rank scoring its
    part of every evaluation batch (uploaded as
    the training batches are), counted on the device and read once."""
    model.eval()
    correct, n = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad():
        for _, (x, y) in streamed(batches(test, eval_batch, shuffle=False), device,
                                  lambda x, y: (part(x, rank, world), part(y, rank, world))):
            correct += (model(x).argmax(-1) == y).sum()
            n += len(y)
    counts = torch.stack([correct, torch.tensor(float(n), dtype=torch.float64, device=device)])
    dist.all_reduce(counts)  # on the device: NCCL carries device tensors only
    model.train()
    return float(counts[0] / counts[1])


def train(cfg, data, model, opt, stepper, scheduler, amp, device, rank: int, world: int, comm: Comm,
          memory: PeakMemory, evaluating) -> dict:
    """Every epoch: timed training as the e2e trainer's epoch (autocast around the forward and the
    loss, the scaler on the step: `stepper`, the optimizer the strategy steps, `opt` inside it), then
    outside the timer the LR schedule's step (as e2e steps it: EarlyStopping.after_epoch) and
    (train.eval_every) the test accuracy of the network `evaluating()` gives (localsgd: the ranks'
    average); with train.eval_every_steps also between the epoch's batches (Note [mid-epoch
    evaluation]), each cut out of the epoch's wall time."""
    B, seed = cfg.data.batch_size, cfg.train.seed
    epochs, curve, train_s, losses, lrs, order, steps = [], [], 0.0, [], [], [], 0
    dev, compute = accel(device), StepTimer(device)
    autocast, scaler = amp
    mine = lambda x, y: (part(x, rank, world), part(y, rank, world))  # noqa: E731  (on the host, then uploaded)
    S = num_batches(len(data.train), B)  # source steps per epoch: every rank draws every global batch
    mid_test = mid_epoch_test(data.test, cfg.train) if cfg.train.eval_every_steps else None
    torch.manual_seed(seed)  # as e2e: one RNG stream (dropout) for the whole network
    for epoch in range(cfg.train.epochs):
        t0, step_losses = time.perf_counter(), []
        compute0, hooked0, inline0 = compute.seconds, comm.hooked.seconds, comm.inline.seconds
        bytes0 = comm.payload.bytes
        wall = 0.0  # the epoch's training time before t0 (its mid-epoch evaluations cut out)
        lrs.append(opt.param_groups[0]["lr"])  # the LR this epoch trains at
        train = batches(data.train, B, seed=seed, epoch=epoch, augment=resolve_augment(cfg.data))
        for b, (x, y) in streamed(train, device, mine):
            c = compute.start()
            comm.payload.on = True
            with autocast():
                loss = loss_of(model(x), y, len(b.y), world)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(stepper)
            scaler.update()
            comm.payload.on = False
            compute.stop(c)
            step_losses.append(loss.detach())
            if epoch == 0:  # the global batches as drawn: every rank the same (Note [global batch])
                order.append(b.ids)
                steps += 1
            count = epoch * S + b.step + 1
            if mid_test is not None and evaluates_at(cfg.train, count, S):
                dev.synchronize()
                wall += time.perf_counter() - t0
                with memory.evaluating(), evaluating():
                    acc = accuracy(model, mid_test, cfg.data.eval_batch_size, device, rank, world)
                curve.append(point(count, S, train_s + wall, acc, len(mid_test)))
                t0 = time.perf_counter()
        dev.synchronize()
        wall += time.perf_counter() - t0
        train_s += wall
        inline = comm.inline.seconds - inline0  # in series inside the steps: comm, not compute
        epochs.append({"wall_s": wall, "compute_s": compute.seconds - compute0 - inline,
                       "comm_s": comm.hooked.seconds - hooked0 + inline, "comm_bytes": comm.payload.bytes - bytes0})
        scheduler.step()  # once per epoch, as the e2e trainer (no plateau rule: refused)
        step = torch.stack(step_losses).float()
        dist.all_reduce(step)  # the global batches' losses (Note [global batch]), outside the timer
        losses += (step / world).tolist()
        if cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0:
            with memory.evaluating(), evaluating():
                acc = accuracy(model, data.test, cfg.data.eval_batch_size, device, rank, world)
            curve.append(point((epoch + 1) * S, S, train_s, acc))
    val_acc = None
    if data.val is not None:  # data.val_fraction: the network's final accuracy on the held-out split (tuning reads it)
        with memory.evaluating(), evaluating():
            val_acc = accuracy(model, data.val, cfg.data.eval_batch_size, device, rank, world)
    return {"epochs": epochs, "curve": curve, "losses": losses, "lrs": lrs, "steps": steps,
            "order": order_sha(order), "val_acc": val_acc}


def train_rank(cfg, data, mode: str, knobs: Knobs, device, rank: int, world: int) -> tuple[dict, list, list]:
    """This rank's training and its report. The DDP / FSDP module lives only in here: it is freed when
    this returns, before the group is destroyed (Note [teardown] in engine/ranks/world.py)."""
    strategy = STRATEGIES[mode]
    stages = build_rank_stages(cfg, data.input_shape, data.num_classes, device, class_counts=data.class_counts)
    net = E2ENet(stages, cfg.train.activation_checkpointing).to(device)
    comm = Comm(StepTimer(device), StepTimer(device))  # (FSDP: unused, its collectives are not separable)
    wrapped = strategy.wrap(net, device, knobs, comm)
    # the e2e row's parameter order: every block, then the last head (outlets hold none)
    params = [p for b in net.blocks for p in b.parameters()] + list(net.head.parameters())
    opt = build_optimizer(params, cfg.optim, cfg.optim.lr)
    scheduler = build_scheduler(opt, cfg.optim, cfg.train.epochs)  # the e2e trainer's, over the same epochs
    memory = PeakMemory(device)
    with ExactMemory(list(net.parameters()), device, allocator_peak=memory.peak_bytes, comm_state=wrapped.state) \
            as exact, comm.payload:
        ran = train(cfg, data, wrapped.model, opt, wrapped.optimizer(opt), scheduler, amp(cfg, strategy, device),
                    device, rank, world, comm, memory, wrapped.evaluating)
    epochs = ran["epochs"]
    timed = epochs[1:] or epochs
    per = lambda key: sum(e[key] for e in timed) / len(timed)  # noqa: E731
    mine = {"rank": rank, "blocks": list(range(len(stages))), **memory.report(),
            **exact.report(), "epoch_s": median([e["wall_s"] for e in timed]), "compute_s": per("compute_s"),
            "comm_s": per("comm_s") if strategy.comm_timed else None,
            "comm_bytes_per_epoch": per("comm_bytes") if strategy.comm_timed else None,
            "idle_s": max(per("wall_s") - per("compute_s"), 0.0),
            "lrs": ran["lrs"], "data_order_sha": ran["order"], "optimizer_steps_per_epoch": ran["steps"],
            "val_acc": ran["val_acc"]}
    return mine, ran["curve"], ran["losses"]


def main(cfg_path: str, out: str, mode: str, knobs: Knobs = Knobs()) -> None:
    cfg = load(cfg_path, ["train.mode=e2e"])  # the e2e row's network, built as run_job.py builds it
    strategy = STRATEGIES[mode]
    refuse(cfg, mode, autocast=True)  # before the process group: no rank waits for a refusing peer
    strategy.refuse(cfg)
    backend, device, rank, world = start(cfg)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, cfg.train.seed)
    mine, curve, losses = train_rank(cfg, data, mode, knobs, device, rank, world)
    reports = [None] * world if rank == 0 else None
    dist.gather_object(mine, reports, dst=0)
    if rank == 0:
        epoch_s = max(r["epoch_s"] for r in reports)
        n = len(data.train)
        row = {"mode": mode, "samples_per_s": n / epoch_s, "epoch_s": epoch_s,
               "ranks": reports, "backend": backend, "losses": losses,
               **run_fields(cfg, reports[0]["optimizer_steps_per_epoch"], reports[0]["data_order_sha"],
                            strategy.declared(knobs, world)),
               "lrs": reports[0]["lrs"], "val_acc": reports[0]["val_acc"],
               "per_rank_batch": [len(part(torch.empty(cfg.data.batch_size), r, world)) for r in range(world)],
               "knobs": {name: getattr(knobs, name) for name in strategy.knobs},
               "comm_bytes_per_sample": sum(r["comm_bytes_per_epoch"] for r in reports) / n
               if strategy.comm_timed else None,
               "notes": [f"{strategy.what} of the e2e network on {world} ranks, global batch {cfg.data.batch_size} "
                         "split by torch.tensor_split (Note [global batch] in bench/dataparallel.py)",
                         *strategy.notes]}
        if strategy.label(knobs, world):
            row["label"] = strategy.label(knobs, world)
        if cfg.train.eval_every:
            row["curve"] = curve
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(row, indent=2))
    shutdown()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node=K -m decoupled.bench.dataparallel")
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("row", choices=list(STRATEGIES))
    add_arguments(p)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(args.config, args.out, args.row, from_args(args))
