"""Feature extractors split into *units* (finest trainable pieces) grouped into *blocks*.

Every entry of MODELS is a spec: the model's settings (its Config dataclass: the [model] keys it
has) and its builder. A builder returns ``(network, units)``: ``network`` is one module with its
own forward, ``units`` are modules shared with it whose sequential composition is
exactly ``network``. ``build_model`` groups the units into blocks (one per decoupled
worker) and records each block's output shape so auxiliary heads can be sized.
Adding a model = one file with a Config and a builder + one line in MODELS. Names outside MODELS: a
model plug-in (decoupled/plugins.py, models/plugin.py) or "torchvision:<builder>" (models/tv.py): see
`spec_for`; both take the plug-in Config (models/plugin.py: model.args plus the grouping keys).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import ConfigError, check_section
from ..plugins import resolve
from .allcnn import AllCNNConfig, build_allcnn
from .base import Built, Features, ModelConfig, ModelError, set_activation, split_outlets
from .mlp import MLPConfig, build_mlp
from .plugin import PluginConfig, plugin_builder
from .resnet import ResNetConfig, build_resnet
from .simcnn import SimCNNConfig, build_simcnn
from .tv import PREFIX as TORCHVISION, build_torchvision, family_of
from .vgg import VGGConfig, build_vgg
from .vit import ViTConfig, build_vit

__all__ = ["MODELS", "Built", "Features", "ModelConfig", "ModelError", "ModelSpec", "PluginConfig", "TORCHVISION",
           "build_model", "group_units", "spec_for"]


@dataclass(frozen=True)
class ModelSpec:
    Config: type[ModelConfig]  # the [model] keys this model has
    build: Callable  # (config, input shape, classes) -> (network, units)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(MLPConfig, build_mlp),
    "vgg": ModelSpec(VGGConfig, build_vgg),
    "resnet": ModelSpec(ResNetConfig, build_resnet),
    "simcnn": ModelSpec(SimCNNConfig, build_simcnn),
    "allcnn": ModelSpec(AllCNNConfig, build_allcnn),
    "vit": ModelSpec(ViTConfig, build_vit),
}


def spec_for(name: str) -> ModelSpec | None:
    """The spec model.name names: built-in, "torchvision:<builder>", or a plug-in (import path or entry
    point); None when it is none of them. Plug-in problems raise a ConfigError naming model.name, so the
    job's choice of Config (decoupled/job.py) refuses them while the config loads."""
    if name in MODELS:
        return MODELS[name]
    if name.startswith(TORCHVISION):
        family_of(name)  # what we cannot split fails here, at config load
        return ModelSpec(PluginConfig, build_torchvision)
    build = resolve("model", name)
    return None if build is None else ModelSpec(PluginConfig, plugin_builder(name, build))


def group_units(units: list[nn.Module], blocks: int, block_sizes: list[int]) -> list[nn.Sequential]:
    """Split units contiguously into blocks: explicit `block_sizes` win; otherwise
    `blocks` balanced blocks (earlier blocks take the remainder); blocks=0 = one per unit."""
    n = len(units)
    if block_sizes:
        sizes = [int(s) for s in block_sizes]
        if any(s <= 0 for s in sizes) or sum(sizes) != n:
            raise ModelError(f"model.block_sizes={sizes} must be positive and sum to the number of units ({n})")
    else:
        if blocks < 0 or blocks > n:
            raise ModelError(f"model.blocks={blocks} must be between 0 and the number of units ({n}); "
                             "0 = one block per unit")
        k = blocks or n
        q, r = divmod(n, k)
        sizes = [q + (i < r) for i in range(k)]
    out, start = [], 0
    for s in sizes:
        out.append(nn.Sequential(*units[start:start + s]))
        start += s
    return out


# Note [plug-in init]: the engine re-draws every layer that has reset_parameters from its block's seed;
# what a foreign builder creates otherwise (a bare class token, attention's input projection) keeps its
# construction-time value. Those are drawn under a fixed seed, so every rank holds the same ones
# whatever the global RNG has done on that rank (sync equals simultaneous bit for bit).
def build_model(cfg, input_shape: tuple[int, ...], num_classes: int) -> Built:
    """Build the feature extractor named by cfg.name and split it into blocks.
    num_classes is unused here: class logits belong to the auxiliary heads."""
    spec = spec_for(cfg.name)
    if spec is None:
        raise ModelError(f"model.name={cfg.name!r} is unknown; choose one of {sorted(MODELS)}, "
                         "\"torchvision:<builder>\" or a plug-in \"package.module:build\"")
    try:  # the keys' rules have one home, the Config; code may call this without loading a job
        check_section("model", cfg, {})
    except ModelError:
        raise
    except ConfigError as e:
        raise ModelError(str(e)) from None
    if cfg.name in MODELS:
        network, units = spec.build(cfg, tuple(input_shape), num_classes)
    else:  # Note [plug-in init]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network, units = spec.build(cfg, tuple(input_shape), num_classes)
    for m in [network, *units]:  # Features holds the units' layers in its own container: swap in both
        set_activation(m, cfg.activation)
    blocks, outlets = split_outlets(group_units(units, cfg.blocks, cfg.block_sizes), cfg)
    # Shapes from one dummy sample; eval mode so BatchNorm neither needs a batch > 1
    # nor has its running statistics touched.
    shapes = []
    was_training = network.training
    network.eval()
    with torch.no_grad():
        x = torch.zeros(1, *input_shape)
        for b in blocks:
            x = b(x)
            shapes.append(tuple(x.shape[1:]))
    network.train(was_training)
    return Built(network, list(blocks), shapes, [len(b) for b in blocks], outlets)
