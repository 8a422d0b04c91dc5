"""Objectives and heads on every model: one local step per stage, shapes, detachment, sample masks."""
import math

import pytest
import torch

from decoupled.config.applies import rules
from decoupled.job import JobConfig, choose, validate
from decoupled.engine.build import build_stages
from decoupled.objectives import LocalOutput
from decoupled.objectives.predsim import similarity_matrix

INPUT = (1, 8, 8)
CLASSES = 10
N = 6
CPU = torch.device("cpu")

MODELS = {  # tiny, digits-shaped
    "mlp": dict(widths=[16, 12]),
    "vgg": dict(hierarchy=[1, 1, 1], width=4),
    "resnet": dict(hierarchy=[1, 1], width=4),
    "simcnn": dict(hierarchy=[1, 1], width=4),
    "allcnn": dict(width=4, blocks=3),
}
HEADS = [  # (objective, head, k)
    ("khidden", "", 1), ("khidden", "khidden", 2), ("khidden", "khidden", 3),
    ("khidden", "mlpsr", 2), ("khidden", "dense", 1),
    ("cascade", "", 1), ("cascade", "khidden", 2), ("cascade", "mlpsr", 1),
    ("predsim", "", 1), ("predsim", "predsim", 1),  # k does nothing on the predsim head
    ("khidden", "mixedpool", 1), ("quicknet", "", 1),
]


def make_cfg(model="mlp", objective="khidden", head="", k=1, **model_kw) -> JobConfig:
    cfg = JobConfig()
    cfg.model = choose("model", model, **{**MODELS[model], **model_kw})
    cfg.objective = choose("objective", objective, head=head, k=k)
    if rules(cfg)["objective.aux_width"][0](cfg):  # small heads, where the head has a hidden width
        cfg.objective.aux_width = 8
    cfg.train.epochs = 2
    validate(cfg)
    return cfg


def _check_output(res, n):
    assert isinstance(res, LocalOutput)
    assert res.loss.dim() == 0 and math.isfinite(float(res.loss.detach()))
    assert res.logits.shape == (n, CLASSES)
    assert res.pred.shape == (n,) and res.pred.dtype == torch.int64
    assert res.conf.shape == (n,)
    assert bool(((res.conf >= 0) & (res.conf <= 1)).all())
    assert torch.equal(res.pred, res.logits.argmax(-1))


@pytest.mark.parametrize("objective,head,k", HEADS, ids=[f"{o}-{h or 'default'}-k{k}" for o, h, k in HEADS])
@pytest.mark.parametrize("model", list(MODELS))
def test_one_step_every_stage(model, objective, head, k):
    torch.manual_seed(0)
    cfg = make_cfg(model, objective, head, k)
    stages = build_stages(cfg, INPUT, CLASSES, CPU)
    assert [s.index for s in stages] == list(range(len(stages))) and len(stages) >= 2
    h = torch.randn(N, *INPUT)
    y = torch.randint(0, CLASSES, (N,))
    for s in stages:
        before = [p.detach().clone() for p in s.block.parameters()]
        out, res = s.train_step(h, y)
        _check_output(res, N)
        assert not out.requires_grad and out.grad_fn is None  # no gradient crosses stages
        assert tuple(out.shape[1:]) == s.out_shape
        assert torch.isfinite(out).all()
        assert s.stats.steps == 1 and s.stats.samples == N
        # the step changed the block (it trains through its own local loss)
        assert any(not torch.equal(b, p) for b, p in zip(before, s.block.parameters()))
        # eval-mode forward and logits have the same shapes
        assert s.forward(h).shape == out.shape
        assert s.logits(s.forward(h)).shape == (N, CLASSES)
        h = out


@pytest.mark.parametrize("model", ["mlp", "vgg"])
def test_sample_mask(model):
    """A masked loss equals the loss of the kept samples alone; masked samples get no gradient."""
    torch.manual_seed(0)
    cfg = make_cfg(model, "khidden", "", 1)  # k=1: pool + linear, per-sample (no batch statistics)
    stage = build_stages(cfg, INPUT, CLASSES, CPU)[0]
    x = torch.randn(N, *INPUT)
    y = torch.randint(0, CLASSES, (N,))
    with torch.no_grad():
        h = stage.forward(x)
    h.requires_grad_(True)
    mask = torch.tensor([True, False, True, True, False, False])
    obj = stage.objective.train()
    masked = obj(h, y, mask)
    alone = obj(h[mask].detach(), y[mask])
    assert torch.allclose(masked.loss, alone.loss, atol=1e-6)
    _check_output(masked, N)  # predictions still cover every sample
    masked.loss.backward()
    assert torch.count_nonzero(h.grad[~mask]) == 0 and torch.count_nonzero(h.grad[mask]) > 0
    full = obj(h.detach(), y)
    assert torch.allclose(full.loss, obj(h.detach(), y, torch.ones(N, dtype=torch.bool)).loss)
    # train_step counts only the kept samples
    stage.train_step(x, y, mask)
    assert stage.stats.samples == int(mask.sum())


def test_predsim_mask_and_similarity():
    torch.manual_seed(0)
    cfg = make_cfg("mlp", "predsim")
    s = build_stages(cfg, INPUT, CLASSES, CPU)[0]
    x, y = torch.randn(N, *INPUT), torch.randint(0, CLASSES, (N,))
    mask = torch.tensor([True, True, False, True, False, True])
    _, res = s.train_step(x, y, mask)
    _check_output(res, N)
    # the similarity of one-hot labels: 1 within a class, -1/(C-1) across classes
    y = torch.tensor([0, 1, 0, 2])
    sim = similarity_matrix(torch.nn.functional.one_hot(y, 4).float())
    expect = torch.where(y[:, None] == y[None, :], torch.tensor(1.0), torch.tensor(-1 / 3))
    assert torch.allclose(sim, expect, atol=1e-5)
    conv = similarity_matrix(torch.randn(5, 4, 3, 3))
    assert conv.shape == (5, 5) and torch.allclose(conv.diagonal(), torch.ones(5), atol=1e-5)


def test_cascade_epochs():
    cfg = make_cfg("mlp", "cascade", widths=[8, 8, 8, 8])
    cfg.objective.cascade_initial_epochs, cfg.objective.cascade_epoch_increment = 2, 3
    stages = build_stages(cfg, INPUT, CLASSES, CPU)
    assert [s.epochs for s in stages] == [2 + 3 * l for l in range(4)]
    assert [s.objective.epochs_for(cfg.objective, l, cfg.train) for l, s in enumerate(stages)] == [2, 5, 8, 11]
    from decoupled.objectives import OBJECTIVES  # the budget is known without building a head
    assert [OBJECTIVES["cascade"].epochs_for(cfg.objective, l, cfg.train) for l in range(4)] == [2, 5, 8, 11]
    cfg.objective.cascade_epoch_increment = 0
    assert [s.epochs for s in build_stages(cfg, INPUT, CLASSES, CPU)] == [2] * 4
    # other objectives train every block for train.epochs
    for name in ("khidden", "predsim"):
        stages = build_stages(make_cfg("mlp", name, widths=[8, 8, 8]), INPUT, CLASSES, CPU)
        assert [s.epochs for s in stages] == [2, 2, 2]


def test_default_heads():
    from decoupled.heads import DenseHead, KHiddenHead, PredSimHead
    kinds = {"khidden": KHiddenHead, "cascade": DenseHead, "predsim": PredSimHead}
    for name, cls in kinds.items():
        s = build_stages(make_cfg("vgg", name), INPUT, CLASSES, CPU)[0]
        assert isinstance(s.objective.head, cls)


def test_stage_init_is_seeded_per_block():
    """A stage's initial weights depend on (seed, block index) only, not on which stages are built."""
    cfg = make_cfg("mlp", widths=[8, 8, 8])
    all_stages = build_stages(cfg, INPUT, CLASSES, CPU)
    only_last = build_stages(cfg, INPUT, CLASSES, CPU, select=lambda n: [2])
    for a, b in zip(all_stages[2].block.state_dict().values(), only_last[0].block.state_dict().values()):
        assert torch.equal(a, b)
    cfg.train.seed = 1
    other = build_stages(cfg, INPUT, CLASSES, CPU, select=lambda n: [2])
    assert not torch.equal(next(iter(other[0].block.parameters())), next(iter(only_last[0].block.parameters())))


@pytest.mark.parametrize("objective", ["khidden", "cascade", "predsim"])
def test_mask_dtypes_and_empty_mask(objective):
    """A 0/1 float or int mask means the same as the bool mask; a mask that keeps nothing gives a
    finite (zero-gradient) loss instead of NaN, so a train step on it cannot poison the weights."""
    torch.manual_seed(0)
    s = build_stages(make_cfg("mlp", objective), INPUT, CLASSES, CPU)[0]
    with torch.no_grad():
        h = s.forward(torch.randn(N, *INPUT))
    y = torch.randint(0, CLASSES, (N,))
    keep = torch.tensor([True, False, True, True, False, True])
    obj = s.objective.train()
    ref = obj(h, y, keep).loss
    for mask in (keep.float(), keep.long()):
        assert torch.allclose(obj(h, y, mask).loss, ref, atol=1e-6), mask.dtype
    empty = obj(h, y, torch.zeros(N, dtype=torch.bool)).loss
    assert torch.isfinite(empty)
    x = torch.randn(N, *INPUT)
    s.train_step(x, y, torch.zeros(N, dtype=torch.bool))
    assert all(torch.isfinite(p).all() for p in s.parameters())
