"""Simple CNN of Belilovsky et al. 2019 ("Greedy layerwise learning can scale to ImageNet"):
conv3x3+BN+ReLU layers; between stages an invertible downsampling (PixelUnshuffle(2): the
4 decimated copies stacked as channels) and the width doubles. Unit = one conv layer,
together with the downsampling that precedes it."""
from dataclasses import dataclass

from torch import nn

from .base import BatchNorm, Features, ModelConfig, Stages, Width, check_downsamplings, conv_bn_relu, image_hw


@dataclass
class SimCNNConfig(BatchNorm, Width, Stages, ModelConfig):
    name: str = "simcnn"
    stem_downsample: bool = False  # invertible downsampling of the input


def build_simcnn(cfg: SimCNNConfig, input_shape, num_classes):
    hierarchy = list(cfg.hierarchy)
    cin, _, _ = image_hw(cfg, input_shape)
    n_down = len(hierarchy) - 1 + bool(cfg.stem_downsample)
    check_downsamplings(cfg, input_shape, n_down, exact=True,
                        extra=" (incl. model.stem_downsample)" if cfg.stem_downsample else "")
    units = []
    for s, n in enumerate(hierarchy):
        cout = cfg.width * 2 ** s
        for i in range(n):
            layers = []
            if i == 0 and (s > 0 or cfg.stem_downsample):
                layers.append(nn.PixelUnshuffle(2))
                cin *= 4
            layers += conv_bn_relu(cin, cout, cfg.batchnorm_on(), bias=True)  # paper: conv with bias
            units.append(nn.Sequential(*layers))
            cin = cout
    return Features(units), units
