"""Vision transformer for small images (model.name="vit"): patch embedding with a class token and
learned positions, then model.depth pre-norm encoder layers of width model.width, model.heads heads and
an MLP of model.mlp_ratio x width; a final LayerNorm. Unit = one encoder layer: the patch embedding
belongs to the first, the final norm to the last. Blocks exchange token features (tokens, width),
tokens = 1 + patches, which the token head (heads.py) reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import knob
from .base import ModelConfig, ModelError, Width, image_hw


@dataclass
class ViTConfig(Width, ModelConfig):
    """model.width is the token width; no batchnorm key (LayerNorm throughout)."""
    name: str = "vit"
    patch_size: int = knob(4, ge=1)  # square patches of this side (must divide the input's H and W)
    depth: int = knob(6, ge=1)  # encoder layers (one unit each)
    heads: int = knob(4, ge=1)  # attention heads (must divide model.width)
    mlp_ratio: float = knob(2.0, gt=0.0)  # the encoder MLP's hidden width = this x model.width
    tokens: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        if self.width % self.heads:
            raise ModelError(f"model.width={self.width} must be divisible by model.heads={self.heads} "
                             "(width per head)")


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, 1 + patches, dim): non-overlapping patches projected, a class token
    prepended, learned positions added."""

    def __init__(self, cin: int, dim: int, patch: int, patches: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, patch)
        self.cls = nn.Parameter(torch.empty(1, 1, dim))
        self.pos = nn.Parameter(torch.empty(1, 1 + patches, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:  # ViT's truncated-normal-like small init, drawn per block seed
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def reset_parameters(self) -> None:
        # the attention's input projection is a bare parameter that torch re-draws only here (the
        # engine's per-block init calls reset_parameters; Linear / LayerNorm children reset themselves)
        self.attn._reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, embed: PatchEmbed, layers: list[EncoderLayer], norm: nn.LayerNorm):
        super().__init__()
        self.embed, self.layers, self.norm = embed, nn.ModuleList(layers), norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def build_vit(cfg: ViTConfig, input_shape, num_classes):
    cin, h, w = image_hw(cfg, input_shape)
    p, dim = cfg.patch_size, cfg.width
    if h % p or w % p:
        raise ModelError(f"model.patch_size={p} must divide the input's {h}x{w}; choose a divisor of both "
                         f"(e.g. {next(d for d in range(min(h, w), 0, -1) if h % d == 0 and w % d == 0 and d <= p)})")
    hidden = max(1, round(cfg.mlp_ratio * dim))
    embed = PatchEmbed(cin, dim, p, (h // p) * (w // p))
    layers = [EncoderLayer(dim, cfg.heads, hidden) for _ in range(cfg.depth)]
    norm = nn.LayerNorm(dim)
    units: list[nn.Module] = list(layers)
    units[0] = nn.Sequential(embed, units[0])
    units[-1] = nn.Sequential(*list(units[-1]) if isinstance(units[-1], nn.Sequential) else [units[-1]], norm)
    return ViT(embed, layers, norm), units
