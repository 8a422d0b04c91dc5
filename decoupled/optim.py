"""Optimizers and per-block LR schedules, built from [optim]."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


def _fused(params: list) -> dict:
    """CUDA: the fused implementation, whose step also takes GradScaler's scale and inf flag on the
    device (fp16 then never syncs the host: with an unfused optimizer GradScaler.step reads found_inf
    with .item() every step). CPU: torch's default implementation, unchanged (the CPU tests compare
    modes bit for bit)."""
    return {"fused": True} if params and all(p.is_cuda for p in params) else {}


def build_optimizer(params, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **_fused(params))
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.name]
    return cls(params, lr=lr, weight_decay=cfg.weight_decay, **_fused(params))


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
