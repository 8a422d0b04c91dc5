"""What the baseline workers (dataparallel.py: ddp, fsdp and the slow-link rows; gpipe.py: gpipe /
1f1b) share: the one start-up of a torchrun worker, the batch stream with the next batch's copy
overlapping the current step (as the decoupled rows stream theirs: engine/ranks/sources.prefetched),
which clocks may time what, which training settings they honour and which they refuse (Note
[baseline settings]), and the fields every bench row records of how it trained (run_fields; rows.py
adds them to the other rows).

Device differences go through `decoupled.device.accel(device)` (note [one code path]): neither worker
branches on the device type.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..data import Split, batches
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


# ---------------------------------------------------------------------------- the settings of a row

def refuse(cfg, mode: str, *, autocast: bool) -> None:
    """Note [baseline settings]: a baseline honours every training setting the e2e trainer
    (trainers/e2e.py) honours, exactly as it does, or refuses it here. The workers call this in
    `main` right after loading the config and before the process group exists: every rank reads the
    same config and refuses the same way, so no rank is left waiting for a peer.

    Honoured by every baseline: the LR schedule (optim.build_scheduler, the same LambdaLR, stepped once
    after every epoch as EarlyStopping.after_epoch steps it for e2e; gpipe / 1f1b: every rank its own
    over its own stage's optimizer), train.activation_checkpointing (torch.utils.checkpoint per block),
    train.e2e_loss="ce", train.eval_every_steps (bench --eval-every-steps). The data-parallel rows
    (`autocast`) honour train.precision: torch.autocast around the forward and the loss, and for fp16 a
    GradScaler on the step (fsdp: ShardedGradScaler, whose skip-the-step decision is all-reduced over
    the ranks' shards; localsgd refuses fp16, bench/strategies.py). Refused: early stopping and the
    plateau rule (the bench trains every row for train.epochs), the objective's local loss (not a per-
    sample sum: Note [global batch] could not split it over ranks or microbatches), and in the pipelines
    any precision but fp32."""
    t = cfg.train
    who = f"the {mode} baseline of `decoupled bench`"
    if t.patience:
        raise ConfigError(f"train.patience={t.patience} (early stopping): {who} trains every one of train.epochs "
                          "epochs, as every bench row does; set train.patience=0 (early stopping is the e2e "
                          "trainer's alone: decoupled train --set train.mode=e2e)")
    if t.plateau_factor < 1.0:
        raise ConfigError(f"train.plateau_factor={t.plateau_factor} (LR decay on a plateau of the monitored loss): "
                          f"{who} watches no loss between epochs; set train.plateau_factor=1.0, or decay the LR "
                          "with optim.schedule ('step', 'cosine', 'milestones'), which it steps as e2e does")
    if t.e2e_loss != "ce":
        raise ConfigError(f"train.e2e_loss={t.e2e_loss!r}: {who} trains the e2e network on the cross-entropy of its "
                          "last head's prediction only (an objective's local loss is no per-sample sum, so it "
                          "cannot be split over ranks or microbatches: Note [global batch]); set "
                          "train.e2e_loss='ce'")
    if not autocast and t.precision != "fp32":
        raise ConfigError(f"train.precision={t.precision!r}: {who} trains in fp32 only (torch.distributed."
                          "pipelining fixes each stage's activation dtypes at its first step and runs the "
                          "backward chunks itself, and fp16's loss scaler would need every stage to agree on "
                          "every skipped step); set train.precision='fp32' (the ddp and fsdp rows honour "
                          "bf16 and fp16)")


def schedule_of(cfg) -> dict:
    """The LR schedule a row trains under, with the settings that act on it (optim.build_scheduler: a
    LambdaLR over train.epochs stepped once per epoch; the plateau rule owns the LR instead when
    train.plateau_factor < 1, which only the single-process rows accept)."""
    o, t = cfg.optim, cfg.train
    s = {"name": o.schedule, "scheduler": "LambdaLR", "stepped": "per epoch", "optimizer": o.name, "lr": o.lr,
         "epochs": t.epochs}
    if o.schedule == "step":
        s.update(step_epochs=o.step_epochs, gamma=o.gamma)
    elif o.schedule == "milestones":
        s.update(milestones=list(o.milestones), gamma=o.gamma)
    if t.plateau_factor < 1.0:
        s.update(scheduler="ReduceLROnPlateau", plateau_factor=t.plateau_factor, plateau_patience=t.plateau_patience)
    return s


def order_sha(ids: list[torch.Tensor]) -> str:
    """A short sha256 of an epoch's sample ids in the order they were trained (the batches' `ids`, one
    after another): rows that trained the same samples in the same order have the same one."""
    flat = torch.cat([i.detach().to("cpu", torch.int64).flatten() for i in ids]) if ids else torch.zeros(0)
    return hashlib.sha256(flat.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def data_order_sha(n: int, batch_size: int, seed: int, full_only: bool = False) -> str:
    """order_sha of the first epoch as data.batches draws it for a training split of n samples (the order
    the e2e trainer and the engine's sources train in: it depends on n, the batch and the seed only);
    full_only: the full batches alone (the pipelines drop a partial last batch)."""
    split = Split(torch.empty(n, 0), torch.zeros(n, dtype=torch.int64))
    return order_sha([b.ids for b in batches(split, batch_size, seed=seed, epoch=0)
                      if not full_only or len(b.ids) == batch_size])


def run_fields(cfg, optimizer_steps_per_epoch, order: str, declared: list[str] = ()) -> dict:
    """What every row records of how it trained, for comparing rows: the global batch, optimizer steps
    per epoch, the LR schedule, the precision and the first epoch's data order; `declared_differences`
    says where the row differs from the e2e row by construction."""
    return {"global_batch": cfg.data.batch_size, "optimizer_steps_per_epoch": optimizer_steps_per_epoch,
            "schedule": schedule_of(cfg), "precision": cfg.train.precision, "data_order_sha": order,
            "declared_differences": list(declared)}
