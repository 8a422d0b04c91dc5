"""VGG with Ma 2020 hierarchy lists (VGG8 [1,1,1,1,1], VGG11 [1,1,2,2,2], VGG16 [2,2,3,3,3],
VGG19 [2,2,4,4,4], VGG8b [2,2,1,1]). Unit = one conv3x3+BN+ReLU; a 2x2 max-pool ends every
stage and belongs to the stage's last unit."""
from dataclasses import dataclass

from torch import nn

from ..config import knob
from .base import (BatchNorm, Dropout, Features, ModelConfig, ModelError, Stages, Width, check_downsamplings,
                   conv_bn_relu, image_hw)


@dataclass
class VGGConfig(Dropout, BatchNorm, Width, Stages, ModelConfig):
    name: str = "vgg"
    channels: list[int] = knob([], ge=1, empty_ok=True)  # explicit channels per stage (else from width)


def vgg_channels(cfg, hierarchy):
    # Explicit per-stage channels (VGG8b: [128, 256, 512, 512]), else double per stage capped at
    # 8x the base width, like VGG's 64..512.
    if cfg.channels:
        if len(cfg.channels) != len(hierarchy) or min(cfg.channels) <= 0:
            raise ModelError(f"model.channels={list(cfg.channels)} must give one positive channel count per "
                             f"stage of model.hierarchy={list(hierarchy)}, or be empty")
        return [int(c) for c in cfg.channels]
    return [min(cfg.width * 2 ** s, cfg.width * 8) for s in range(len(hierarchy))]


def build_vgg(cfg: VGGConfig, input_shape, num_classes):
    hierarchy = list(cfg.hierarchy)
    cin, _, _ = image_hw(cfg, input_shape)
    check_downsamplings(cfg, input_shape, len(hierarchy))  # before allocating anything
    p = float(cfg.dropout)
    units = []
    for n, cout in zip(hierarchy, vgg_channels(cfg, hierarchy)):
        for i in range(n):
            layers = conv_bn_relu(cin, cout, cfg.batchnorm_on())
            if i == n - 1:
                layers.append(nn.MaxPool2d(2))
            if p > 0:  # last in the unit: build_model may move a block's last one after the local loss
                layers.append(nn.Dropout(p))
            units.append(nn.Sequential(*layers))
            cin = cout
    return Features(units), units
