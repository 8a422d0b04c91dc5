"""Which keys act on which job: a key a user sets either acts, or is refused (or, for another mode's
keys, noted), so no knob silently does nothing.

A key counts as *set* when its value differs from the dataclass default (a TOML that repeats a default
is harmless: it changes nothing). Keys not listed in APPLIES act on every job. Two kinds of rules:
CHOICE keys hang on the chosen data / model / objective / optimiser: set where they do not act, they
are an error naming the key and what it applies to. MODE keys hang on train.mode: users flip the mode
on one config, so those only get a one-line notice on stderr.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

from .schema import DISTRIBUTED_MODES, REPLICA_MODES, ConfigError, JobConfig, replicated

TORCHVISION = ("mnist", "fashion-mnist", "cifar10", "cifar100")
CONV_HIERARCHY = ("vgg", "resnet", "simcnn")
DROPOUT_MODELS = ("mlp", "vgg", "resnet")  # builders that end every unit with dropout (models/base.py)


def head_of(cfg: JobConfig) -> str:
    from ..objectives import OBJECTIVES  # the objective's own head unless objective.head overrides it
    return cfg.objective.head or OBJECTIVES[cfg.objective.name].objective.default_head


def _hidden_head(c: JobConfig) -> bool:  # k-1 hidden layers of aux_width (heads.py)
    return head_of(c) in ("khidden", "mlpsr") and c.objective.k > 1


# key -> (acts on cfg?, what it applies to, "choice" | "mode")
Rule = tuple[Callable[[JobConfig], bool], str, str]
APPLIES: dict[str, Rule] = {
    "data.root": (lambda c: c.data.name not in ("digits", "synthetic"), "data.name other than digits/synthetic",
                  "choice"),
    "data.download": (lambda c: c.data.name in TORCHVISION, f"data.name in {TORCHVISION}", "choice"),
    **{f"data.synthetic_{k}": (lambda c: c.data.name == "synthetic", "data.name='synthetic'", "choice")
       for k in ("shape", "classes", "train", "test")},
    "model.widths": (lambda c: c.model.name == "mlp", "model.name='mlp'", "choice"),
    "model.hierarchy": (lambda c: c.model.name in CONV_HIERARCHY, f"model.name in {CONV_HIERARCHY}", "choice"),
    "model.channels": (lambda c: c.model.name == "vgg", "model.name='vgg'", "choice"),
    "model.width": (lambda c: c.model.name != "mlp", "the conv models (not mlp: see model.widths)", "choice"),
    "model.blocks": (lambda c: not c.model.block_sizes, "an empty model.block_sizes (explicit sizes win)", "choice"),
    "model.residual": (lambda c: c.model.name == "resnet", "model.name='resnet'", "choice"),
    "model.batchnorm": (lambda c: c.model.name != "resnet", "every model but resnet (always BN)", "choice"),
    "model.dropout": (lambda c: c.model.name in DROPOUT_MODELS, f"model.name in {DROPOUT_MODELS}", "choice"),
    "model.dropout_position": (lambda c: c.model.name in DROPOUT_MODELS and c.model.dropout > 0,
                               "model.dropout > 0", "choice"),
    "model.stem_downsample": (lambda c: c.model.name == "simcnn", "model.name='simcnn'", "choice"),
    "objective.k": (lambda c: head_of(c) in ("khidden", "mlpsr"), "the khidden / mlpsr heads", "choice"),
    "objective.aux_width": (lambda c: head_of(c) == "dense" or _hidden_head(c),
                            "the dense head (cascade) or khidden / mlpsr heads with objective.k > 1", "choice"),
    "objective.head_batchnorm": (lambda c: _hidden_head(c) and c.model.name != "mlp",
                                 "khidden / mlpsr heads with objective.k > 1 on conv features", "choice"),
    **{f"objective.cascade_{k}": (lambda c: c.objective.name == "cascade", "objective.name='cascade'", "choice")
       for k in ("initial_epochs", "epoch_increment")},
    "objective.predsim_beta": (lambda c: c.objective.name == "predsim", "objective.name='predsim'", "choice"),
    **{f"objective.{k}": (lambda c: c.objective.name == "quicknet", "objective.name='quicknet'", "choice")
       for k in ("quicknet_threshold", "commit_hidden", "quicknet_balance")},
    "optim.momentum": (lambda c: c.optim.name == "sgd", "optim.name='sgd'", "choice"),
    "optim.nesterov": (lambda c: c.optim.name == "sgd", "optim.name='sgd'", "choice"),
    "optim.step_epochs": (lambda c: c.optim.schedule == "step", "optim.schedule='step'", "choice"),
    "optim.gamma": (lambda c: c.optim.schedule in ("step", "milestones"), "optim.schedule in ('step', 'milestones')",
                    "choice"),
    "optim.milestones": (lambda c: c.optim.schedule == "milestones", "optim.schedule='milestones'", "choice"),
    "train.keep_checkpoints": (lambda c: c.train.checkpoint, "train.checkpoint=true", "choice"),
    "train.plateau_patience": (lambda c: c.train.plateau_factor < 1.0, "train.plateau_factor < 1", "choice"),
    **{f"train.{k}": (lambda c: c.train.mode == "e2e", "train.mode='e2e'", "mode")
       for k in ("probe_epochs", "e2e_loss", "activation_checkpointing")},
    "train.cache": (lambda c: c.train.mode in ("sequential", "quicknet", "async"),
                    "train.mode in ('sequential', 'quicknet', 'async')", "mode"),
    **{f"dist.{f.name}": (lambda c: c.train.mode in DISTRIBUTED_MODES, f"train.mode in {DISTRIBUTED_MODES}", "mode")
       for f in dataclasses.fields(JobConfig().dist)},
    **{f"replay.{f.name}": (lambda c: c.train.mode == "async", "train.mode='async'", "mode")
       for f in dataclasses.fields(JobConfig().replay)},
    # the activations' dtype between blocks: on the wire, and at the block boundaries of the
    # single-process modes (so that sync equals simultaneous); end-to-end backprop has no boundary
    "dist.wire_dtype": (lambda c: c.train.mode != "e2e", "train.mode other than 'e2e' (block boundaries)", "mode"),
    "dist.max_stage_mem_mb": (lambda c: c.dist.placement == "auto", "dist.placement='auto'", "choice"),
    # stage groups: the simultaneous reference accumulates R batches per step where sync has R replicas,
    # and needs the blocks-to-groups split for that
    "dist.replicas": (lambda c: c.train.mode in REPLICA_MODES, f"train.mode in {REPLICA_MODES}", "mode"),
    "dist.placement": (lambda c: c.train.mode in DISTRIBUTED_MODES or (c.train.mode == "simultaneous"
                                                                       and replicated(c.dist)),
                       f"train.mode in {DISTRIBUTED_MODES}, or 'simultaneous' with dist.replicas", "mode"),
    "dist.sync_bn": (lambda c: c.train.mode in DISTRIBUTED_MODES and replicated(c.dist),
                     "train.mode in ('sync', 'async') with dist.replicas (a group of more than one rank)", "choice"),
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
        acts, what, kind = APPLIES[key]
        if acts(cfg):
            continue
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if kind == "mode":
            print(f"notice: {key}={value!r} applies to {what}; ignored with train.mode={cfg.train.mode!r}",
                  file=sys.stderr)
        else:
            raise ConfigError(f"{key}={value!r} does nothing here: it applies to {what}; remove it (or "
                              "choose what it applies to)")
