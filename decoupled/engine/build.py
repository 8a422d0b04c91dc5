"""Stages from the job config: the one place that reads it for them. It builds the network, cuts it
into blocks, and gives each block its objective, optimizer and schedule, precision, stepper, stats,
RNG streams and router, as keyword arguments of Stage."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from ..device import accel
from ..job import JobConfig
from ..models import ModelError, build_model
from ..objectives import build_objective, objective_spec
from ..optim import block_lr, build_optimizer, build_scheduler
from ..rng import RngState, derive_seed
from .precision import AUTOCAST, WIRE, Precision
from .stage import Stage
from .stats import StageStats
from .stepping import Accumulate, AllReduce, Plain, Stepper


def init_module(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameterised layer of `module` from its own seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):  # torch's own convention for "has parameters to draw"
                m.reset_parameters()


def build_stages(cfg: JobConfig, input_shape, num_classes: int, device: torch.device,
                 select=None, replication=None, class_counts: torch.Tensor | None = None) -> list[Stage]:
    """Build the network, cut it into blocks and wrap the blocks that `select(num_blocks)` picks
    (default: all) as stages, each initialised from its own seed. Blocks not picked are freed.
    `replication(num_blocks)` (dist.replicas; stepping.py): (block -> replicas of its stage group,
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
        in_shape = tuple(input_shape) if j == 0 else built.shapes[j - 1]
        stages.append(build_stage(cfg, j, block.to(device), objective.to(device), built.outlets[j], in_shape,
                                  built.shapes[j], device, class_counts, replicas.get(j, 1), replica))
    return stages


def build_rank_stages(cfg: JobConfig, input_shape, num_classes: int, device, select=None,
                      replication=None, class_counts: torch.Tensor | None = None) -> list[Stage]:
    """build_stages, with a model that cannot be built reported as a config error, before training."""
    try:
        return build_stages(cfg, input_shape, num_classes, device, select, replication, class_counts)
    except ModelError as e:
        raise ConfigError(str(e)) from None


def build_stage(cfg: JobConfig, j: int, block: nn.Module, objective, outlet: nn.Module, in_shape, out_shape,
                device: torch.device, class_counts, replicas: int, replica: int | None) -> Stage:
    """Block j as a stage (block and objective already initialised and on `device`)."""
    epochs = objective.epochs_for(cfg.objective, j, cfg.train)
    lr = block_lr(cfg.optim, j)
    optimizer = build_optimizer(list(block.parameters()) + list(objective.local_parameters()), cfg.optim, lr)
    precision = Precision(device, compute=AUTOCAST[cfg.train.precision], wire=WIRE[cfg.dist.wire_dtype],
                          check_every=cfg.train.check_every or accel(device).check_every)
    stats = StageStats(device)
    stepper = _stepper(replicas, replica, [block, objective], cfg.dist.replica_batch == "split",
                       cfg.dist.allreduce_bucket_mb * 2**20, optimizer=optimizer, precision=precision,
                       scheduler=build_scheduler(optimizer, cfg.optim, epochs), stats=stats)
    rngs = {k: RngState(derive_seed(cfg.train.seed, "stage-rng", j, *(("slot", k) if k else ())), device)
            for k in stepper.slots}
    # Routing (QuickNets across blocks), if the objective's spec declares it: the router decides
    # which samples go on, trains the commitment head online and re-batches this stage's input,
    # class-balanced by the training set's class sizes `class_counts` (objectives/router.py).
    build_router = objective_spec(cfg.objective.name).build_router
    router = build_router(objective, cfg, j, lr, class_counts) if build_router else None
    return Stage(index=j, block=block, objective=objective, outlet=outlet if outlet is not None else nn.Identity(),
                 in_shape=in_shape, out_shape=out_shape, epochs=epochs, device=device, precision=precision,
                 stepper=stepper, stats=stats, rngs=rngs, router=router)


def _stepper(replicas: int, replica: int | None, modules: list[nn.Module], split: bool, bucket_bytes: float,
             **parts) -> Stepper:
    """dist.replicas (stepping.py): R > 1 takes one step per R batches (`split`: per batch, split into R
    parts); `replica` None = this process plays every replica's slot (the simultaneous reference), else
    it is that replica of its group."""
    if replicas == 1:
        return Plain(**parts)
    if replica is None:
        return Accumulate(replicas, modules, split, **parts)
    return AllReduce(replicas, modules, replica, bucket_bytes, **parts)
