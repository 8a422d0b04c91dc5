"""Validation: every field against its own rule (parse.py) and every plug-in's own `check`, then the
rules that tie the sections config/ owns together, then applies.py. The rules of train.mode
(decoupled/modes.py) and those that need a plug-in's registry live with the job (decoupled/job.py)."""
from __future__ import annotations

from pathlib import Path

from .applies import ROOT_DATASETS, check_applies
from .parse import coerce, fields, section_names
from .schema import Choice, ConfigError, Schema


def check_section(section: str, obj, registries: dict) -> None:
    """One section: every field against its type and rules, then (a plug-in's) own check."""
    for key, (typ, meta) in fields(type(obj)).items():
        coerce(f"{section}.{key}", getattr(obj, key), typ, meta, registries)
    if isinstance(obj, Choice):
        obj.check()


def _check_choice(schema: Schema, section: str, obj) -> None:
    """A plug-in section holds the Config type its `name` picks (code may have changed the name alone)."""
    options = schema.choices[section]
    if obj.name not in options:
        raise ConfigError(f"{section}.name={obj.name!r} is not valid; choose one of: {', '.join(map(repr, options))}")
    if type(obj) is not options[obj.name]:
        raise ConfigError(f"{section}.name={obj.name!r} takes {options[obj.name].__qualname__}, but [{section}] "
                          f"holds {type(obj).__qualname__}: build the section as the chosen plug-in's Config "
                          "(decoupled.job.choose) instead of changing its name")


def validate(schema: Schema, cfg) -> None:
    """Every field against its type and rules, then the rules that tie fields together."""
    for section in section_names(schema):
        if section in schema.choices:
            _check_choice(schema, section, getattr(cfg, section))
        check_section(section, getattr(cfg, section), schema.registries)
    d, t = cfg.data, cfg.train
    if d.name in ROOT_DATASETS:  # a dataset plug-in may read data.root, but need not
        if not d.root:
            raise ConfigError(f"data.root is empty but data.name={d.name!r} needs a dataset folder; "
                              f"set data.root (e.g. --set data.root=../shared/data)")
        if not Path(d.root).is_dir() and not d.download:
            raise ConfigError(f"data.root={d.root!r} does not exist; point data.root at the dataset "
                              f"folder or set data.download=true")
    if d.name == "synthetic" and len(d.synthetic_shape) not in (1, 3):
        raise ConfigError(f"data.synthetic_shape={d.synthetic_shape} must be [features] or [C,H,W]")
    if d.augment != "none" and t.cache in ("memory", "disk"):
        raise ConfigError(f"train.cache={t.cache!r} freezes one augmented view of the data; with "
                          f"data.augment={d.augment!r} use train.cache='recompute' (or 'auto')")
    if d.augment != "none" and d.name == "synthetic" and len(d.synthetic_shape) != 3:
        raise ConfigError(f"data.augment={d.augment!r} crops images, but data.synthetic_shape="
                          f"{d.synthetic_shape} is flat; set data.augment='none' or a [C,H,W] shape")
    check_applies(cfg)
