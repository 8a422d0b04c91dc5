"""A stage is what one worker owns for one block: the block, its objective (head + local loss),
its optimizer and LR schedule, and its private RNG stream.

Every random choice a stage makes is seeded from (job seed, block index), never from the order in
which stages happen to be built or run; that makes the single-process trainers and the
distributed engine produce the same numbers.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from ..job import JobConfig
from ..device import StepTimer
from ..models import build_model
from ..objectives import OBJECTIVES, Objective, build_objective
from ..optim import build_optimizer, build_scheduler
from ..rng import RngState, derive_seed
from .replicated import Accumulate, AllReduce


class NonFiniteError(RuntimeError):
    """A block's loss or activations became NaN or inf."""


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
WIRE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_module(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameterised layer of `module` from its own seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):  # torch's own convention for "has parameters to draw"
                m.reset_parameters()


class Stage:
    def __init__(self, index: int, block: nn.Module, objective: Objective, in_shape, out_shape, epochs: int,
                 cfg: JobConfig, device: torch.device, outlet: nn.Module | None = None,
                 class_counts: torch.Tensor | None = None, replicas: int = 1, replica: int | None = None):
        self.index = index
        self.block = block.to(device)
        # applied to what goes on to the next block, after the local loss (model.dropout_position)
        self.outlet = outlet if outlet is not None else nn.Identity()
        self.objective = objective.to(device)
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.epochs = epochs  # this block's training budget, in epochs
        self._loss_sum = torch.zeros((), device=device)  # this epoch's summed training loss (plateau rule)
        self._loss_n = 0
        self.device = device
        lr = cfg.optim.lr * cfg.optim.block_lr_decay ** index
        self.optimizer = build_optimizer(self.local_parameters(), cfg.optim, lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, epochs)
        # dist.replicas (replicated.py): R > 1 takes one step per R batches; `replica` None = this
        # process plays every replica's slot (the simultaneous reference), else it is that replica of
        # its stage group, whose process group `join` gives it once the ranks are connected
        self.replicas = replicas
        self.rounds = (None if replicas == 1 else Accumulate(self, replicas) if replica is None
                       else AllReduce(self, replicas, replica))
        self.epoch_rounds: int | None = None  # sync replicas: the group's rounds per epoch (pads the last)
        slots = range(replicas) if self.rounds is not None and replica is None else [replica or 0]
        self.rngs = {k: RngState(derive_seed(cfg.train.seed, "stage-rng", index, *(("slot", k) if k else ())), device)
                     for k in slots}
        self.rng = self.rngs[min(slots)]
        # precision: autocast of this stage's work, fp16 with its own loss scaler; wire: the dtype
        # of what this stage passes on (cast back to float32 where the next stage reads it)
        self.autocast_dtype = AUTOCAST[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        self.wire_dtype = WIRE[cfg.dist.wire_dtype]
        self.check_every = cfg.train.check_every or (100 if device.type == "cuda" else 1)
        self._finite = torch.ones((), dtype=torch.bool, device=device)  # all finite since the last check
        self._checked = 0  # steps checked so far
        self.timer = StepTimer(device)
        self.epochs_done = 0
        self.steps = 0  # batches trained on
        self.updates = 0  # optimizer steps (fewer than batches with replicas)
        self.samples = 0  # samples this block actually trained on
        self.epoch_samples: list[int] = []  # of those, per epoch (end_epoch)
        # samples of other training work by kind (frozen forwards, commitment steps...), for
        # flops.train_flops; `info`: facts a trainer reports in summary.json layers[]
        self.work: Counter[str] = Counter()
        self.info: dict = {}
        # Routing (QuickNets across blocks), if the objective's spec declares it: the router decides
        # which samples go on, trains the commitment head online and re-batches this stage's input,
        # class-balanced by the training set's class sizes `class_counts` (objectives/router.py).
        build_router = OBJECTIVES[cfg.objective.name].build_router
        self.router = build_router(self.objective, cfg, index, lr, class_counts) if build_router else None

    def join(self, group, sync_bn: bool) -> None:
        """A replica: its stage group's process group (all-reduces; SyncBatchNorm with dist.sync_bn)."""
        self.rounds.group = group
        if sync_bn:
            self.block = nn.SyncBatchNorm.convert_sync_batchnorm(self.block, process_group=group)

    def settle(self) -> None:
        """A replica: close its round if one is due (replicated.AllReduce defers the all-reduce and
        step until the batch's outputs have been sent on)."""
        if self.rounds is not None:
            self.rounds.settle()

    def parameters(self):
        return list(self.block.parameters()) + list(self.objective.parameters())

    def local_parameters(self):
        """What train_step's optimizer steps: the block and its objective's local parameters."""
        return list(self.block.parameters()) + list(self.objective.local_parameters())

    @property
    def compute_s(self) -> float:
        """Seconds in this stage's train steps (CUDA events on GPU: the work, not its launch)."""
        return self.timer.seconds

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == torch.float32 else x.float()  # wire dtype back to float32

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        return h if h.dtype == self.wire_dtype else h.to(self.wire_dtype)

    @property
    def training(self) -> bool:
        return self.epochs_done < self.epochs

    def train_step(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
        """One optimizer step on the local loss. Returns the next block's input (the block's output
        through its outlet, detached: no gradient ever crosses stages) and the objective's LocalOutput.
        The outlet's dropout draws from this stage's RNG stream, so every mode draws the same masks."""
        t0 = self.timer.start()
        rounds = self.rounds
        if rounds is not None:
            rounds.begin()
        with self.rngs[rounds.slot()] if rounds is not None else self.rng:
            self.block.train()
            self.objective.train()
            with self.autocast():
                out = self.block(self._input(x))
                res = self.objective(out, y, mask)
            self._finite &= torch.isfinite(res.loss.detach()) & torch.isfinite(out.detach()).all()
            if rounds is None:
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(res.loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.updates += 1
            else:  # weighted by its samples: the round's step is on the union of its batches
                self.scaler.scale(res.loss * len(y)).backward()
            self.outlet.train()
            nxt = self.outlet(out.detach())
        self.steps += 1
        n = int(mask.sum()) if mask is not None else len(y)
        self.samples += n
        self._loss_sum += res.loss.detach().float() * n
        self._loss_n += n
        self.timer.stop(t0)
        if rounds is not None:
            rounds.end(len(y))  # may close the round (all-reduce, timed apart, and step), or defer it
        if self.steps - self._checked >= self.check_every:
            self.check_finite()
        return self._output(nxt), res

    # ------------------------------------------------------------------ one block's share of a batch
    def feed(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, log=None):
        """Take an incoming (sub-)batch; yield what goes on to the next block as (h, y, ids).
        The single-process `simultaneous` loop and the distributed engine both call this, so each
        block sees the same sequence of batches wherever it runs."""
        rebatcher = self.router.rebatcher if self.router else None
        if rebatcher is None:
            yield from self._step(x, y, ids, log)
            return
        rebatcher.add(x, y, ids)
        for b in rebatcher.full():
            yield from self._step(*b, log)

    def drain(self, log=None):
        """At the end of an epoch: train on what the rebatcher still holds (a smaller last batch)."""
        if self.router is not None and self.router.rebatcher is not None:
            for b in self.router.rebatcher.flush():
                yield from self._step(*b, log)
        if self.rounds is not None and self.training:
            self.rounds.pad_epoch(self.epoch_rounds)  # the epoch's last round steps

    def _step(self, x, y, ids, log):
        if self.training:
            h, res = self.train_step(x, y)
            if log is not None:
                log(self, res, y)
        else:  # budget spent (cascade): frozen, forwards fixed pseudo-inputs
            h, res = self.forward(x), None
            self.work["forward"] += len(y)  # counted by flops.train_flops
        if self.router is not None:
            keep = self.router.keep(h, res, y, self.work)
            h, y, ids = h[keep], y[keep], ids[keep]
        if len(y):
            yield h, y, ids

    def check_finite(self) -> None:
        """Read the accumulated finiteness flag (one host sync on GPU): a diverged block must stop the
        job with its name and step window, not feed NaNs downstream for hours."""
        first, self._checked = self._checked + 1, self.steps
        if not bool(self._finite):
            window = f"step {first}" if first == self.steps else f"steps {first}-{self.steps}"
            raise NonFiniteError(f"block {self.index} {window}: loss or output activations not finite "
                                 "(train.precision / train.check_every); lower optim.lr or check the data")

    def epoch_train_loss(self) -> float:
        """The mean training loss of this block's current epoch (reset by end_epoch)."""
        return float(self._loss_sum) / max(self._loss_n, 1)

    def end_epoch(self, step_scheduler: bool = True) -> None:
        self.settle()  # the epoch's last step comes before the scheduler's
        self.check_finite()
        self._loss_sum.zero_()
        self._loss_n = 0
        self.epoch_samples.append(self.samples - sum(self.epoch_samples))
        if step_scheduler:
            self.scheduler.step()
        self.epochs_done += 1

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode block output, as passed on (wire dtype)."""
        self.block.eval()
        with self.autocast():
            return self._output(self.block(self._input(x)))

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        self.objective.eval()
        with self.autocast():
            return self.objective.head(self._input(h))

    def state_dict(self) -> dict:
        return {"index": self.index, "block": self.block.state_dict(), "objective": self.objective.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": self.rng.state_dict(), "epochs_done": self.epochs_done, "steps": self.steps,
                "updates": self.updates, "rng_slots": {k: r.state_dict() for k, r in self.rngs.items()},
                "samples": self.samples, "epoch_samples": self.epoch_samples, "work": dict(self.work),
                "router": self.router.state_dict() if self.router else None}

    def load_state_dict(self, sd: dict) -> None:
        assert sd["index"] == self.index, f"checkpoint of block {sd['index']} loaded into block {self.index}"
        self.block.load_state_dict(sd["block"])
        self.objective.load_state_dict(sd["objective"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        self.rng.load_state_dict(sd["rng"])
        for k, r in self.rngs.items():
            if k in sd.get("rng_slots", {}):
                r.load_state_dict(sd["rng_slots"][k])
        self.epochs_done, self.steps, self.samples = sd["epochs_done"], sd["steps"], sd["samples"]
        self.updates = sd.get("updates", self.steps)
        self.epoch_samples, self.work = list(sd.get("epoch_samples", [])), Counter(sd.get("work", {}))
        if self.router is not None and sd.get("router"):
            self.router.load_state_dict(sd["router"])


def build_stages(cfg: JobConfig, input_shape, num_classes: int, device: torch.device,
                 select=None, replication=None, class_counts: torch.Tensor | None = None) -> list[Stage]:
    """Build the network, cut it into blocks and wrap the blocks that `select(num_blocks)` picks
    (default: all) as stages, each initialised from its own seed. Blocks not picked are freed.
    `replication(num_blocks)` (dist.replicas; replicated.py): (block -> replicas of its stage group,
    this process's replica index or None: the reference plays every replica's slot).
    class_counts (Data.class_counts): what routed blocks re-batch by; unused by timing or scoring."""
    built = build_model(cfg.model, tuple(input_shape), num_classes)
    indices = range(len(built.blocks)) if select is None else select(len(built.blocks))
    replicas, replica = replication(len(built.blocks)) if replication else ({}, None)
    stages = []
    for j in indices:
        block = built.blocks[j]
        init_module(block, derive_seed(cfg.train.seed, "block", j))
        objective = build_objective(cfg.objective, built.shapes[j], num_classes)
        init_module(objective, derive_seed(cfg.train.seed, "head", j))
        epochs = objective.epochs_for(cfg.objective, j, cfg.train)
        in_shape = tuple(input_shape) if j == 0 else built.shapes[j - 1]
        stages.append(Stage(j, block, objective, in_shape, built.shapes[j], epochs, cfg, device,
                            built.outlets[j], class_counts, replicas.get(j, 1), replica))
    return stages


def feed_chain(stages: list[Stage], flow: list, log=None) -> list:
    """One incoming batch (or routed pieces of it) through consecutive stages, in order: each stage
    trains (or forwards, if frozen) and passes on what it does not route away."""
    for s in stages:
        flow = [out for item in flow for out in s.feed(*item, log)]
    return flow


def drain_chain(stages: list[Stage], log=None) -> list:
    """Epoch end with routing: each stage in turn takes what the stage before it drained, then
    trains on its own remainder. Returns what the last stage passes on."""
    flow: list = []
    for s in stages:
        flow = [out for item in flow for out in s.feed(*item, log)] + list(s.drain(log))
    return flow
