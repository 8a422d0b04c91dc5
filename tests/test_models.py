"""Models: blocks compose to the network exactly, shapes/params agree, bad configs name the field."""
from dataclasses import fields, replace

import pytest
import torch
from torch import nn

from decoupled.models import MODELS, ModelConfig, ModelError, build_model, group_units

torch.set_num_threads(1)

SMALL = dict(widths=[16, 12, 8], hierarchy=[1, 2], width=4)  # tiny defaults, where the model has the key


def Cfg(name: str = "mlp", **kw):  # noqa: N802 (reads as the config it builds)
    """The model's own Config (an unknown name: the base settings, for build_model to refuse)."""
    if name not in MODELS:
        return ModelConfig(name=name, **kw)
    cls = MODELS[name].Config
    small = {k: v for k, v in SMALL.items() if k in {f.name for f in fields(cls)}}
    return cls(name=name, **{**small, **kw})


CASES = [  # (cfg, input shape)
    (Cfg("mlp", dropout=0.1), (1, 8, 8)),
    (Cfg("mlp"), (3, 32, 32)),
    (Cfg("vgg", hierarchy=[1, 1, 1]), (1, 8, 8)),
    (Cfg("vgg", hierarchy=[1, 2], batchnorm="off", dropout=0.2), (3, 32, 32)),
    (Cfg("resnet", hierarchy=[1, 1, 1]), (1, 8, 8)),
    (Cfg("resnet", hierarchy=[1, 2], residual="bottleneck"), (3, 32, 32)),
    (Cfg("simcnn", hierarchy=[1, 1, 1]), (1, 8, 8)),
    (Cfg("simcnn", hierarchy=[2, 1], stem_downsample=True, batchnorm="off"), (3, 32, 32)),
    (Cfg("allcnn"), (1, 8, 8)),
    (Cfg("allcnn", batchnorm="off"), (3, 32, 32)),
    (Cfg("vit"), (1, 8, 8)),
    (Cfg("vit", depth=3, patch_size=4, width=8, mlp_ratio=1.0), (3, 32, 32)),
]
IDS = [f"{c.name}-{'x'.join(map(str, s))}-{i}" for i, (c, s) in enumerate(CASES)]


def check_composition(built, shape):
    built.network.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        y, outs = x, []
        for b in built.blocks:
            y = b(y)
            outs.append(tuple(y.shape[1:]))
        assert torch.equal(built.network(x), y)
    assert outs == built.shapes
    assert len(built.blocks) == len(built.units_per_block) == len(built.shapes)
    n_params = sum(p.numel() for b in built.blocks for p in b.parameters())
    assert n_params == sum(p.numel() for p in built.network.parameters())
    # blocks share their parameters with the network, they are not copies
    net_ids = {id(p) for p in built.network.parameters()}
    assert all(id(p) in net_ids for b in built.blocks for p in b.parameters())


@pytest.mark.parametrize("cfg,shape", CASES, ids=IDS)
def test_blocks_compose_to_network(cfg, shape):
    built = build_model(cfg, shape, 10)
    assert not isinstance(built.network, torch.nn.Sequential)
    assert built.units_per_block == [1] * len(built.blocks)
    assert built.network.training  # build must not leave the model in eval mode
    check_composition(built, shape)


@pytest.mark.parametrize("cfg,shape", CASES, ids=IDS)
def test_grouping_preserves_composition(cfg, shape):
    n_units = len(build_model(cfg, shape, 10).blocks)
    two = build_model(replace(cfg, blocks=2), shape, 10)
    assert two.units_per_block == [n_units - n_units // 2, n_units // 2]  # earlier block gets the extra
    check_composition(two, shape)
    rest = n_units - 1
    sized = build_model(replace(cfg, block_sizes=[1, rest]), shape, 10)
    assert sized.units_per_block == [1, rest]
    check_composition(sized, shape)


def test_group_units_balanced_split():
    units = [torch.nn.Identity() for _ in range(7)]
    assert [len(b) for b in group_units(units, 3, [])] == [3, 2, 2]
    assert [len(b) for b in group_units(units, 0, [])] == [1] * 7
    assert [len(b) for b in group_units(units, 5, [1, 2, 4])] == [1, 2, 4]  # block_sizes win
    with pytest.raises(ModelError, match="model.blocks"):
        group_units(units, -1, [])


def test_expected_shapes():
    assert build_model(Cfg("mlp"), (1, 8, 8), 10).shapes == [(16,), (12,), (8,)]
    assert build_model(Cfg("vgg", hierarchy=[1, 2]), (3, 32, 32), 10).shapes == [(4, 16, 16), (8, 16, 16), (8, 8, 8)]
    assert build_model(Cfg("resnet", hierarchy=[1, 1]), (3, 32, 32), 10).shapes == [(4, 32, 32), (8, 16, 16)]
    sim = build_model(Cfg("simcnn", hierarchy=[1, 1], stem_downsample=True), (3, 32, 32), 10)
    assert sim.shapes == [(4, 16, 16), (8, 8, 8)]
    assert build_model(Cfg("allcnn"), (1, 8, 8), 10).shapes[-1] == (8, 2, 2)


@pytest.mark.parametrize("cfg", [
    Cfg("vgg", hierarchy=[2, 2, 1, 1]), Cfg("vgg", hierarchy=[1, 1, 2, 2, 2]),
    Cfg("resnet", hierarchy=[2, 2, 2, 2]), Cfg("resnet", hierarchy=[3, 4, 6, 3], residual="bottleneck"),
], ids=["vgg8b", "vgg11", "resnet18", "resnet50"])
def test_ma2020_hierarchies(cfg):
    built = build_model(replace(cfg, width=8), (3, 32, 32), 10)
    assert len(built.blocks) == sum(cfg.hierarchy)
    side = 32 // 2 ** (len(cfg.hierarchy) - (cfg.name == "resnet"))  # vgg pools every stage
    assert built.shapes[-1][1:] == (side, side)


def test_vgg_explicit_channels_per_stage():
    assert build_model(Cfg("vgg", channels=[5, 7], hierarchy=[1, 1]), (1, 8, 8), 10).shapes == [(5, 4, 4), (7, 2, 2)]
    assert build_model(Cfg("vgg", hierarchy=[1, 1]), (1, 8, 8), 10).shapes == [(4, 4, 4), (8, 2, 2)]
    with pytest.raises(ModelError, match="model.channels"):
        build_model(Cfg("vgg", channels=[5], hierarchy=[1, 1]), (1, 8, 8), 10)


@pytest.mark.parametrize("cfg,shape,field", [
    (Cfg("vgg", hierarchy=[1, 1, 1, 1, 1]), (1, 8, 8), "model.hierarchy"),
    (Cfg("resnet", hierarchy=[1, 1, 1, 1, 1]), (1, 8, 8), "model.hierarchy"),
    (Cfg("simcnn", hierarchy=[1, 1, 1, 1, 1]), (1, 8, 8), "model.hierarchy"),
    (Cfg("simcnn", hierarchy=[1, 1, 1, 1]), (1, 28, 28), "model.hierarchy"),  # 28 not divisible by 8
    (Cfg("vgg", hierarchy=[]), (1, 8, 8), "model.hierarchy"),
    (Cfg("resnet", hierarchy=[]), (1, 8, 8), "model.hierarchy"),
    (Cfg("simcnn", hierarchy=[1, 0]), (1, 8, 8), "model.hierarchy"),
    (Cfg("vgg", hierarchy=[1, -1]), (1, 8, 8), "model.hierarchy"),
    (Cfg("mlp", widths=[]), (1, 8, 8), "model.widths"),
    (Cfg("resnet", residual="wide"), (1, 8, 8), "model.residual"),
    (Cfg("allcnn"), (1, 2, 2), "model.name"),
    (Cfg("transformer"), (1, 8, 8), "model.name"),
    (Cfg("mlp", block_sizes=[1, 1]), (1, 8, 8), "model.block_sizes"),
    (Cfg("vgg", hierarchy=[1, 1], block_sizes=[2, 0]), (1, 8, 8), "model.block_sizes"),
    (Cfg("mlp", blocks=4), (1, 8, 8), "model.blocks"),
    (Cfg("mlp", dropout=1.0), (1, 8, 8), "model.dropout"),
])
def test_bad_config_names_the_field(cfg, shape, field):
    with pytest.raises(ModelError, match=field.replace(".", r"\.")):
        build_model(cfg, shape, 10)


def test_bad_hierarchy_message_is_actionable():
    with pytest.raises(ModelError) as e:
        build_model(Cfg("vgg", hierarchy=[1, 1, 1, 1, 1]), (1, 8, 8), 10)
    assert "8x8" in str(e.value) and "at most 3 stages" in str(e.value)


def test_registry_lists_all_models():
    assert set(MODELS) == {"mlp", "vgg", "resnet", "simcnn", "allcnn", "vit"}


@pytest.mark.parametrize("batchnorm", ["on", "off", "auto"])
def test_mlp_follows_batchnorm(batchnorm):
    """model.batchnorm acts on the mlp: Linear -> BatchNorm1d -> ReLU, as the local-loss reference."""
    built = build_model(Cfg("mlp", batchnorm=batchnorm), (1, 8, 8), 10)
    for b in built.blocks:
        assert any(isinstance(m, nn.BatchNorm1d) for m in b.modules()) == (batchnorm == "on")  # auto: off for mlp


@pytest.mark.parametrize("position", ["after-loss", "in-block"])
def test_dropout_position(position):
    """after-loss: each block's last dropout is its outlet (the local loss sees clean features)."""
    built = build_model(Cfg("mlp", dropout=0.5, dropout_position=position), (1, 8, 8), 10)
    for b, outlet in zip(built.blocks, built.outlets):
        in_block = any(isinstance(m, nn.Dropout) for m in b.modules())
        assert in_block == (position == "in-block")
        assert isinstance(outlet, nn.Dropout if position == "after-loss" else nn.Identity)
