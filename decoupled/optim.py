"""Optimizers and per-block LR schedules, built from [optim]: OPTIMIZERS holds each optimizer's
settings (the [optim] keys it has), which build it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .config import Choice, ConfigError, knob
from .device import accel


def _schedule_is(*names: str):
    return (lambda c: c.optim.schedule in names,
            f"optim.schedule={names[0]!r}" if len(names) == 1 else f"optim.schedule in {names}")


@dataclass
class OptimConfig(Choice):
    """[optim] keys of every optimizer: the LR and its per-block schedule."""
    name: str = "sgd"  # the optimizer (OPTIMIZERS)
    lr: float = knob(0.05, gt=0.0)  # learning rate of block 0 (see block_lr_decay)
    weight_decay: float = knob(0.0, ge=0.0)  # L2 penalty (adamw: decoupled weight decay)
    # per block, stepped on the block's own epochs: "constant" | "step" (x gamma every step_epochs)
    # | "cosine" (to 0 over the block's budget) | "milestones" (x gamma at each of optim.milestones)
    schedule: Literal["constant", "step", "cosine", "milestones"] = "constant"
    # step schedule: decay every step_epochs epochs of a block
    step_epochs: int = knob(15, ge=1, acts=_schedule_is("step"))
    # step / milestones factor (Belilovsky 2019: 0.2 every 15 epochs; Ma 2020: 0.25 at the milestones)
    gamma: float = knob(0.2, gt=0.0, acts=_schedule_is("step", "milestones"))
    # milestones schedule: fractions of the block's epoch budget at which the LR is multiplied by
    # gamma (epoch round(f * budget)); Ma 2020: 50, 75, 89 and 94 % of training
    milestones: list[float] = knob([0.5, 0.75, 0.89, 0.94], gt=0.0, lt=1.0, acts=_schedule_is("milestones"))
    block_lr_decay: float = knob(1.0, gt=0.0)  # block j uses lr * block_lr_decay**j

    def check(self) -> None:
        if self.schedule == "milestones" and list(self.milestones) != sorted(set(self.milestones)):
            raise ConfigError(f"optim.milestones={list(self.milestones)} must be strictly increasing fractions "
                              "of training in (0, 1), e.g. [0.5, 0.75, 0.89, 0.94]")


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = knob(0.9, ge=0.0)  # sgd momentum
    nesterov: bool = False  # Nesterov momentum (with momentum > 0)

    def build(self, params: list, lr: float, **kw) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=self.nesterov and self.momentum > 0, **kw)


@dataclass
class AdamConfig(OptimConfig):
    name: str = "adam"
    torch_class: ClassVar[type] = torch.optim.Adam

    def build(self, params: list, lr: float, **kw) -> torch.optim.Optimizer:
        return self.torch_class(params, lr=lr, weight_decay=self.weight_decay, **kw)


@dataclass
class AdamWConfig(AdamConfig):
    name: str = "adamw"
    torch_class: ClassVar[type] = torch.optim.AdamW


OPTIMIZERS: dict[str, type[OptimConfig]] = {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamWConfig}


def _fused(params: list) -> dict:
    """CUDA: the fused implementation, whose step also takes GradScaler's scale and inf flag on the
    device (fp16 then never syncs the host: with an unfused optimizer GradScaler.step reads found_inf
    with .item() every step). CPU: torch's default implementation, unchanged (the CPU tests compare
    modes bit for bit)."""
    devices = {p.device for p in params}
    return {"fused": True} if len(devices) == 1 and accel(devices.pop()).fused_optimizer() else {}


def block_lr(cfg: OptimConfig, j: int) -> float:
    """Block j's learning rate (optim.block_lr_decay: deeper blocks step smaller), for its optimizer and
    for any head trained beside it (QuickNet's commitment head)."""
    return cfg.lr * cfg.block_lr_decay ** j


def build_optimizer(params, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    params = list(params)
    return cfg.build(params, lr, **_fused(params))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int):
    """Stepped once per epoch the block trains, so each block runs its own schedule."""
    if cfg.schedule == "step":
        factor = lambda e: cfg.gamma ** (e // cfg.step_epochs)  # noqa: E731
    elif cfg.schedule == "milestones":  # Ma 2020: x gamma at fractions of the block's own budget
        at = [round(f * epochs) for f in cfg.milestones]
        factor = lambda e: cfg.gamma ** sum(e >= m for m in at)  # noqa: E731
    elif cfg.schedule == "cosine":
        factor = lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))  # noqa: E731
    else:
        factor = lambda e: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
