"""MLP (QuickNet / cascade MNIST setting: 3 hidden layers of 150). Unit = one hidden layer:
Linear -> BatchNorm (model.batchnorm, as the local-loss reference MLP) -> ReLU -> dropout."""
import math
from dataclasses import dataclass

from torch import nn

from ..config import knob
from .base import BatchNorm, Dropout, Features, ModelConfig, ModelError


@dataclass
class MLPConfig(Dropout, BatchNorm, ModelConfig):
    name: str = "mlp"
    widths: list[int] = knob([150, 150, 150], ge=1)  # hidden widths
    batchnorm_auto = False  # the local-loss reference MLP has no BatchNorm unless asked

    def check(self) -> None:
        super().check()
        if not self.widths:
            raise ModelError(f"model.widths={self.widths} must be a non-empty list of positive hidden widths")


def build_mlp(cfg: MLPConfig, input_shape, num_classes):
    widths = [int(w) for w in cfg.widths]
    p = float(cfg.dropout)
    units, fan_in = [], math.prod(input_shape)
    for i, w in enumerate(widths):
        # Flatten in the first unit so (C,H,W) image data (and its augmentation) works unchanged.
        # A Linear bias is redundant right before BatchNorm, as for the convs.
        layers = ([nn.Flatten()] if i == 0 else []) + [nn.Linear(fan_in, w, bias=not cfg.batchnorm_on())]
        if cfg.batchnorm_on():
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU())
        if p > 0:  # last in the unit: build_model may move a block's last one after the local loss
            layers.append(nn.Dropout(p))
        units.append(nn.Sequential(*layers))
        fan_in = w
    return Features(units), units
