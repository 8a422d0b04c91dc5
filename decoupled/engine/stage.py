"""A stage is what one worker owns for one block: the block, its objective (head + local loss),
its optimizer and LR schedule, and its private RNG stream.

Every random choice a stage makes is seeded from (job seed, block index), never from the order in
which stages happen to be built or run; that makes the single-process trainers and the
distributed engine produce the same numbers.
"""
from __future__ import annotations

import time
from collections import Counter

import torch
from torch import nn

from ..config import JobConfig
from ..models import build_model
from ..objectives import OBJECTIVES, Objective, build_objective
from ..optim import build_optimizer, build_scheduler
from ..rng import RngState, derive_seed


class NonFiniteError(RuntimeError):
    """A block's loss or activations became NaN or inf."""


def init_module(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameterised layer of `module` from its own seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):  # torch's own convention for "has parameters to draw"
                m.reset_parameters()


class Stage:
    def __init__(self, index: int, block: nn.Module, objective: Objective, in_shape, out_shape, epochs: int,
                 cfg: JobConfig, device: torch.device, outlet: nn.Module | None = None):
        self.index = index
        self.block = block.to(device)
        # applied to what goes on to the next block, after the local loss (model.dropout_position)
        self.outlet = outlet if outlet is not None else nn.Identity()
        self.objective = objective.to(device)
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.epochs = epochs  # this block's training budget, in epochs
        self.device = device
        lr = cfg.optim.lr * cfg.optim.block_lr_decay ** index
        self.optimizer = build_optimizer(self.local_parameters(), cfg.optim, lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, epochs)
        self.rng = RngState(derive_seed(cfg.train.seed, "stage-rng", index), device)
        self.epochs_done = 0
        self.steps = 0
        self.samples = 0  # samples this block actually trained on
        self.epoch_samples: list[int] = []  # of those, per epoch (end_epoch)
        # samples of other training work by kind (frozen forwards, commitment steps...), for
        # flops.train_flops; `info`: facts a trainer reports in summary.json layers[]
        self.work: Counter[str] = Counter()
        self.info: dict = {}
        self.compute_s = 0.0
        # Routing (QuickNets across blocks), if the objective's spec declares it: the router decides
        # which samples go on, trains the commitment head online and re-batches this stage's input.
        build_router = OBJECTIVES[cfg.objective.name].build_router
        self.router = build_router(self.objective, cfg, index, lr) if build_router else None

    def parameters(self):
        return list(self.block.parameters()) + list(self.objective.parameters())

    def local_parameters(self):
        """What train_step's optimizer steps: the block and its objective's local parameters."""
        return list(self.block.parameters()) + list(self.objective.local_parameters())

    @property
    def training(self) -> bool:
        return self.epochs_done < self.epochs

    def train_step(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
        """One optimizer step on the local loss. Returns the next block's input (the block's output
        through its outlet, detached: no gradient ever crosses stages) and the objective's LocalOutput.
        The outlet's dropout draws from this stage's RNG stream, so every mode draws the same masks."""
        t0 = time.perf_counter()
        with self.rng:
            self.block.train()
            self.objective.train()
            out = self.block(x)
            res = self.objective(out, y, mask)
            self._check_finite(res.loss, out)
            self.optimizer.zero_grad(set_to_none=True)
            res.loss.backward()
            self.optimizer.step()
            self.outlet.train()
            nxt = self.outlet(out.detach())
        self.steps += 1
        self.samples += int(mask.sum()) if mask is not None else len(y)
        self.compute_s += time.perf_counter() - t0
        return nxt, res

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

    def _check_finite(self, loss: torch.Tensor, out: torch.Tensor) -> None:
        # One fused check (a single device sync) per step: a diverged block must stop the job with
        # its name and step, not feed NaNs downstream for hours.
        if not bool(torch.isfinite(loss) & torch.isfinite(out).all()):
            what = "loss" if not bool(torch.isfinite(loss)) else "output activations"
            raise NonFiniteError(f"block {self.index} step {self.steps + 1}: {what} not finite "
                                 f"(loss={float(loss.detach()):.4g}); lower optim.lr or check the data")

    def end_epoch(self, step_scheduler: bool = True) -> None:
        self.epoch_samples.append(self.samples - sum(self.epoch_samples))
        if step_scheduler:
            self.scheduler.step()
        self.epochs_done += 1

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.block.eval()
        return self.block(x)

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        self.objective.eval()
        return self.objective.head(h)

    def state_dict(self) -> dict:
        return {"index": self.index, "block": self.block.state_dict(), "objective": self.objective.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": self.rng.state_dict(), "epochs_done": self.epochs_done, "steps": self.steps,
                "samples": self.samples, "epoch_samples": self.epoch_samples, "work": dict(self.work),
                "router": self.router.state_dict() if self.router else None}

    def load_state_dict(self, sd: dict) -> None:
        assert sd["index"] == self.index, f"checkpoint of block {sd['index']} loaded into block {self.index}"
        self.block.load_state_dict(sd["block"])
        self.objective.load_state_dict(sd["objective"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.rng.load_state_dict(sd["rng"])
        self.epochs_done, self.steps, self.samples = sd["epochs_done"], sd["steps"], sd["samples"]
        self.epoch_samples, self.work = list(sd.get("epoch_samples", [])), Counter(sd.get("work", {}))
        if self.router is not None and sd.get("router"):
            self.router.load_state_dict(sd["router"])


def build_stages(cfg: JobConfig, input_shape, num_classes: int, device: torch.device,
                 select=None) -> list[Stage]:
    """Build the network, cut it into blocks and wrap the blocks that `select(num_blocks)` picks
    (default: all) as stages, each initialised from its own seed. Blocks not picked are freed."""
    built = build_model(cfg.model, tuple(input_shape), num_classes)
    indices = range(len(built.blocks)) if select is None else select(len(built.blocks))
    stages = []
    for j in indices:
        block = built.blocks[j]
        init_module(block, derive_seed(cfg.train.seed, "block", j))
        objective = build_objective(cfg.objective, built.shapes[j], num_classes)
        init_module(objective, derive_seed(cfg.train.seed, "head", j))
        epochs = objective.epochs_for(cfg.objective, j, cfg.train)
        in_shape = tuple(input_shape) if j == 0 else built.shapes[j - 1]
        stages.append(Stage(j, block, objective, in_shape, built.shapes[j], epochs, cfg, device,
                            built.outlets[j]))
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
