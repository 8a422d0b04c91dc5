"""Validation: every field against its own rule (parse.py), then the rules that tie fields together."""
from __future__ import annotations

from pathlib import Path

from .applies import check_applies
from .parse import _coerce, _fields, _sections
from .schema import EARLY_STOP_MODES, PLATEAU_MODES, ConfigError, JobConfig, replicated

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

    if t.mode == "quicknet" and o.name != "quicknet":
        raise ConfigError(f"train.mode='quicknet' needs objective.name='quicknet' (got {o.name!r}): it trains "
                          "exit and commitment heads")
    if o.name == "quicknet" and t.mode == "sequential":
        raise ConfigError("objective.name='quicknet' with train.mode='sequential' would train every block on "
                          "all samples and never its commitment head; use train.mode='quicknet'")
    if (o.name == "predsim") != (o.head == "predsim") and o.head:
        raise ConfigError(f"objective.head={o.head!r} does not fit objective.name={o.name!r}: only predsim "
                          "has (and needs) the similarity branch; leave objective.head empty")
    if (o.head or ("dense" if o.name == "cascade" else "")) == "dense" and o.aux_width < 2:
        raise ConfigError(f"objective.aux_width={o.aux_width} is too small for the dense output block "
                          "(n -> n/2 -> classes); use at least 2")

    if t.patience and t.mode not in EARLY_STOP_MODES:
        raise ConfigError(f"train.patience={t.patience} (early stopping) applies to train.mode in "
                          f"{EARLY_STOP_MODES}, not {t.mode!r}: the other modes train every block to its "
                          "epoch budget; leave it at 0")
    if t.plateau_factor < 1.0 and t.mode not in PLATEAU_MODES:
        raise ConfigError(f"train.plateau_factor={t.plateau_factor} (LR decay on a plateau of each block's "
                          f"monitored loss) applies to train.mode in {PLATEAU_MODES}, not {t.mode!r}: across "
                          "ranks a block's validation loss needs an extra pass through the pipeline, which "
                          "the engine does not make; use train.mode='simultaneous' (sync equals it) or "
                          "leave it at 1.0")
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
    _check_replicas(cfg)


def _check_replicas(cfg: JobConfig) -> None:
    """Stage groups (dist.replicas): what can be checked before the world size is known."""
    d, t = cfg.dist, cfg.train
    if t.mode not in ("simultaneous", "sync", "async") or not replicated(d):
        return
    from ..objectives import OBJECTIVES  # the registry, not a probe of the objective
    if OBJECTIVES[cfg.objective.name].build_router is not None:
        raise ConfigError(f"dist.replicas={d.replicas} with objective.name={cfg.objective.name!r}: a routing "
                          "objective trains on a data-dependent number of samples per block, so the replicas of "
                          "a group could not step together; use one rank per group (dist.replicas=[])")
    if t.mode == "async" and cfg.replay.budget == "upstream":
        raise ConfigError(f"dist.replicas={d.replicas} with replay.budget='upstream': replicas average their "
                          "gradients every step, so they must make the same number of steps, which only "
                          "replay.budget='steps' guarantees; use replay.budget='steps' (the default)")
    if d.replicas == "auto" and not d.placement:
        raise ConfigError("dist.replicas='auto' chooses replica counts from measured block times for a split: "
                          "set dist.placement='auto' (or a list of blocks per group)")
    if t.mode == "simultaneous" and "auto" in (d.replicas, d.placement):
        raise ConfigError(f"train.mode='simultaneous' with dist.replicas={d.replicas!r} and dist.placement="
                          f"{d.placement!r}: the reference needs the groups spelled out; give dist.replicas and "
                          "dist.placement as lists (the plan a sync run printed)")
    if isinstance(d.placement, list) and d.placement and isinstance(d.replicas, list) \
            and len(d.placement) != len(d.replicas):
        raise ConfigError(f"dist.placement={d.placement} and dist.replicas={d.replicas} must have one entry per "
                          "stage group each (blocks per group, ranks per group)")
