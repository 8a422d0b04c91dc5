"""Which keys act on which job: a key a user sets either acts, or is refused (or, for another mode's
keys, noted), so no knob silently does nothing.

A key counts as *set* when its value differs from its Config type's default (a TOML that repeats a
default is harmless: it changes nothing). Most keys of a plug-in are its own Config's fields, so they
cannot be set where they do not act (parse.py refuses them). What is left are keys that act only on
some jobs, declared two ways:
- a plug-in's field declares it on itself: `knob(..., acts=(predicate, what))` (e.g. objective.k acts
  on the khidden / mlpsr heads): set where it does not act, an error naming the key and what it
  applies to;
- config/'s own sections in APPLIES below (an error, as above).
The keys that depend on train.mode are the modes' (decoupled/modes.py): set under another mode they
are only noted.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .schema import ConfigError, replicated

TORCHVISION = ("mnist", "fashion-mnist", "cifar10", "cifar100")
ROOT_DATASETS = (*TORCHVISION, "imagefolder")  # the built-in datasets read from data.root

# key -> (acts on the job?, what it applies to)
Rule = tuple[Callable, str]
APPLIES: dict[str, Rule] = {
    "data.root": (lambda c: c.data.name not in ("digits", "synthetic"), "data.name other than digits/synthetic"),
    "data.download": (lambda c: c.data.name in TORCHVISION, f"data.name in {TORCHVISION}"),
    **{f"data.synthetic_{k}": (lambda c: c.data.name == "synthetic", "data.name='synthetic'")
       for k in ("shape", "classes", "train", "test")},
    "train.keep_checkpoints": (lambda c: c.train.checkpoint, "train.checkpoint=true"),
    "train.plateau_patience": (lambda c: c.train.plateau_factor < 1.0, "train.plateau_factor < 1"),
    "dist.max_stage_mem_mb": (lambda c: c.dist.placement == "auto", "dist.placement='auto'"),
    "dist.link_mbps": (lambda c: "auto" in (c.dist.placement, c.dist.replicas),
                       "dist.placement='auto' or dist.replicas='auto'"),
    "dist.replica_batch": (lambda c: replicated(c.dist), "dist.replicas with a group of more than one rank"),
    "dist.allreduce_bucket_mb": (lambda c: replicated(c.dist), "dist.replicas with a group of more than one rank"),
    "train.eval_subset": (lambda c: c.train.eval_every_steps > 0, "train.eval_every_steps > 0 (the mid-epoch "
                          "evaluations' test subset; epoch ends score the whole test set)"),
}


def rules(cfg) -> dict[str, Rule]:
    """APPLIES plus the rules the job's sections declare on their fields (`knob(acts=...)`)."""
    declared = {f"{s.name}.{f.name}": tuple(f.metadata["acts"]) for s in dataclasses.fields(cfg)
                for f in dataclasses.fields(getattr(cfg, s.name)) if "acts" in f.metadata}
    return {**APPLIES, **declared}


def set_keys(cfg) -> list[str]:
    """The keys whose value differs from their Config type's default."""
    out = []
    for s in dataclasses.fields(cfg):
        obj = getattr(cfg, s.name)
        default = type(obj)()
        out += [f"{s.name}.{f.name}" for f in dataclasses.fields(obj)
                if getattr(obj, f.name) != getattr(default, f.name)]
    return out


def check_applies(cfg) -> None:
    known = rules(cfg)
    for key in set_keys(cfg):
        if key not in known:
            continue
        acts, what = known[key]
        if acts(cfg):
            continue
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        raise ConfigError(f"{key}={value!r} does nothing here: it applies to {what}; remove it (or "
                          "choose what it applies to)")
