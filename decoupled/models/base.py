"""What the model builders share: the error type, the settings every model has (and the mixins of
the keys some have), the built result, the flat-chain network and the layer helpers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..config import Choice, ConfigError, knob


class ModelError(ConfigError):
    """A model config that cannot be built; the message names the offending field."""


@dataclass
class ModelConfig(Choice):
    """[model] keys of every model; a model's Config adds the mixins of the keys it has."""
    name: str = ""  # the model (models/__init__.py: MODELS), or a plug-in (docs/plugins.md)
    # decoupled blocks; 0 = one per layer / residual unit
    blocks: int = knob(0, ge=0, acts=(lambda c: not c.model.block_sizes,
                                      "an empty model.block_sizes (explicit sizes win)"))
    block_sizes: list[int] = knob([], ge=1, empty_ok=True)  # explicit units per block
    # the non-linearity of every model's layers (heads keep ReLU): "relu" | "leaky_relu" (negative
    # slope 0.01, Ma et al. 2020). Every unit is conv/linear -> BN -> non-linearity -> dropout.
    activation: Literal["relu", "leaky_relu"] = "relu"
    tokens: ClassVar[bool] = False  # whether its blocks may output token features (T, D): heads.py

    def outlet_dropout(self) -> bool:
        """Whether each block's last dropout moves out of the block, after its local loss (Dropout)."""
        return False


@dataclass
class Width:
    # base channels (vgg/resnet stage 0, simcnn M, allcnn 96 in the paper); vit: the token width
    width: int = knob(64, ge=1)


@dataclass
class Stages:
    hierarchy: list[int] = knob([1, 1, 2, 2], ge=1)  # vgg/resnet/simcnn stages: layers per stage

    def check(self) -> None:
        super().check()
        if not self.hierarchy:
            raise ModelError(f"model.hierarchy is empty; model {self.name!r} needs at least one stage, e.g. [1,1,2,2]")


@dataclass
class BatchNorm:
    # BatchNorm after each conv (vgg/simcnn/allcnn) or Linear (mlp; Linear -> BN -> ReLU, as the
    # local-loss reference MLP); resnet always has it. "auto" = on for the conv models, off for mlp
    # (each model's long-standing default) | "on" | "off"; TOML true / false mean "on" / "off"
    batchnorm: Literal["auto", "on", "off"] = knob("auto", from_bool=("off", "on"))
    batchnorm_auto: ClassVar[bool] = True  # what "auto" means for this model

    def batchnorm_on(self) -> bool:
        return self.batchnorm == "on" or (self.batchnorm == "auto" and self.batchnorm_auto)


@dataclass
class Dropout:
    """The keys of the models whose builders end every unit with nn.Dropout(model.dropout)."""
    dropout: float = knob(0.0, ge=0.0, lt=1.0)  # dropout on each unit's output
    # where a block's last dropout sits relative to its local loss:
    # "after-loss": the loss (and head) see the block's features; dropout acts only on what goes on to
    #   the next block. The reference for predsim (Nokland & Eidnes' local-loss code: loss on h, then
    #   dropout(h) for the next layer), and right for every objective: a head is evaluated on clean
    #   features, and dropout is there to regularise the next layer's input, not the local classifier.
    # "in-block": dropout ends the block, so the local loss sees dropped-out features (runs before
    #   this field existed; kept to reproduce them).
    dropout_position: Literal["after-loss", "in-block"] = knob(
        "after-loss", acts=(lambda c: c.model.dropout > 0, "model.dropout > 0"))

    def outlet_dropout(self) -> bool:
        return self.dropout_position == "after-loss" and self.dropout > 0


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


def conv_bn_relu(cin: int, cout: int, batchnorm: bool, stride: int = 1, kernel: int = 3,
                 bias: bool | None = None) -> list[nn.Module]:
    # A conv bias is redundant right before BatchNorm, so by default drop it there.
    bias = (not batchnorm) if bias is None else bias
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    return layers


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


def split_outlets(blocks: list[nn.Sequential], cfg) -> tuple[list[nn.Sequential], list[nn.Module]]:
    """model.dropout_position="after-loss": take each block's last dropout out of the block, so the
    local loss sees the block's features and only the next block sees them dropped out."""
    if not cfg.outlet_dropout():
        return blocks, [nn.Identity() for _ in blocks]
    kept, outlets = [], []
    for b in blocks:
        *head, last = list(b)
        *body, drop = list(last)
        assert isinstance(drop, nn.Dropout), f"{cfg.name} unit does not end with its dropout"
        kept.append(nn.Sequential(*head, nn.Sequential(*body)))
        outlets.append(drop)
    return kept, outlets
