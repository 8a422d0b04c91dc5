"""MLP (QuickNet / cascade MNIST setting: 3 hidden layers of 150). Unit = one hidden layer:
Linear -> BatchNorm (model.batchnorm, as the local-loss reference MLP) -> ReLU -> dropout."""
import math

from torch import nn

from .base import Features, ModelError, batchnorm_on, check_dropout


def build_mlp(cfg, input_shape, num_classes):
    widths = [int(w) for w in cfg.widths]
    if not widths or any(w <= 0 for w in widths):
        raise ModelError(f"model.widths={widths} must be a non-empty list of positive hidden widths")
    p = check_dropout(cfg)
    units, fan_in = [], math.prod(input_shape)
    for i, w in enumerate(widths):
        # Flatten in the first unit so (C,H,W) image data (and its augmentation) works unchanged.
        # A Linear bias is redundant right before BatchNorm, as for the convs.
        layers = ([nn.Flatten()] if i == 0 else []) + [nn.Linear(fan_in, w, bias=not batchnorm_on(cfg))]
        if batchnorm_on(cfg):
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU())
        if p > 0:  # last in the unit: build_model may move a block's last one after the local loss
            layers.append(nn.Dropout(p))
        units.append(nn.Sequential(*layers))
        fan_in = w
    return Features(units), units
