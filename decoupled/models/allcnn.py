"""All-CNN-C (Springenberg 2015) as used for cascade learning (Marquez 2018), without its
classifier (final 1x1 conv to classes + global average pool live in the heads).
Unit = one conv+BN+ReLU. Pad 1 everywhere so small inputs (8x8 digits) work."""
from dataclasses import dataclass

from torch import nn

from .base import BatchNorm, Features, ModelConfig, ModelError, Width, conv_bn_relu, image_hw


@dataclass
class AllCNNConfig(BatchNorm, Width, ModelConfig):
    name: str = "allcnn"

# (width multiplier, stride, kernel) per conv
ALLCNN_C = [(1, 1, 3), (1, 1, 3), (1, 2, 3), (2, 1, 3), (2, 1, 3), (2, 2, 3), (2, 1, 3), (2, 1, 1)]


def build_allcnn(cfg: AllCNNConfig, input_shape, num_classes):
    cin, h, w = image_hw(cfg, input_shape)
    if h < 4 or w < 4:
        raise ModelError(f"model.name='allcnn' needs data at least 4x4 (two stride-2 convs), got {h}x{w}; "
                         f"use larger data or another model")
    units = []
    for mult, stride, k in ALLCNN_C:
        cout = cfg.width * mult
        units.append(nn.Sequential(*conv_bn_relu(cin, cout, cfg.batchnorm_on(), stride, k)))
        cin = cout
    return Features(units), units
