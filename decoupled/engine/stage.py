"""A stage is what one worker owns for one block: the block, its objective (head + local loss),
its optimizer and LR schedule, and its private RNG stream.

Every random choice a stage makes is seeded from (job seed, block index), never from the order in
which stages happen to be built or run; that makes the single-process trainers and the
distributed engine produce the same numbers.
"""
from __future__ import annotations

import math
import time
from collections import Counter

import torch
from torch import nn

from ..config import JobConfig, OptimConfig
from ..models import build_model
from ..objectives import Objective, build_objective
from ..rng import RngState, derive_seed


class NonFiniteError(RuntimeError):
    """A block's loss or activations became NaN or inf."""


def init_module(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameterised layer of `module` from its own seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def build_optimizer(params, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.name]
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int):
    """Stepped once per epoch the block trains, so each block runs its own schedule."""
    if cfg.schedule == "step":
        factor = lambda e: cfg.gamma ** (e // cfg.step_epochs)  # noqa: E731
    elif cfg.schedule == "cosine":
        factor = lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))  # noqa: E731
    else:
        factor = lambda e: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Stage:
    def __init__(self, index: int, block: nn.Module, objective: Objective, in_shape, out_shape, epochs: int,
                 cfg: JobConfig, device: torch.device):
        self.index = index
        self.block = block.to(device)
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

    def parameters(self):
        return list(self.block.parameters()) + list(self.objective.parameters())

    def local_parameters(self):
        """What train_step's optimizer steps: the block and its objective's local parameters."""
        return list(self.block.parameters()) + list(self.objective.local_parameters())

    @property
    def training(self) -> bool:
        return self.epochs_done < self.epochs

    def train_step(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
        """One optimizer step on the local loss. Returns the block's output, detached (the next
        block's input: no gradient ever crosses stages), and the objective's LocalOutput."""
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
        self.steps += 1
        self.samples += int(mask.sum()) if mask is not None else len(y)
        self.compute_s += time.perf_counter() - t0
        return out.detach(), res

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
                "samples": self.samples, "epoch_samples": self.epoch_samples, "work": dict(self.work)}

    def load_state_dict(self, sd: dict) -> None:
        assert sd["index"] == self.index, f"checkpoint of block {sd['index']} loaded into block {self.index}"
        self.block.load_state_dict(sd["block"])
        self.objective.load_state_dict(sd["objective"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.rng.load_state_dict(sd["rng"])
        self.epochs_done, self.steps, self.samples = sd["epochs_done"], sd["steps"], sd["samples"]
        self.epoch_samples, self.work = list(sd.get("epoch_samples", [])), Counter(sd.get("work", {}))


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
        stages.append(Stage(j, block, objective, in_shape, built.shapes[j], epochs, cfg, device))
    return stages
