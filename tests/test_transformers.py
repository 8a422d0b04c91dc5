"""Issue 24: torchvision models split into units, the built-in ViT, token features across ranks and the
token head under every objective."""
from __future__ import annotations

import pytest
import torch

from decoupled.job import ConfigError, choose, load
from decoupled.models import ModelError, build_model, tv
from decoupled.objectives import OBJECTIVES, build_objective
from torchrun_utils import assert_same_results, assert_same_states, check, sets, summary, torchrun


def _reference_features(model, family: str, x):
    """The original network's own forward, up to (not including) its classifier."""
    if family == "resnet":
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.layer4(model.layer3(model.layer2(model.layer1(x))))
    if family == "vision_transformer":
        x = model._process_input(x)
        return model.encoder(torch.cat([model.class_token.expand(len(x), -1, -1), x], dim=1))
    return model.features(x)


@pytest.mark.parametrize("arch,shape,n_units", [("resnet18", (3, 32, 32), 9), ("vgg11_bn", (1, 32, 32), 8),
                                                ("mobilenet_v3_small", (3, 32, 32), 13),
                                                ("vit_b_16", (3, 32, 32), 13)])
def test_torchvision_units_compose_to_the_original_features(arch, shape, n_units):
    torch.manual_seed(0)
    model, family = tv.build_original(choose("model", f"torchvision:{arch}"), shape)
    units = tv.split_units(model, family)
    assert len(units) == n_units
    model.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        h = x
        for u in units:
            h = u(h)
        assert torch.equal(h, _reference_features(model, family, x))


def test_torchvision_model_builds_as_blocks_for_one_channel_input():
    built = build_model(choose("model", "torchvision:resnet18", blocks=3), (1, 28, 28), 10)
    assert built.units_per_block == [3, 3, 3] and built.shapes[-1] == (512, 1, 1)
    with pytest.raises(ModelError, match="takes square images"):
        build_model(choose("model", "torchvision:vit_b_16"), (3, 32, 48), 10)
    with pytest.raises(ModelError, match="not split into units; supported families"):
        tv.family_of("torchvision:googlenet")


def test_vit_blocks_compose_to_the_whole_network():
    cfg = choose("model", "vit", width=32, depth=4, heads=4, patch_size=4, blocks=2)
    built = build_model(cfg, (1, 28, 28), 10)
    assert built.units_per_block == [2, 2] and built.shapes == [(50, 32), (50, 32)]
    built.network.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        h = x
        for b in built.blocks:
            h = b.eval()(h)
        assert torch.equal(h, built.network(x))


def test_vit_keys_checked():
    with pytest.raises(ModelError, match="model.patch_size=3 must divide the input's 8x8"):
        build_model(choose("model", "vit", patch_size=3), (1, 8, 8), 10)
    with pytest.raises(ModelError, match="model.width=30 must be divisible by model.heads=4"):
        build_model(choose("model", "vit", width=30), (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="model.depth=3 does nothing here: it applies to model.name='vit'"):
        load(None, ["model.depth=3"])
    with pytest.raises(ConfigError, match="model.width=30 must be divisible by model.heads=4"):
        load(None, ["model.name=vit", "model.width=30"])  # ViTConfig.check, at config load
    with pytest.raises(ConfigError, match="objective.token_pool='mean' does nothing here: it applies to token"):
        load(None, ["model.name=vgg", "objective.token_pool=mean"])
    assert load(None, ["model.name=vit", "objective.token_pool=mean"]).objective.token_pool == "mean"


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_every_objective_takes_token_features(name, pool):
    cfg = choose("objective", name, k=2, aux_width=8, token_pool=pool)
    obj = build_objective(cfg, (5, 16), 10)
    h, y = torch.randn(6, 5, 16, requires_grad=True), torch.randint(0, 10, (6,))
    out = obj(h, y)
    out.loss.backward()
    assert out.logits.shape == (6, 10) and h.grad is not None and torch.isfinite(out.loss)
    if obj.has_commitment:
        assert obj.commitment(h).shape == (6,)


VIT = {"model.name": "vit", "model.width": 16, "model.depth": 3, "model.heads": 2, "model.patch_size": 4,
       "data.limit_train": 128, "data.batch_size": 32, "train.epochs": 2, "train.device": "cpu"}


def test_token_features_cross_ranks_sync_equals_simultaneous(tmp_path):
    ref = load(None, [f"{k}={v}" for k, v in VIT.items()])
    from decoupled.run_job import train
    expected = train(ref, tmp_path / "ref")
    dist = tmp_path / "sync"
    check(torchrun(2, ["--out", str(dist), *sets({**VIT, "train.mode": "sync"})]))
    assert_same_states(tmp_path / "ref", dist, 2, 1)
    assert_same_results(expected, summary(dist))


def test_torchvision_vit_is_drawn_from_the_block_seed():
    """Class token, positions and attention projections follow train.seed (the engine's per-block init)."""
    from decoupled.engine.build import init_module
    built = build_model(choose("model", "torchvision:vit_b_16", blocks=13), (3, 32, 32), 10)
    first = [p.detach().clone() for p in built.blocks[1].parameters()]
    init_module(built.blocks[1], 1)
    assert all(not torch.equal(a, b) for a, b in zip(first, built.blocks[1].parameters()) if a.std() > 0)
    embed = built.blocks[0][0]
    init_module(built.blocks[0], 2)
    a = embed.pos_embedding.detach().clone()
    init_module(built.blocks[0], 2)
    assert torch.equal(a, embed.pos_embedding)
