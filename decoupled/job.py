"""A job's settings: JobConfig assembled from the sections config/ owns and the plug-ins' own Config
types, and the entry points that load, check and write it.

The plug-in sections ([model], [objective], [optim]) hold the Config type their `name` picks from
the registries (MODELS, OBJECTIVES, OPTIMIZERS), so a key the chosen plug-in does not have is an
error that lists the keys it does have. config/ does the parsing and the checks; it learns the
plug-ins only from SCHEMA, built here.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Callable

from . import config
from .config import (Choice, ConfigError, DataConfig, DistConfig, LogConfig, ReplayConfig, Schema, TrainConfig,
                     to_dict, to_toml)
from .config.schema import replicated
from .data import LOADERS, loader_for
from .heads import HEADS
from .models import MODELS, TORCHVISION, ModelConfig, spec_for as model_spec_for
from .modes import MODES
from .objectives import OBJECTIVES, ObjectiveConfig, objective_spec, spec_for as objective_spec_for
from .plugins import KINDS, fingerprint, resolve
from .optim import OPTIMIZERS, OptimConfig

__all__ = ["JobConfig", "SCHEMA", "ConfigError", "choose", "load", "plugin_code", "validate", "to_toml", "to_dict"]


class Configs(Mapping):
    """A registry seen as name -> Config type, read when asked: a plug-in registered after import counts.
    `lookup` also resolves names from user code (decoupled/plugins.py: import paths, entry points), so
    choosing `model.name = "pkg.mod:build"` imports and checks it while the config loads (Note [plug-ins
    validated at load]); iterating lists the built-in names only (the error messages, the key reference)."""

    def __init__(self, registry: dict, lookup: Callable[[str], object | None],
                 config_of: Callable[[object], type[Choice]]):
        self.registry, self.lookup, self.config_of = registry, lookup, config_of

    def __getitem__(self, name: str) -> type[Choice]:
        spec = self.lookup(name) if isinstance(name, str) else None  # a bad plug-in raises, naming its key
        if spec is None:
            raise KeyError(name)
        return self.config_of(spec)

    def __iter__(self):
        return iter(self.registry)

    def __len__(self) -> int:
        return len(self.registry)


class Datasets(Collection):
    """data.name's valid names: the built-in LOADERS, and dataset plug-ins (resolved, as Configs does)."""

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and loader_for(name) is not None

    def __iter__(self):
        return iter(LOADERS)

    def __len__(self) -> int:
        return len(LOADERS)


CHOICES: dict[str, Configs] = {
    "model": Configs(MODELS, model_spec_for, lambda spec: spec.Config),
    "objective": Configs(OBJECTIVES, objective_spec_for, lambda spec: spec.Config),
    "optim": Configs(OPTIMIZERS, OPTIMIZERS.get, lambda cls: cls),
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


SCHEMA = Schema(JobConfig, CHOICES, {"dataset": Datasets(), "head": HEADS})


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
            and objective_spec(cfg.objective.name).build_router is not None:  # the registry, not a probe
        raise ConfigError(f"dist.replicas={cfg.dist.replicas} with objective.name={cfg.objective.name!r}: a "
                          "routing objective trains on a data-dependent number of samples per block, so the "
                          "replicas of a group could not step together; use one rank per group (dist.replicas=[])")
    if cfg.data.args and cfg.data.name in LOADERS:  # a built-in dataset reads no table
        raise ConfigError(f"data.args={cfg.data.args!r} does nothing here: it applies to a dataset plug-in "
                          f"(data.name = \"package.module:load\"); remove it")


def plugin_code(cfg: JobConfig) -> dict[str, dict]:
    """{config key: fingerprint} of the job's model, objective and dataset that come from user code (the
    built-ins need none; torchvision models by torchvision's version): summary.json `plugins`, and what
    every rank checks it imports alike (engine/ranks/setup.py)."""
    code = {}
    for kind, name, builtin in (("model", cfg.model.name, MODELS), ("objective", cfg.objective.name, OBJECTIVES),
                                ("dataset", cfg.data.name, LOADERS)):
        key = KINDS[kind][0]
        if name in builtin:
            continue
        if kind == "model" and name.startswith(TORCHVISION):
            import torchvision  # imported on use: it pulls in torch._dynamo (seconds per process)
            code[key] = {"module": "torchvision", "version": torchvision.__version__}
        else:
            code[key] = {"name": name, **fingerprint(resolve(kind, name))}
    return code


def load(path: str | os.PathLike | None = None, overrides: list[str] = (), base: JobConfig | None = None,
         validate_now: bool = True) -> JobConfig:
    """Defaults (or a copy of `base`), then the TOML file, then the `--set` overrides, then validation."""
    cfg = config.parse(SCHEMA, path, overrides, base)
    if validate_now:
        validate(cfg)
    return cfg
