"""A job's settings: JobConfig assembled from the sections config/ owns and the plug-ins' own Config
types, and the entry points that load, check and write it.

The plug-in sections ([model], [objective], [optim]) hold the Config type their `name` picks from
the registries (MODELS, OBJECTIVES, OPTIMIZERS), so a key the chosen plug-in does not have is an
error that lists the keys it does have. config/ does the parsing and the checks; it learns the
plug-ins only from SCHEMA, built here.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

from . import config
from .config import (Choice, ConfigError, DataConfig, DistConfig, LogConfig, ReplayConfig, Schema, TrainConfig,
                     to_dict, to_toml)
from .config.schema import replicated
from .data import LOADERS
from .heads import HEADS
from .models import MODELS, ModelConfig
from .modes import MODES
from .objectives import OBJECTIVES, ObjectiveConfig
from .optim import OPTIMIZERS, OptimConfig

__all__ = ["JobConfig", "SCHEMA", "ConfigError", "choose", "load", "validate", "to_toml", "to_dict"]


class Configs(Mapping):
    """A registry seen as name -> Config type, read when asked: a plug-in registered after import counts."""

    def __init__(self, registry: dict, config_of: Callable[[object], type[Choice]]):
        self.registry, self.config_of = registry, config_of

    def __getitem__(self, name: str) -> type[Choice]:
        return self.config_of(self.registry[name])

    def __iter__(self):
        return iter(self.registry)

    def __len__(self) -> int:
        return len(self.registry)


CHOICES: dict[str, Configs] = {
    "model": Configs(MODELS, lambda spec: spec.Config),
    "objective": Configs(OBJECTIVES, lambda spec: spec.Config),
    "optim": Configs(OPTIMIZERS, lambda cls: cls),
}


def choose(section: str, name: str, **values) -> Choice:
    """The settings of plug-in `name` of `section` (e.g. choose("model", "vgg", width=8)): its Config
    type with `values`, every other key at its default."""
    if name not in CHOICES[section]:
        raise ConfigError(f"{section}.name={name!r} is not valid; choose one of: "
                          f"{', '.join(map(repr, CHOICES[section]))}")
    return CHOICES[section][name](name=name, **values)


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: choose("model", "mlp"))
    objective: ObjectiveConfig = field(default_factory=lambda: choose("objective", "khidden"))
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: choose("optim", "sgd"))
    dist: DistConfig = field(default_factory=DistConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    log: LogConfig = field(default_factory=LogConfig)


SCHEMA = Schema(JobConfig, CHOICES, {"dataset": LOADERS, "head": HEADS})


def validate(cfg: JobConfig) -> None:
    """config/'s checks, train.mode's rules (its declaration, modes.py), then the rules that need a
    plug-in's registry or tie its section to another."""
    config.validate(SCHEMA, cfg)
    t = cfg.train
    mode = MODES[t.mode]
    mode.check(cfg)
    if t.plateau_factor < 1.0 and cfg.optim.schedule != "constant":
        raise ConfigError(f"train.plateau_factor={t.plateau_factor} decays the LR on plateau; it cannot be "
                          f"combined with optim.schedule={cfg.optim.schedule!r}; use optim.schedule='constant'")
    if mode.replicas and replicated(cfg.dist) \
            and OBJECTIVES[cfg.objective.name].build_router is not None:  # the registry, not a probe
        raise ConfigError(f"dist.replicas={cfg.dist.replicas} with objective.name={cfg.objective.name!r}: a "
                          "routing objective trains on a data-dependent number of samples per block, so the "
                          "replicas of a group could not step together; use one rank per group (dist.replicas=[])")


def load(path: str | os.PathLike | None = None, overrides: list[str] = (), base: JobConfig | None = None,
         validate_now: bool = True) -> JobConfig:
    """Defaults (or a copy of `base`), then the TOML file, then the `--set` overrides, then validation."""
    cfg = config.parse(SCHEMA, path, overrides, base)
    if validate_now:
        validate(cfg)
    return cfg
