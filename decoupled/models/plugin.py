"""A model plug-in (decoupled/plugins.py): `build(cfg, input_shape, num_classes)` from user code returns
the list of units, modules whose sequential composition is the network; model.blocks / block_sizes
group them as for the built-in models, and `cfg.args` is the free-form [model.args] table. The same
settings (PluginConfig) serve model.name="torchvision:<builder>" (models/tv.py): its [model.args] are
the builder's keyword arguments."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import knob
from ..plugins import check_callable
from .base import ModelConfig, ModelError


@dataclass
class PluginConfig(ModelConfig):
    """[model] keys of a model from user code or torchvision: the grouping keys, and its own table."""
    # free-form table a model plug-in (model.name = "package.module:build") reads from cfg.args, or the
    # keyword arguments of a torchvision builder (model.name = "torchvision:<builder>"): [model.args] in
    # TOML, --set model.args.KEY=VALUE (docs/plugins.md)
    args: dict = knob({})
    tokens: ClassVar[bool] = True  # its blocks may output token features (a torchvision ViT, a user's)

CALL = "build(cfg, input_shape, num_classes) returning a list of nn.Module units"


def plugin_builder(name: str, build):
    check_callable("model", name, build, CALL, 3)

    def builder(cfg, input_shape, num_classes):
        units = build(cfg, tuple(input_shape), num_classes)
        if isinstance(units, nn.Module) or not isinstance(units, (list, tuple)):
            raise ModelError(f"model.name={name!r} returned {type(units).__name__}; {CALL}")
        bad = [i for i, u in enumerate(units) if not isinstance(u, nn.Module)]
        if not units or bad:
            raise ModelError(f"model.name={name!r} returned {len(units)} units"
                             + (f", of which {bad} are not nn.Module" if bad else "") + f"; {CALL}")
        units = list(units)
        return nn.Sequential(*units), units
    return builder
