"""Feature extractors split into *units* (finest trainable pieces) grouped into *blocks*.

Every builder in MODELS returns ``(network, units)``: ``network`` is one module with its
own forward, ``units`` are modules shared with it whose sequential composition is
exactly ``network``. ``build_model`` groups the units into blocks (one per decoupled
worker) and records each block's output shape so auxiliary heads can be sized.
Adding a model = one file with a builder + one line in MODELS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class ModelError(ValueError):
    """A model config that cannot be built; the message names the offending field."""


@dataclass
class Built:
    network: nn.Module  # full feature extractor, shares parameters with `blocks`
    blocks: list[nn.Module]  # nn.Sequential of consecutive units
    shapes: list[tuple[int, ...]]  # output shape of each block, no batch dim
    units_per_block: list[int]
    # per block, what is applied to its output before the next block takes it (not seen by the local
    # loss): the block's last dropout with model.dropout_position="after-loss", else Identity
    outlets: list[nn.Module]


class Features(nn.Module):
    """Network for models that are a flat chain of layers (mlp, vgg, simcnn, allcnn).

    It holds the layers flattened (not the units), so that comparing its forward with
    the composed blocks actually checks the unit/block split."""

    def __init__(self, units: list[nn.Module]):
        super().__init__()
        self.features = nn.Sequential(*[m for u in units for m in u])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# ---- validation helpers shared by the builders (defined before the model imports) ----

def check_hierarchy(cfg) -> list[int]:
    h = list(cfg.hierarchy)
    if not h:
        raise ModelError(f"model.hierarchy is empty; model {cfg.name!r} needs at least one stage, e.g. [1,1,2,2]")
    if any(int(n) <= 0 for n in h):
        raise ModelError(f"model.hierarchy={h} has non-positive entries; every stage needs >= 1 layer")
    if cfg.width <= 0:
        raise ModelError(f"model.width={cfg.width} must be positive")
    return [int(n) for n in h]


def image_hw(cfg, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelError(f"model.name={cfg.name!r} needs (C,H,W) image data, got input shape {tuple(input_shape)}")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


def check_downsamplings(cfg, input_shape, n_down: int, exact: bool = False, extra: str = "") -> None:
    """Each downsampling halves H and W; refuse inputs that would shrink below 1x1
    (or, with exact=True, that are not divisible: invertible downsampling drops nothing).
    Every stage but the first downsamples, except vgg (its pool ends every stage)."""
    _, h, w = image_hw(cfg, input_shape)
    need = 2 ** n_down
    ok = (h % need == 0 and w % need == 0) if exact else (h >= need and w >= need)
    if ok:
        return
    if exact:  # largest power of 2 dividing both H and W
        fit = min((h & -h).bit_length(), (w & -w).bit_length()) - 1
        why = f"{n_down} invertible downsamplings{extra} need H and W divisible by {need}"
    else:
        fit = int(math.log2(min(h, w)))
        why = f"{n_down} downsamplings need at least {need}x{need}"
    stages = fit + len(cfg.hierarchy) - n_down  # stages that would fit
    other = "an input divisible by a higher power of 2" if exact else "a larger input"
    hint = f"use at most {stages} stage{'s' * (stages != 1)} or {other}" if stages >= 1 else f"use {other}"
    raise ModelError(f"model.hierarchy={list(cfg.hierarchy)} is incompatible with input {h}x{w}: {why}; {hint}")


def batchnorm_on(cfg) -> bool:
    """model.batchnorm resolved: "auto" is on for the conv models, off for the mlp."""
    return cfg.batchnorm == "on" or (cfg.batchnorm == "auto" and cfg.name != "mlp")


def conv_bn_relu(cin: int, cout: int, batchnorm: bool, stride: int = 1, kernel: int = 3,
                 bias: bool | None = None) -> list[nn.Module]:
    # A conv bias is redundant right before BatchNorm, so by default drop it there.
    bias = (not batchnorm) if bias is None else bias
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    return layers


# The models whose builders end every unit with nn.Dropout(model.dropout) (config rules reject
# model.dropout for the others rather than ignore it).
DROPOUT_MODELS = ("mlp", "vgg", "resnet")
LEAKY_SLOPE = 0.01  # model.activation="leaky_relu": Ma et al. 2020's negative slope


def set_activation(module: nn.Module, activation: str) -> None:
    """model.activation: swap every nn.ReLU of a built network (torchvision's residual blocks
    included: they hold theirs as an attribute) for LeakyReLU(0.01), in place."""
    if activation == "relu":
        return
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.ReLU:
                setattr(parent, name, nn.LeakyReLU(LEAKY_SLOPE, inplace=child.inplace))


def check_dropout(cfg) -> float:
    if not 0.0 <= cfg.dropout < 1.0:
        raise ModelError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    return float(cfg.dropout)


def split_outlets(blocks: list[nn.Sequential], cfg) -> tuple[list[nn.Sequential], list[nn.Module]]:
    """model.dropout_position="after-loss": take each block's last dropout out of the block, so the
    local loss sees the block's features and only the next block sees them dropped out."""
    if cfg.dropout_position != "after-loss" or cfg.name not in DROPOUT_MODELS or cfg.dropout == 0:
        return blocks, [nn.Identity() for _ in blocks]
    kept, outlets = [], []
    for b in blocks:
        *head, last = list(b)
        *body, drop = list(last)
        assert isinstance(drop, nn.Dropout), f"{cfg.name} unit does not end with its dropout"
        kept.append(nn.Sequential(*head, nn.Sequential(*body)))
        outlets.append(drop)
    return kept, outlets


# ---- registry ----

from .allcnn import build_allcnn  # noqa: E402  (builders import the helpers above)
from .mlp import build_mlp  # noqa: E402
from .resnet import build_resnet  # noqa: E402
from .simcnn import build_simcnn  # noqa: E402
from .vgg import build_vgg  # noqa: E402

MODELS: dict[str, Callable] = {
    "mlp": build_mlp,
    "vgg": build_vgg,
    "resnet": build_resnet,
    "simcnn": build_simcnn,
    "allcnn": build_allcnn,
}


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
            raise ModelError(f"model.blocks={blocks} must be between 0 and the number of units ({n}); 0 = one block per unit")
        k = blocks or n
        q, r = divmod(n, k)
        sizes = [q + (i < r) for i in range(k)]
    out, start = [], 0
    for s in sizes:
        out.append(nn.Sequential(*units[start:start + s]))
        start += s
    return out


def build_model(cfg, input_shape: tuple[int, ...], num_classes: int) -> Built:
    """Build the feature extractor named by cfg.name and split it into blocks.
    num_classes is unused here: class logits belong to the auxiliary heads."""
    if cfg.name not in MODELS:
        raise ModelError(f"model.name={cfg.name!r} is unknown; choose one of {sorted(MODELS)}")
    network, units = MODELS[cfg.name](cfg, tuple(input_shape), num_classes)
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
