"""A model plug-in (decoupled/plugins.py): `build(cfg, input_shape, num_classes)` from user code returns
the list of units, modules whose sequential composition is the network; model.blocks / block_sizes
group them as for the built-in models, and `cfg.args` is the free-form [model.args] table."""
from __future__ import annotations

from torch import nn

from ..plugins import check_callable
from .base import ModelError

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
