"""Validation: every field against its own rule (parse.py), then the rules that tie fields together;
the rules of train.mode are its declaration's (modes.py)."""
from __future__ import annotations

from pathlib import Path

from .applies import check_applies
from .parse import _coerce, _fields, _sections
from .schema import ConfigError, JobConfig, replicated

def validate(cfg: JobConfig) -> None:
    """Every field against its type and rules, then the rules that tie fields together."""
    for section, cls in _sections().items():
        for key, (typ, meta) in _fields(cls).items():
            _coerce(f"{section}.{key}", getattr(getattr(cfg, section), key), typ, meta)
    d, m, o, t, op = cfg.data, cfg.model, cfg.objective, cfg.train, cfg.optim
    if d.name not in ("digits", "synthetic"):
        if not d.root:
            raise ConfigError(f"data.root is empty but data.name={d.name!r} needs a dataset folder; "
                              f"set data.root (e.g. --set data.root=../shared/data)")
        if not Path(d.root).is_dir() and not d.download:
            raise ConfigError(f"data.root={d.root!r} does not exist; point data.root at the dataset "
                              f"folder or set data.download=true")
    if d.name == "synthetic" and len(d.synthetic_shape) not in (1, 3):
        raise ConfigError(f"data.synthetic_shape={d.synthetic_shape} must be [features] or [C,H,W]")
    if m.name == "mlp" and not m.widths:
        raise ConfigError(f"model.widths={m.widths} must be a non-empty list of positive widths")
    if m.name in ("vgg", "resnet", "simcnn") and not m.hierarchy:
        raise ConfigError(f"model.hierarchy={m.hierarchy} must be a non-empty list of positive "
                          "layer counts, e.g. [1,1,2,2]")

    from ..modes import MODES  # the modes' declarations sit above config/ (they read its schema)
    mode = MODES[t.mode]
    mode.check(cfg)
    if (o.name == "predsim") != (o.head == "predsim") and o.head:
        raise ConfigError(f"objective.head={o.head!r} does not fit objective.name={o.name!r}: only predsim "
                          "has (and needs) the similarity branch; leave objective.head empty")
    if (o.head or ("dense" if o.name == "cascade" else "")) == "dense" and o.aux_width < 2:
        raise ConfigError(f"objective.aux_width={o.aux_width} is too small for the dense output block "
                          "(n -> n/2 -> classes); use at least 2")

    if t.plateau_factor < 1.0 and op.schedule != "constant":
        raise ConfigError(f"train.plateau_factor={t.plateau_factor} decays the LR on plateau; it cannot be "
                          f"combined with optim.schedule={op.schedule!r}; use optim.schedule='constant'")
    if op.schedule == "milestones" and list(op.milestones) != sorted(set(op.milestones)):
        raise ConfigError(f"optim.milestones={list(op.milestones)} must be strictly increasing fractions of "
                          "training in (0, 1), e.g. [0.5, 0.75, 0.89, 0.94]")
    if d.augment != "none" and t.cache in ("memory", "disk"):
        raise ConfigError(f"train.cache={t.cache!r} freezes one augmented view of the data; with "
                          f"data.augment={d.augment!r} use train.cache='recompute' (or 'auto')")
    if d.augment != "none" and d.name == "synthetic" and len(d.synthetic_shape) != 3:
        raise ConfigError(f"data.augment={d.augment!r} crops images, but data.synthetic_shape="
                          f"{d.synthetic_shape} is flat; set data.augment='none' or a [C,H,W] shape")
    check_applies(cfg)
    if mode.replicas and replicated(cfg.dist):
        _check_routing(cfg)


def _check_routing(cfg: JobConfig) -> None:
    """Stage groups (dist.replicas) need every replica of a group to step together."""
    d = cfg.dist
    from ..objectives import OBJECTIVES  # the registry, not a probe of the objective
    if OBJECTIVES[cfg.objective.name].build_router is not None:
        raise ConfigError(f"dist.replicas={d.replicas} with objective.name={cfg.objective.name!r}: a routing "
                          "objective trains on a data-dependent number of samples per block, so the replicas of "
                          "a group could not step together; use one rank per group (dist.replicas=[])")
