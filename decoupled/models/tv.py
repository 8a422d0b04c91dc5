"""torchvision classification models, split for you (model.name="torchvision:<builder>").

Built untrained (weights=None; [model.args] are passed to the builder as keyword arguments), the
classifier dropped, the rest cut into units at the natural boundaries:
  ResNet / ResNeXt / Wide ResNet: the stem (conv, BN, ReLU, max-pool), then each residual block;
  VGG: each conv with its BN, ReLU and pooling; MobileNet / EfficientNet / ConvNeXt / AlexNet /
  DenseNet / SqueezeNet: the children of `features`;
  ViT: the patch embedding with class token and positions, then each encoder layer (the final
  LayerNorm with the last).
Input channels other than 3 replace the first convolution; a ViT takes image_size from the data.
Named tv.py, not torchvision.py, so that `import torchvision` inside the package finds torchvision.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import ModelError, image_hw

PREFIX = "torchvision:"
FEATURES = ("vgg", "mobilenetv2", "mobilenetv3", "efficientnet", "convnext", "alexnet", "densenet", "squeezenet")
FAMILIES = ("resnet", "vision_transformer", *FEATURES)  # torchvision.models.<family> modules we can split


def _models():
    import torchvision.models  # imported on use: it pulls in torch._dynamo (seconds per process)
    return torchvision.models


def family_of(name: str) -> str:
    """The torchvision module of `torchvision:<builder>`; a ModelError for what we cannot split."""
    arch = name[len(PREFIX):]
    tvm = _models()
    if arch not in tvm.list_models(module=tvm):
        raise ModelError(f"model.name={name!r}: torchvision has no classification model {arch!r}; e.g. "
                         "torchvision:resnet18, vgg11_bn, mobilenet_v3_small, vit_b_16")
    family = tvm.get_model_builder(arch).__module__.rsplit(".", 1)[-1]
    if family not in FAMILIES:
        raise ModelError(f"model.name={name!r}: {family} models are not split into units; supported families: "
                         f"{', '.join(FAMILIES)}")
    return family


def replace_first_conv(model: nn.Module, cin: int) -> None:
    """The first Conv2d re-made for `cin` input channels (1-channel data on an RGB architecture)."""
    for parent in model.modules():
        for child_name, conv in parent.named_children():
            if isinstance(conv, nn.Conv2d):
                if conv.in_channels != cin:
                    setattr(parent, child_name, nn.Conv2d(cin, conv.out_channels, conv.kernel_size, conv.stride,
                                                          conv.padding, conv.dilation, conv.groups,
                                                          conv.bias is not None, conv.padding_mode))
                return


def split_resnet(model) -> list[nn.Module]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return [stem, *(b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer)]


def split_features(model) -> list[nn.Module]:
    children = list(model.features)
    if not any(isinstance(c, nn.Conv2d) for c in children):  # stages already (MobileNet, ConvNeXt, ...)
        return children
    units: list[list[nn.Module]] = []  # VGG: one unit per conv, with what follows it up to the next conv
    for c in children:
        if isinstance(c, nn.Conv2d) or not units:
            units.append([])
        units[-1].append(c)
    return [nn.Sequential(*u) for u in units]


class ViTEmbed(nn.Module):
    """torchvision ViT's input side: patches projected, class token prepended, positions added
    (VisionTransformer._process_input, the class-token concatenation and Encoder's position add)."""

    def __init__(self, vit):
        super().__init__()
        self.conv_proj, self.class_token = vit.conv_proj, vit.class_token
        self.pos_embedding, self.dropout = vit.encoder.pos_embedding, vit.encoder.dropout

    def reset_parameters(self) -> None:  # torchvision's own init of the two, drawn from the block's seed
        nn.init.zeros_(self.class_token)
        nn.init.normal_(self.pos_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


def split_vit(model) -> list[nn.Module]:
    for m in model.encoder.layers.modules():
        if isinstance(m, nn.MultiheadAttention):  # its input projection is re-drawn only by this: per block
            m.reset_parameters = m._reset_parameters  # seed, as the engine draws every layer (Note [plug-in init])
    layers = list(model.encoder.layers)
    return [ViTEmbed(model), *layers[:-1], nn.Sequential(layers[-1], model.encoder.ln)]


def build_original(cfg, input_shape) -> tuple[nn.Module, str]:
    """The untrained torchvision network for this input, first conv and image size adapted."""
    name, args = cfg.name, cfg.args
    family = family_of(name)
    cin, h, w = image_hw(cfg, input_shape)
    kwargs = dict(args)
    if family == "vision_transformer":
        if h != w:
            raise ModelError(f"model.name={name!r} takes square images (image_size), got {h}x{w}")
        kwargs.setdefault("image_size", h)
    try:
        model = _models().get_model(name[len(PREFIX):], weights=None, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ModelError(f"model.name={name!r} cannot be built for input {tuple(input_shape)} with "
                         f"model.args={args}: {e}") from None
    if cin != 3:
        replace_first_conv(model, cin)
    return model, family


def split_units(model: nn.Module, family: str) -> list[nn.Module]:
    """The units of a torchvision network (modules shared with it), by its family (family_of)."""
    return {"resnet": split_resnet, "vision_transformer": split_vit}.get(family, split_features)(model)


def build_torchvision(cfg, input_shape, num_classes):
    model, family = build_original(cfg, input_shape)
    units = split_units(model, family)
    network = nn.Sequential(*units)
    try:  # too small an input fails here, named, rather than inside the engine's shape pass
        with torch.no_grad():
            network.eval()(torch.zeros(1, *input_shape))
    except RuntimeError as e:
        raise ModelError(f"model.name={cfg.name!r} cannot take input {tuple(input_shape)} ({e}); use larger "
                         "images or another model") from None
    return network.train(), units
