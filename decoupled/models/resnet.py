"""CIFAR-style ResNet (Ma 2020: [2,2,2,2] ResNet18, [1,1,2,2], [3,4,6,3] ResNet34/50, [1,2,8,5])
built from torchvision's BasicBlock / Bottleneck. Unit = one residual block; the stem
(conv3x3+BN+ReLU, no max-pool) is merged into the first unit. With model.dropout every residual block
ends with dropout (after its final ReLU: BN -> non-linearity -> dropout, as Ma et al. 2020)."""
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .base import Dropout, ModelConfig, Stages, Width, check_downsamplings, image_hw


@dataclass
class ResNetConfig(Dropout, Width, Stages, ModelConfig):
    """No batchnorm key: a residual block always has BatchNorm."""
    name: str = "resnet"
    # resnet unit: "basic" (two 3x3 convs) | "bottleneck" (1x1, 3x3, 1x1)
    residual: Literal["basic", "bottleneck"] = "basic"


def residual_unit(name: str):
    # imported here: torchvision.models pulls in torch._dynamo, seconds per process at start-up
    from torchvision.models.resnet import BasicBlock, Bottleneck
    return {"basic": BasicBlock, "bottleneck": Bottleneck}[name]


class ResNetFeatures(nn.Module):
    def __init__(self, stem: nn.Module, layers: list[nn.Sequential]):
        super().__init__()
        self.stem = stem
        self.layers = nn.ModuleList(layers)  # layer1..layerN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return x


def make_layer(block, inplanes: int, planes: int, n: int, stride: int) -> nn.Sequential:
    # Same as torchvision ResNet._make_layer (BatchNorm2d, groups=1, no dilation).
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * block.expansion))
    units = [block(inplanes, planes, stride, downsample)]
    units += [block(planes * block.expansion, planes) for _ in range(n - 1)]
    return nn.Sequential(*units)


def build_resnet(cfg: ResNetConfig, input_shape, num_classes):
    hierarchy = list(cfg.hierarchy)
    block = residual_unit(cfg.residual)
    cin, _, _ = image_hw(cfg, input_shape)
    check_downsamplings(cfg, input_shape, len(hierarchy) - 1)  # stage 0 keeps the resolution
    stem = nn.Sequential(nn.Conv2d(cin, cfg.width, 3, 1, 1, bias=False), nn.BatchNorm2d(cfg.width),
                         nn.ReLU(inplace=True))
    layers, inplanes = [], cfg.width
    for s, n in enumerate(hierarchy):
        planes = cfg.width * 2 ** s
        layers.append(make_layer(block, inplanes, planes, n, 1 if s == 0 else 2))
        inplanes = planes * block.expansion
    p = float(cfg.dropout)
    if p > 0:  # last in the unit: build_model may move a block's last one after the local loss
        layers = [nn.Sequential(*[nn.Sequential(u, nn.Dropout(p)) for u in layer]) for layer in layers]
    units = [m for layer in layers for m in layer]
    units[0] = nn.Sequential(stem, *units[0]) if p > 0 else nn.Sequential(stem, units[0])
    return ResNetFeatures(stem, layers), units
