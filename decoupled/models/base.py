"""What the model builders share: the error type, the built result, the flat-chain network and the
checks and layer helpers every builder uses."""
from __future__ import annotations

import math
from dataclasses import dataclass

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
