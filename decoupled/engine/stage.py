"""A stage is what one worker owns for one block: the block, its objective (head + local loss), the
outlet to the next block, and its collaborators: precision (precision.py), a stepper owning the
optimizer step (stepping.py), stats (stats.py) and its private RNG streams. engine/build.py makes
them from the job config; a stage never reads it.

Every random choice a stage makes is seeded from (job seed, block index), never from the order in
which stages happen to be built or run; that makes the single-process trainers and the
distributed engine produce the same numbers.
"""
from __future__ import annotations

import torch
from torch import nn

from ..objectives import Objective
from ..rng import RngState
from .precision import Precision
from .stats import StageStats
from .stepping import Stepper


class Stage:
    def __init__(self, *, index: int, block: nn.Module, objective: Objective, outlet: nn.Module, in_shape,
                 out_shape, epochs: int, device: torch.device, precision: Precision, stepper: Stepper,
                 stats: StageStats, rngs: dict[int, RngState], router=None):
        self.index = index
        self.block = block
        self.objective = objective
        self.outlet = outlet  # applied to what goes on to the next block, after the local loss
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.epochs = epochs  # this block's training budget, in epochs
        self.device = device
        self.precision = precision
        self.stepper = stepper
        self.stats = stats
        self.rngs = rngs  # one stream per replica slot this process plays (stepping.py)
        self.rng = rngs[min(rngs)]
        self.router = router  # routing (objectives/router.py): which samples go on; re-batching

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.stepper.optimizer

    def join(self, group, sync_bn: bool, epoch_rounds: int | None = None) -> None:
        """A replica (stepping.AllReduce): its stage group's process group (all-reduces; SyncBatchNorm
        with dist.sync_bn) and, in sync, the group's rounds per epoch."""
        if sync_bn:
            self.block = nn.SyncBatchNorm.convert_sync_batchnorm(self.block, process_group=group)
            self.stepper.modules = [self.block, self.objective]
        self.stepper.join(group, epoch_rounds)

    def settle(self) -> None:
        """Close a replica round that is due (stepping.AllReduce defers the all-reduce and step until
        the batch's outputs have been sent on)."""
        self.stepper.settle()

    def parameters(self):
        return list(self.block.parameters()) + list(self.objective.parameters())

    def local_parameters(self):
        """What train_step's optimizer steps: the block and its objective's local parameters."""
        return list(self.block.parameters()) + list(self.objective.local_parameters())

    @property
    def training(self) -> bool:
        return self.stats.epochs_done < self.epochs

    def train_step(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
        """One batch on the local loss. Returns the next block's input (the block's output through its
        outlet, detached: no gradient ever crosses stages) and the objective's LocalOutput. The
        outlet's dropout draws from this stage's RNG stream, so every mode draws the same masks."""
        t0 = self.stats.timer.start()
        with self.rngs[self.stepper.begin()]:
            self.block.train()
            self.objective.train()
            with self.precision.autocast():
                out = self.block(self.precision.from_wire(x, self.in_shape))
                res = self.objective(out, y, mask)
            self.precision.watch(res.loss, out)
            self.stepper.backward_and_step(res.loss, len(y))
            self.outlet.train()
            nxt = self.outlet(out.detach())
        self.stats.count(int(mask.sum()) if mask is not None else len(y), res.loss)
        self.stats.timer.stop(t0)
        self.precision.check_due(self.stats.steps, self.index)
        return self.precision.to_wire(nxt), res

    def end_epoch(self, step_scheduler: bool = True) -> None:
        self.settle()  # the epoch's last step comes before the scheduler's
        self.precision.check(self.stats.steps, self.index)
        if step_scheduler:
            self.stepper.scheduler.step()
        self.stats.end_epoch()

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode block output, before the wire (the compute dtype, the declared shape)."""
        self.block.eval()
        with self.precision.autocast():
            return self.block(self.precision.from_wire(x, self.in_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode block output, as passed on (dist.wire_dtype's form, wire.py)."""
        return self.precision.to_wire(self.features(x))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """This block's output as passed on (forward, train_step) back to float32 of out_shape: the one
        way every reader outside the next block's own step reads it (note [row scales])."""
        return self.precision.from_wire(h, self.out_shape)

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        self.objective.eval()
        with self.precision.autocast():
            return self.objective.head(self.decode(h))

    def state_dict(self) -> dict:
        return {"index": self.index, "block": self.block.state_dict(), "objective": self.objective.state_dict(),
                "stepper": self.stepper.state_dict(), "precision": self.precision.state_dict(),
                "stats": self.stats.state_dict(),
                "rng": self.rng.state_dict(), "rng_slots": {k: r.state_dict() for k, r in self.rngs.items()},
                "router": self.router.state_dict() if self.router else None}

    def load_state_dict(self, sd: dict) -> None:
        assert sd["index"] == self.index, f"checkpoint of block {sd['index']} loaded into block {self.index}"
        self.block.load_state_dict(sd["block"])
        self.objective.load_state_dict(sd["objective"])
        self.stepper.load_state_dict(sd["stepper"])
        self.precision.load_state_dict(sd["precision"])
        self.stats.load_state_dict(sd["stats"])
        self.rng.load_state_dict(sd["rng"])
        for k, r in self.rngs.items():
            if k in sd["rng_slots"]:
                r.load_state_dict(sd["rng_slots"][k])
        if self.router is not None and sd.get("router"):
            self.router.load_state_dict(sd["router"])
