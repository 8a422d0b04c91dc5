"""Auxiliary heads: the small classifier each block trains through.

Every head takes a block's output shape, (C, H, W) for conv blocks, (F,) for dense blocks or
(T, D) token features of transformer blocks, and returns class logits. The objective picks the head;
`objective.head` overrides it. Token features go through the token head (`TokenHead`): LayerNorm, the
class token or the mean over tokens (objective.token_pool), then the chosen head on that (D,) vector,
so every head (and so every objective) takes them: khidden / mlpsr: linear, k > 1 adds k-1 hidden
layers of aux_width; dense (cascade): n -> n/2 -> classes; predsim: both branches on the pooled vector;
mixedpool (quicknet's exits and commitment head): the output layer on the pooled vector.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _is_image(shape) -> bool:
    return len(shape) == 3


def is_tokens(shape) -> bool:
    """(T, D): token features of a transformer block."""
    return len(shape) == 2


class ClassTokenPool(nn.Module):
    """(N, T, D) -> (N, D): LayerNorm, then the first token (the class token)."""

    def __init__(self, in_shape):
        super().__init__()
        self.norm = nn.LayerNorm(in_shape[-1])
        self.out_features = in_shape[-1]

    def forward(self, h):
        return self.norm(h)[:, 0]


class MeanTokenPool(ClassTokenPool):
    """(N, T, D) -> (N, D): LayerNorm, then the mean over tokens."""

    def forward(self, h):
        return self.norm(h).mean(1)


TOKEN_POOLS = {"cls": ClassTokenPool, "mean": MeanTokenPool}  # objective.token_pool


class TokenHead(nn.Module):
    """Any head on token features: the pool's (D,) vector into `inner`, a head built for shape (D,)."""

    def __init__(self, pool: nn.Module, inner: nn.Module):
        super().__init__()
        self.pool, self.inner = pool, inner

    def forward(self, h):
        return self.inner(self.pool(h))

    def sim(self, h):
        """predsim's similarity branch (PredSimHead.sim) on the pooled vector."""
        return self.inner.sim(self.pool(h))


class KHiddenHead(nn.Module):
    """Belilovsky et al. 2019: k-1 auxiliary 3x3 convs of constant width, spatial average to 2x2,
    linear. k=1 is average + linear (a 1-hidden-layer problem for the block). On dense features the
    convs become linear layers."""

    def __init__(self, in_shape, num_classes: int, k: int = 1, width: int = 128, batchnorm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        if _is_image(in_shape):
            c, h, w = in_shape
            for _ in range(k - 1):
                layers += [nn.Conv2d(c, width, 3, padding=1, bias=not batchnorm)]
                layers += [nn.BatchNorm2d(width)] if batchnorm else []
                layers += [nn.ReLU()]
                c = width
            pooled = (min(2, h), min(2, w))  # the paper's A: average over the four quadrants
            layers += [nn.AdaptiveAvgPool2d(pooled), nn.Flatten(), nn.Linear(c * pooled[0] * pooled[1], num_classes)]
        else:
            f = math.prod(in_shape)
            layers += [nn.Flatten()]
            for _ in range(k - 1):
                layers += [nn.Linear(f, width), nn.ReLU()]
                f = width
            layers += [nn.Linear(f, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, h):
        return self.net(h)


class MLPSRHead(nn.Module):
    """Belilovsky et al. 2020 (DGL) MLP-SR: reduce the spatial resolution first (average to 2x2),
    then an MLP of k-1 hidden 1x1 convs, then linear: cheap even on early, wide feature maps."""

    def __init__(self, in_shape, num_classes: int, k: int = 1, width: int = 128, batchnorm: bool = True):
        super().__init__()
        if not _is_image(in_shape):
            self.net = KHiddenHead(in_shape, num_classes, k, width, batchnorm).net
            return
        c, h, w = in_shape
        pooled = (min(2, h), min(2, w))
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(pooled)]
        for _ in range(k - 1):
            layers += [nn.Conv2d(c, width, 1, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(width)] if batchnorm else []
            layers += [nn.ReLU()]
            c = width
        layers += [nn.Flatten(), nn.Linear(c * pooled[0] * pooled[1], num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, h):
        return self.net(h)


class DenseHead(nn.Module):
    """Marquez et al. 2018 cascade "output block": flatten -> n -> n/2 -> classes, ReLU between.
    (The paper uses n between 64 and 512 depending on the input size.)"""

    def __init__(self, in_shape, num_classes: int, k: int = 1, width: int = 128, batchnorm: bool = True):
        super().__init__()
        f = math.prod(in_shape)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(f, width), nn.ReLU(),
                                 nn.Linear(width, width // 2), nn.ReLU(), nn.Linear(width // 2, num_classes))

    def forward(self, h):
        return self.net(h)


class PredSimHead(nn.Module):
    """Nokland & Eidnes 2019 (used by Ma 2020): a prediction branch (average-pool to at most ~2048
    features, then linear) and a similarity branch (a 3x3 conv, or a linear layer on dense features,
    whose output similarity matrix is matched to the labels' one)."""

    MAX_FEATURES = 2048

    def __init__(self, in_shape, num_classes: int, k: int = 1, width: int = 128, batchnorm: bool = True):
        super().__init__()
        if _is_image(in_shape):
            c, h, w = in_shape
            s = 1  # largest output side that keeps c*s*s under the cap
            while (s + 1) ** 2 * c <= self.MAX_FEATURES and s < min(h, w):
                s += 1
            self.sim = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.pred = nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Flatten(), nn.Linear(c * s * s, num_classes))
        else:
            f = math.prod(in_shape)
            self.sim = nn.Sequential(nn.Flatten(), nn.Linear(f, f, bias=False))
            self.pred = nn.Sequential(nn.Flatten(), nn.Linear(f, num_classes))

    def forward(self, h):
        return self.pred(h)


class MixedPool(nn.Module):
    """Mixed max-average pooling (Lee et al. 2016) as in the SDN internal classifiers (Kaya et al.
    2019) that QuickNets use: alpha * maxpool + (1 - alpha) * avgpool, alpha learned, down to 4x4.
    Feature maps already 4x4 or smaller pass through; dense features are only flattened."""

    SIDE = 4

    def __init__(self, in_shape):
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(1))
        self.pool = _is_image(in_shape) and max(in_shape[1:]) > self.SIDE
        if self.pool:
            c, h, w = in_shape
            size = (min(self.SIDE, h), min(self.SIDE, w))
            self.max, self.avg = nn.AdaptiveMaxPool2d(size), nn.AdaptiveAvgPool2d(size)
            self.out_features = c * size[0] * size[1]
        else:
            self.out_features = math.prod(in_shape)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, 0.5)  # an even mix to start (SDN draws it uniformly)

    def forward(self, h):
        if self.pool:
            h = self.alpha * self.max(h) + (1 - self.alpha) * self.avg(h)
        return h.flatten(1)


class MixedPoolHead(nn.Module):
    """QuickNet exit: mixed max-average pooling then one linear layer; on dense blocks just the
    output layer ("each early exit consisted of only the output layer", QuickNets appendix)."""

    def __init__(self, in_shape, num_classes: int, k: int = 1, width: int = 128, batchnorm: bool = True):
        super().__init__()
        self.pool = MixedPool(in_shape)
        self.linear = nn.Linear(self.pool.out_features, num_classes)

    def forward(self, h):
        return self.linear(self.pool(h))


class CommitmentHead(nn.Module):
    """QuickNet commitment head: C hidden units (C = number of classes) -> 1 logit, on the block's
    (pooled) output. Positive = the exit commits to its prediction. Not a classifier, so not in HEADS."""

    def __init__(self, in_shape, hidden: int, token_pool: str = "cls"):
        super().__init__()
        self.pool = TOKEN_POOLS[token_pool](in_shape) if is_tokens(in_shape) else MixedPool(in_shape)
        self.net = nn.Sequential(nn.Linear(self.pool.out_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, h):
        return self.net(self.pool(h)).squeeze(-1)


HEADS = {"khidden": KHiddenHead, "mlpsr": MLPSRHead, "dense": DenseHead, "predsim": PredSimHead,
         "mixedpool": MixedPoolHead}


def build_head(name: str, in_shape, num_classes: int, k: int, width: int, batchnorm: bool,
               token_pool: str = "cls") -> nn.Module:
    if is_tokens(in_shape):
        pool = TOKEN_POOLS[token_pool](tuple(in_shape))
        return TokenHead(pool, HEADS[name]((pool.out_features,), num_classes, k=k, width=width, batchnorm=batchnorm))
    return HEADS[name](tuple(in_shape), num_classes, k=k, width=width, batchnorm=batchnorm)
