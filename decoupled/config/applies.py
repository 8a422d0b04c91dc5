"""Which keys act on which job: a key a user sets either acts, or is refused (or, for another mode's
keys, noted), so no knob silently does nothing.

A key counts as *set* when its value differs from the dataclass default (a TOML that repeats a default
is harmless: it changes nothing). Keys not listed in APPLIES act on every job. APPLIES keys hang on
the chosen data / model / objective / optimiser: set where they do not act, they are an error naming
the key and what it applies to. Keys that hang on train.mode are declared by the modes (modes.py:
the keys each reads; users flip the mode on one config, so those only get a one-line notice).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .schema import ConfigError, JobConfig

TORCHVISION = ("mnist", "fashion-mnist", "cifar10", "cifar100")
CONV_HIERARCHY = ("vgg", "resnet", "simcnn")
DROPOUT_MODELS = ("mlp", "vgg", "resnet")  # builders that end every unit with dropout (models/base.py)


def head_of(cfg: JobConfig) -> str:
    from ..objectives import OBJECTIVES  # the objective's own head unless objective.head overrides it
    return cfg.objective.head or OBJECTIVES[cfg.objective.name].objective.default_head


def _hidden_head(c: JobConfig) -> bool:  # k-1 hidden layers of aux_width (heads.py)
    return head_of(c) in ("khidden", "mlpsr") and c.objective.k > 1


# key -> (acts on cfg?, what it applies to)
Rule = tuple[Callable[[JobConfig], bool], str]
APPLIES: dict[str, Rule] = {
    "data.root": (lambda c: c.data.name not in ("digits", "synthetic"), "data.name other than digits/synthetic"),
    "data.download": (lambda c: c.data.name in TORCHVISION, f"data.name in {TORCHVISION}"),
    **{f"data.synthetic_{k}": (lambda c: c.data.name == "synthetic", "data.name='synthetic'")
       for k in ("shape", "classes", "train", "test")},
    "model.widths": (lambda c: c.model.name == "mlp", "model.name='mlp'"),
    "model.hierarchy": (lambda c: c.model.name in CONV_HIERARCHY, f"model.name in {CONV_HIERARCHY}"),
    "model.channels": (lambda c: c.model.name == "vgg", "model.name='vgg'"),
    "model.width": (lambda c: c.model.name != "mlp", "the conv models (not mlp: see model.widths)"),
    "model.blocks": (lambda c: not c.model.block_sizes, "an empty model.block_sizes (explicit sizes win)"),
    "model.residual": (lambda c: c.model.name == "resnet", "model.name='resnet'"),
    "model.batchnorm": (lambda c: c.model.name != "resnet", "every model but resnet (always BN)"),
    "model.dropout": (lambda c: c.model.name in DROPOUT_MODELS, f"model.name in {DROPOUT_MODELS}"),
    "model.dropout_position": (lambda c: c.model.name in DROPOUT_MODELS and c.model.dropout > 0,
                               "model.dropout > 0"),
    "model.stem_downsample": (lambda c: c.model.name == "simcnn", "model.name='simcnn'"),
    "objective.k": (lambda c: head_of(c) in ("khidden", "mlpsr"), "the khidden / mlpsr heads"),
    "objective.aux_width": (lambda c: head_of(c) == "dense" or _hidden_head(c),
                            "the dense head (cascade) or khidden / mlpsr heads with objective.k > 1"),
    "objective.head_batchnorm": (lambda c: _hidden_head(c) and c.model.name != "mlp",
                                 "khidden / mlpsr heads with objective.k > 1 on conv features"),
    **{f"objective.cascade_{k}": (lambda c: c.objective.name == "cascade", "objective.name='cascade'")
       for k in ("initial_epochs", "epoch_increment")},
    "objective.predsim_beta": (lambda c: c.objective.name == "predsim", "objective.name='predsim'"),
    **{f"objective.{k}": (lambda c: c.objective.name == "quicknet", "objective.name='quicknet'")
       for k in ("quicknet_threshold", "commit_hidden", "quicknet_balance")},
    "optim.momentum": (lambda c: c.optim.name == "sgd", "optim.name='sgd'"),
    "optim.nesterov": (lambda c: c.optim.name == "sgd", "optim.name='sgd'"),
    "optim.step_epochs": (lambda c: c.optim.schedule == "step", "optim.schedule='step'"),
    "optim.gamma": (lambda c: c.optim.schedule in ("step", "milestones"), "optim.schedule in ('step', 'milestones')"),
    "optim.milestones": (lambda c: c.optim.schedule == "milestones", "optim.schedule='milestones'"),
    "train.keep_checkpoints": (lambda c: c.train.checkpoint, "train.checkpoint=true"),
    "train.plateau_patience": (lambda c: c.train.plateau_factor < 1.0, "train.plateau_factor < 1"),
    "dist.max_stage_mem_mb": (lambda c: c.dist.placement == "auto", "dist.placement='auto'"),
}


def set_keys(cfg: JobConfig) -> list[str]:
    """The keys whose value differs from the dataclass default."""
    default = JobConfig()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))
            if getattr(getattr(cfg, s.name), f.name) != getattr(getattr(default, s.name), f.name)]


def check_applies(cfg: JobConfig) -> None:
    for key in set_keys(cfg):
        if key not in APPLIES:
            continue
        acts, what = APPLIES[key]
        if acts(cfg):
            continue
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        raise ConfigError(f"{key}={value!r} does nothing here: it applies to {what}; remove it (or "
                          "choose what it applies to)")
