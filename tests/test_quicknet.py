"""QuickNets: the learned-sample conditions, class-balanced draws, the early-exit rule, the two-phase
objective (commitment head outside the block's optimizer, inside the checkpoint), early stopping, and
a tiny end-to-end run with `decoupled eval`."""
import json
import math

import pytest
import torch

from decoupled import cli, exits
from decoupled.job import ConfigError, load
from decoupled.trainers.epoch_policy import EarlyStopping
from decoupled.trainers.quicknet import draw
from decoupled.engine.build import build_stages
from decoupled.objectives import LocalOutput
from decoupled.objectives.quicknet import class_sample_weights, confidence
from decoupled.run_job import train

QN = ["train.mode=quicknet", "objective.name=quicknet"]


def test_confidence_is_normalised_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    d = confidence(logits)
    # p = (1/2, 1/6, 1/6, 1/6): H = ln2/2 + 3 * ln6/6
    h = math.log(2) / 2 + 0.5 * math.log(6)
    assert torch.allclose(d, torch.tensor([0.0, 1.0, 1 - h / math.log(4)]), atol=1e-6)


def test_learned_needs_all_three_conditions():
    cfg = load(None, QN + ["objective.quicknet_threshold=0.8"])
    obj = build_stages(cfg, (1, 8, 8), 10, torch.device("cpu"))[0].objective
    #        conf ok, commit ok, right | low conf | commit <= 0 | wrong | commit exactly 0 | conf == t
    conf = torch.tensor([0.9, 0.7, 0.9, 0.9, 0.9, 0.8])
    commit = torch.tensor([1.0, 1.0, -0.5, 2.0, 0.0, 0.1])
    pred = torch.tensor([3, 3, 3, 4, 3, 3])
    y = torch.full((6,), 3)
    out = LocalOutput(torch.tensor(0.0), torch.zeros(6, 10), pred, conf)
    assert obj.learned(out, commit, y).tolist() == [True, False, False, False, False, True]


def test_class_balanced_weights():
    counts0 = torch.tensor([4, 2, 4])  # |T_0 ∩ c|
    y = torch.tensor([0, 0, 1, 2, 2, 2, 2])  # T_j: half of class 0, half of 1, all of 2
    w = class_sample_weights(y, counts0, "remaining")
    assert torch.allclose(w, torch.tensor([1 / 4, 1 / 4, 1 / 2, 1 / 4, 1 / 4, 1 / 4, 1 / 4], dtype=w.dtype))
    per_class = torch.zeros(3, dtype=w.dtype).index_add_(0, y, w)
    r = torch.tensor([2 / 4, 1 / 2, 4 / 4], dtype=w.dtype)  # the fraction of each class that remains
    assert torch.allclose(per_class / per_class.sum(), r / r.sum())
    eq = class_sample_weights(y, counts0, "equal")
    assert torch.allclose(torch.zeros(3, dtype=w.dtype).index_add_(0, y, eq), torch.ones(3, dtype=w.dtype))
    assert torch.equal(class_sample_weights(y, counts0, "none"), torch.ones(7, dtype=torch.float64))
    # the draws: seeded, so deterministic; |T_j| of them, all from T_j; the class shares follow the weights
    ids = torch.arange(10, 17)
    a, b = draw(ids, w, 0, "block", 0, 0), draw(ids, w, 0, "block", 0, 0)
    assert torch.equal(a, b) and len(a) == 7 and set(a.tolist()) <= set(ids.tolist())
    assert not torch.equal(a, draw(ids, w, 0, "block", 0, 1))  # another epoch, another draw
    many = y[torch.multinomial(w, 60000, replacement=True, generator=torch.Generator().manual_seed(0))]
    share = torch.bincount(many, minlength=3).double() / len(many)
    assert torch.allclose(share, r / r.sum(), atol=0.01)


def test_exit_rule_on_hand_made_logits():
    big, flat = [20.0, 0.0, 0.0], [0.2, 0.0, 0.1]
    # sample 0: exit 0 sure and committed -> exit 0; sample 1: exit 0 sure but not committed, exit 1
    # sure -> exit 1; sample 2: nobody sure, exit 1 the most confident -> fallback; sample 3: only
    # the last exit sure -> exit 2
    logits = torch.tensor([[big, big, flat, flat],  # exit 0
                           [flat, big, [0.0, 3.0, 0.0], flat],  # exit 1
                           [flat, flat, flat, [0.0, 0.0, 20.0]]])  # exit 2
    conf = confidence(logits)
    commit = torch.tensor([[1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    idx, passed = exits.choose_exit(conf, commit, 0.9, "confident")
    assert idx.tolist() == [0, 1, 1, 2] and passed.tolist() == [True, True, False, True]
    idx, passed = exits.choose_exit(conf, commit, 0.9, "last")
    assert idx.tolist() == [0, 1, 2, 2]
    # threshold 0: the first committed exit answers everything
    assert exits.choose_exit(conf, commit, 0.0)[0].tolist() == [0, 1, 0, 0]
    # the curve: the fallback sample pays for the whole network, whichever exit answers
    outs = exits.ExitOutputs(conf, commit, logits.argmax(-1), torch.tensor([0, 0, 1, 2]))
    (row,) = exits.exit_curve(outs, [10.0, 30.0, 60.0], [0.9])
    assert row["accuracy"] == 1.0
    assert row["avg_flops"] == pytest.approx((10 + 30 + 60 + 60) / 4)
    assert row["exit_fraction"] == [0.25, 0.5, 0.25] and row["fallback_fraction"] == 0.25


def test_commitment_head_is_its_own_phase(tmp_path):
    cfg = load(None, QN + ["model.widths=[16, 16]"])
    s = build_stages(cfg, (1, 8, 8), 10, torch.device("cpu"))[0]
    obj = s.objective
    in_opt = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in obj.commit.parameters())  # not stepped with the block
    assert all(id(p) in in_opt for p in obj.head.parameters())
    commit0 = [p.detach().clone() for p in obj.commit.parameters()]
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    h, res = s.train_step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(commit0, obj.commit.parameters()))
    assert torch.allclose(res.conf, confidence(res.logits.detach()))  # QuickNet's confidence
    # the commitment phase moves the commitment head only, never the block or the exit
    head0 = [p.detach().clone() for p in list(s.block.parameters()) + list(obj.head.parameters())]
    opt = torch.optim.Adam(obj.commit.parameters(), lr=0.01)
    loss = obj.commitment_loss(h, res.pred == y)
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(commit0, obj.commit.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(head0, list(s.block.parameters()) + list(obj.head.parameters())))
    # ... and it travels in the checkpoint, with the flag the exit rule reads
    obj.commit_trained.fill_(True)
    sd = s.state_dict()
    assert any(k.startswith("commit.") for k in sd["objective"]) and bool(sd["objective"]["commit_trained"])
    fresh = build_stages(cfg, (1, 8, 8), 10, torch.device("cpu"))[0]
    assert not exits.uses_commitment(fresh)
    fresh.load_state_dict(sd)
    assert exits.uses_commitment(fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.objective.commit.parameters(), obj.commit.parameters()))


def test_mixed_pool_exit_on_conv_blocks():
    cfg = load(None, QN + ["model.name=vgg", "model.hierarchy=[1, 1]", "model.width=4"])
    stages = build_stages(cfg, (3, 32, 32), 10, torch.device("cpu"))
    head = stages[0].objective.head
    assert head.pool.pool and head.linear.in_features == 4 * 4 * 4  # 16x16 maps pooled to 4x4
    h = torch.randn(2, *stages[0].out_shape)
    expect = 0.5 * torch.nn.functional.adaptive_max_pool2d(h, 4) + 0.5 * torch.nn.functional.adaptive_avg_pool2d(h, 4)
    assert torch.allclose(head.pool(h), expect.flatten(1))
    assert stages[0].objective.commitment(h).shape == (2,)


def test_early_stopping_follows_the_appendix():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=0.001)
    cfg = load(None, QN + ["train.patience=3", "train.plateau_factor=0.5", "train.plateau_patience=1"]).train
    stop = EarlyStopping(opt, cfg)
    losses = [1.0, 0.5, 0.6, 0.7, 0.4, 0.45, 0.5, 0.5]
    verdicts = [stop.step(v) for v in losses]
    assert verdicts == [False] * 7 + [True]  # 3 epochs in a row without a new minimum (0.4)
    # torch's ReduceLROnPlateau(patience=1), as the authors used: halved once more than one epoch
    # passed without improvement (after 0.7 and after 0.5), then the count restarts
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001 * 0.5 ** 2)
    never = EarlyStopping(torch.optim.Adam([p], lr=0.001), load(None, QN).train)  # patience 0: never stops
    assert not any(never.step(1.0) for _ in range(10)) and never.plateau is None


@pytest.mark.parametrize("override,field", [
    (["train.mode=quicknet"], "train.mode"),
    (["objective.name=quicknet", "train.mode=sequential"], "train.mode"),
    (QN + ["objective.quicknet_threshold=1.5"], "objective.quicknet_threshold"),
    (QN + ["objective.quicknet_balance=even"], "objective.quicknet_balance"),
    (QN + ["objective.exit_fallback=first"], "objective.exit_fallback"),
    (["train.patience=3"], "train.patience"),  # simultaneous has no early stopping
    (QN + ["train.plateau_factor=2"], "train.plateau_factor"),
    (QN + ["train.plateau_factor=0.5", "optim.schedule=cosine"], "train.plateau_factor"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load(None, override)
    assert field in str(e.value)


TINY = QN + ["data.limit_train=300", "data.batch_size=32", "model.widths=[32, 32, 32]", "train.epochs=4",
             "train.patience=2", "train.plateau_factor=0.5", "optim.name=adam", "optim.lr=0.01",
             "objective.quicknet_threshold=0.6", "train.eval_every=0"]


def test_quicknet_run_and_eval(tmp_path, capsys):
    a = train(load(None, TINY), tmp_path / "a")
    b = train(load(None, TINY + ["train.cache=recompute"]), tmp_path / "b")
    layers = a["layers"]
    assert layers[0]["train_set"] == 300
    for j, layer in enumerate(layers):
        assert layer["train_samples"] == sum(layer["epoch_samples"]) == layer["train_set"] * layer["epochs"]
        assert 1 <= layer["epochs"] <= 4 and sum(layer["train_set_per_class"]) == layer["train_set"]
        assert layer["learned"] <= layer["train_correct"] <= layer["train_set"]
        if j + 1 < len(layers):  # T_{j+1} = T_j - L_j
            assert layers[j + 1]["train_set"] == layer["train_set"] - layer["learned"]
    assert layers[0]["learned"] > 0 and layers[1]["train_set"] < 300
    # cached and recomputed inputs: the same numbers; recomputing costs more training FLOPs
    assert [x["test_acc"] for x in a["layers"]] == [x["test_acc"] for x in b["layers"]]
    assert [x["learned"] for x in a["layers"]] == [x["learned"] for x in b["layers"]]
    assert b["train_flops"] > a["train_flops"] > 0
    # exit curve: threshold 0 = everyone leaves at exit 0; accuracy and cost grow towards the end
    curve = a["exit_curve"]
    assert curve[0]["threshold"] == 0.0 and curve[0]["exit_fraction"][0] == 1.0
    assert curve[0]["avg_flops"] == layers[0]["inference_flops"]
    assert all(r["avg_flops"] <= layers[-1]["inference_flops"] + 1e-6 for r in curve)
    assert all(abs(sum(r["exit_fraction"]) - 1) < 1e-9 for r in curve)
    assert (tmp_path / "a" / "exit_curve.png").stat().st_size > 0
    on_disk = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert on_disk["exit_curve"] == json.loads(json.dumps(curve))
    # decoupled eval: reloads the checkpoint (commitment heads included) and reproduces the curve
    assert cli.main(["eval", "--run", str(tmp_path / "a")]) == 0
    again = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert again["exit_curve"] == on_disk["exit_curve"]
    assert [x["test_acc"] for x in again["layers"]] == [x["test_acc"] for x in layers]
    assert cli.main(["eval", "--run", str(tmp_path / "a"), "--thresholds", "0.5,0.99", "--fallback", "last"]) == 0
    last = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert [r["threshold"] for r in last["exit_curve"]] == [0.5, 0.99] and last["exit_fallback"] == "last"
    assert "exit curve" in capsys.readouterr().out
    assert cli.main(["eval", "--run", str(tmp_path / "nowhere")]) == 2
