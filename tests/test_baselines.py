"""Issue 13, faithful to the papers and fair to the baselines: the validation hold-out, the plateau
rule on the monitored loss, the e2e baseline's cross-entropy, Ma 2020's activation / schedule /
dropout, the pipelines' split search, and (issue 29) the ddp baseline's loss scaling across ranks."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decoupled.engine.ranks.placement import best_split
from decoupled.job import ConfigError, JobConfig, load
from decoupled.data import build_data, stratified_holdout
from decoupled.trainers.epoch_policy import EarlyStopping
from decoupled.trainers.e2e import e2e_loss
from decoupled.models import build_model
from decoupled.objectives import OBJECTIVES, build_objective
from decoupled.optim import build_optimizer, build_scheduler
from decoupled.run_job import train

from configs import MLP_PLAIN
from torchrun_utils import REPO, env, overrides

SMALL = ["data.limit_train=300", "data.batch_size=32", "model.widths=[16,16]", "train.epochs=2",
         "train.device=cpu", "train.checkpoint=false", "train.log_every=1000"]


# ------------------------------------------------------------------ validation split

def test_val_split_is_stratified_seeded_and_disjoint():
    cfg = load(None, ["data.val_fraction=0.2"])
    full = build_data(JobConfig().data, 0)
    d, again, other = build_data(cfg.data, 0), build_data(cfg.data, 0), build_data(cfg.data, 1)
    assert len(d.train) + len(d.val) == len(full.train) and len(d.test) == len(full.test)
    assert torch.equal(d.val.x, again.val.x) and torch.equal(d.val.y, again.val.y)  # seeded
    tr, va = stratified_holdout(full.train.y, 0.2, 0)
    assert not set(tr.tolist()) & set(va.tolist()) and len(tr) + len(va) == len(full.train)  # disjoint, a partition
    assert not torch.equal(va, stratified_holdout(full.train.y, 0.2, 1)[1])  # another seed, another hold-out
    counts = torch.bincount(full.train.y, minlength=10)
    vcounts = torch.bincount(full.train.y[va], minlength=10)
    assert torch.equal(vcounts, (0.2 * counts.double()).round().long())  # every class, in proportion
    # the same samples as the hold-out ids (normalisation is the training part's)
    assert torch.equal(d.val.y, full.train.y[va]) and torch.equal(d.train.y, full.train.y[tr])
    assert not torch.equal(other.val.y, d.val.y) or not torch.equal(other.val.x, d.val.x)


def test_no_val_split_by_default():
    assert build_data(JobConfig().data, 0).val is None


@pytest.mark.parametrize("mode", ["e2e", "sequential", "simultaneous"])
def test_val_acc_in_summary_and_plateau_runs(tmp_path, monkeypatch, mode):
    """The plateau rule fires: at a learning rate too small to move the validation loss by the rule's
    relative threshold (1e-4), the second epoch is no new minimum, and with plateau_patience=0 each
    block's (e2e: the network's) LR is divided by 10 once, after it."""
    fired = []
    step = torch.optim.lr_scheduler.ReduceLROnPlateau.step

    def spy(self, metrics, *a, **kw):
        before = [g["lr"] for g in self.optimizer.param_groups]
        step(self, metrics, *a, **kw)
        fired.append((id(self), before, [g["lr"] for g in self.optimizer.param_groups]))
    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step", spy)
    s = train(load(None, SMALL + [f"train.mode={mode}", "data.val_fraction=0.1", "train.plateau_factor=0.1",
                                  "train.plateau_patience=0", "optim.lr=1e-7",
                                  "train.probe_epochs=0" if mode == "e2e" else "train.seed=0"]), tmp_path / mode)
    for layer in s["layers"]:
        assert 0.0 <= layer["val_acc"] <= 1.0
    rules = {}
    for rule, before, after in fired:
        rules.setdefault(rule, []).append((before[0], after[0]))
    assert len(rules) == (1 if mode == "e2e" else 2)  # one rule per block (e2e: one for the network)
    for steps in rules.values():  # epoch 1 sets the minimum, epoch 2 is no better: LR / 10 after it
        assert steps == [(pytest.approx(1e-7), pytest.approx(1e-7)), (pytest.approx(1e-7), pytest.approx(1e-8))]
    assert "val_acc" not in train(load(None, SMALL), tmp_path / "plain")["layers"][0]


def test_plateau_refused_across_ranks():
    for mode in ("sync", "async"):
        with pytest.raises(ConfigError, match="plateau_factor.*simultaneous"):
            load(None, [f"train.mode={mode}", "train.plateau_factor=0.1"])
    with pytest.raises(ConfigError, match="patience"):
        load(None, ["train.mode=sequential", "train.patience=3"])
    load(None, ["train.mode=sequential", "train.plateau_factor=0.1"])  # cascade's rule: accepted


# ------------------------------------------------------------------ plateau rule

def test_plateau_rule_on_a_hand_made_loss_sequence():
    """Cascade's rule (lr / 10 on a plateau) with patience 1: a new minimum resets the count; two
    epochs without one divide the LR; early stopping counts the same epochs."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = load(None, ["train.mode=e2e", "train.plateau_factor=0.1", "train.plateau_patience=1",
                      "train.patience=4"]).train
    stop = EarlyStopping(opt, cfg)
    lrs, stops = [], []
    for loss in [1.0, 0.8, 0.8, 0.9, 0.7, 0.7, 0.71, 0.72, 0.73]:
        stops.append(stop.step(loss))
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001])
    assert stops == [False] * 8 + [True]  # 4 epochs after the minimum 0.7


def test_sequential_plateau_watches_the_validation_loss(tmp_path, monkeypatch):
    """With a validation split the rule steps on the head's validation cross-entropy, never on test data."""
    from decoupled.engine import evaluate as ev
    seen = []
    orig = ev.val_losses

    def spy(stages, split, bs, device):
        seen.append(len(split))
        return orig(stages, split, bs, device)
    monkeypatch.setattr(ev, "val_losses", spy)
    train(load(None, SMALL + ["train.mode=sequential", "data.val_fraction=0.1", "train.plateau_factor=0.1"]),
          tmp_path / "seq")
    assert len(seen) == 2 * 2 and set(seen) == {30}  # 10 % of the 300 training samples, every block epoch


# ------------------------------------------------------------------ e2e baseline

@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_e2e_loss_is_cross_entropy_for_every_objective(name):
    cfg = load(None, [f"objective.name={name}"] + (["train.mode=quicknet"] if name == "quicknet" else []))
    obj = build_objective(cfg.objective, (16,), 10)
    torch.manual_seed(0)
    h, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
    res = e2e_loss(obj, h, y, "ce")
    assert torch.allclose(res.loss, F.cross_entropy(obj.head(h), y))
    if name == "predsim":  # the head's prediction branch, not the similarity-matching loss
        assert torch.allclose(res.loss, F.cross_entropy(obj.head.pred(h), y))
        assert not torch.allclose(e2e_loss(obj, h, y, "local").loss, res.loss)


@pytest.mark.parametrize("which", ["ce", "local"])
def test_e2e_of_predsim_trains_on_cross_entropy(tmp_path, which):
    """The logged e2e loss at the first step: cross-entropy of 10 classes (~ln 10) by default; the
    predsim loss (0.01 CE + 0.99 similarity MSE, far smaller) only with train.e2e_loss = "local"."""
    train(load(None, SMALL + ["train.mode=e2e", "objective.name=predsim", "train.probe_epochs=0", "train.log_every=1",
                              f"train.e2e_loss={which}"]), tmp_path / which)
    steps = [json.loads(line) for line in (tmp_path / which / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in steps if m.get("kind") == "step")
    assert (first["loss"] > 1.5) == (which == "ce"), first


def test_activation_checkpointing_equals_plain_e2e(tmp_path):
    """Recomputing activations changes memory, not the numbers (no BatchNorm, no dropout here)."""
    a = train(load(None, SMALL + ["train.mode=e2e", "train.probe_epochs=0"]), tmp_path / "a")
    b = train(load(None, SMALL + ["train.mode=e2e", "train.probe_epochs=0", "train.activation_checkpointing=true"]),
              tmp_path / "b")
    assert [x["test_acc"] for x in a["layers"]] == [x["test_acc"] for x in b["layers"]]


# ------------------------------------------------------------------ Ma 2020 setting

@pytest.mark.parametrize("model", ["mlp", "vgg", "resnet", "simcnn", "allcnn"])
def test_leaky_relu_reaches_the_model(model):
    cfg = load(None, [f"model.name={model}", "model.activation=\"leaky_relu\"",
                      *(["model.width=4"] if model != "mlp" else []),
                      *(["model.hierarchy=[1,1]"] if model in ("vgg", "resnet", "simcnn") else [])])
    built = build_model(cfg.model, (3, 16, 16), 10)
    acts = [m for b in built.blocks for m in b.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert acts and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01 for m in acts)
    x = torch.randn(2, 3, 16, 16)
    built.network.eval()
    h = x
    for b in built.blocks:  # the network computes what the blocks compute
        h = b.eval()(h)
    assert torch.allclose(h, built.network(x))
    assert not any(isinstance(m, nn.ReLU) for m in built.network.modules())


def test_milestones_reach_the_scheduler():
    cfg = load(None, ["optim.schedule=\"milestones\"", "optim.gamma=0.25"]).optim
    p = nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], cfg, 1.0)
    sched = build_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[49] == 1.0 and lrs[50] == 0.25 and lrs[75] == 0.25 ** 2 and lrs[89] == 0.25 ** 3
    assert lrs[94] == pytest.approx(0.25 ** 4) and lrs[99] == pytest.approx(0.25 ** 4)
    with pytest.raises(ConfigError, match="milestones"):
        load(None, ["optim.milestones=[0.5]"])  # acts only with schedule = milestones


def test_resnet_dropout_after_each_residual_block():
    cfg = load(None, ["model.name=resnet", "model.hierarchy=[1,1]", "model.width=4", "model.dropout=0.3"])
    built = build_model(cfg.model, (3, 8, 8), 10)
    assert all(isinstance(o, nn.Dropout) and o.p == 0.3 for o in built.outlets)  # after-loss: outlets
    x = torch.randn(2, 3, 8, 8)
    built.network.eval()
    h = x
    for b in built.blocks:
        b.eval()
        h = b(h)
    assert torch.allclose(h, built.network(x))


@pytest.mark.parametrize("name", ["ma2020_vgg11_cifar10", "ma2020_vgg8b_cifar10", "ma2020_resnet18_cifar10"])
def test_ma2020_configs_use_the_paper_setting(name):
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "launch" / "configs" / f"{name}.toml"
    cfg = load(str(path), ["data.root=."])
    assert cfg.model.activation == "leaky_relu" and cfg.optim.schedule == "milestones"
    assert cfg.optim.gamma == 0.25 and cfg.optim.milestones == [0.5, 0.75, 0.89, 0.94] and cfg.model.dropout > 0


# ------------------------------------------------------------------ split search

def test_best_split_balances_known_costs():
    assert best_split([1, 1, 1, 1], 2) == [2, 2]
    assert best_split([3, 1, 1, 1], 2) == [1, 3]
    assert best_split([1, 2, 3, 4, 5], 3) == [3, 1, 1]  # 6 / 4 / 5
    assert best_split([4, 1, 1, 1, 1, 4], 3) == [1, 4, 1]
    assert best_split([2, 2, 2], 3) == [1, 1, 1] and best_split([7], 1) == [1]
    with pytest.raises(ValueError):
        best_split([1, 2], 3)


# ------------------------------------------------------------------ data-parallel baseline

@pytest.mark.slow
@pytest.mark.timeout(300)  # one in-process e2e run and a 2-rank torchrun job: a minute on the loaded 2-core machine
def test_ddp_on_two_ranks_makes_the_e2e_losses(tmp_path):
    """Note [global batch] (bench/dataparallel.py) across ranks: the ddp worker on 2 ranks, each
    training on its torch.tensor_split part of every global batch, makes the e2e trainer's per-step
    losses in one process (same network, seed, data order). Batch 33 over 300 samples, so the parts are
    uneven (17 / 16, and 2 / 1 for the last batch of 3): each rank's loss is its part's summed
    cross-entropy times 2 / len(batch), and DDP's mean over ranks of loss and gradients is the global
    batch's. Neither BatchNorm (a rank's part has its own batch statistics) nor dropout (both ranks
    draw the same masks for their different samples) is on: with them the runs are different
    training, not the same one summed differently. Only float32 summation order differs (a part's sum
    and the all-reduce against one mean), so the losses agree within rtol 1e-4, atol 1e-5, over all 20
    steps of 2 epochs; they are not bit for bit equal."""
    cfg = {**MLP_PLAIN, "data.batch_size": 33, "model.batchnorm": "off", "train.mode": "e2e",
           "train.device": "cpu", "train.log_every": 1, "train.probe_epochs": 0, "train.checkpoint": False}
    train(load(None, overrides(cfg)), tmp_path / "e2e")
    e2e = [m["loss"] for m in map(json.loads, (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines())
           if m.get("kind") == "step"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "decoupled.bench.dataparallel", str(tmp_path / "e2e" / "config.toml"), str(tmp_path / "ddp.json"),
           "ddp"]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    row = json.loads((tmp_path / "ddp.json").read_text())
    assert row["per_rank_batch"] == [17, 16] and len(row["ranks"]) == 2
    assert len(e2e) == len(row["losses"]) == 2 * 10
    assert row["losses"] == pytest.approx(e2e, rel=1e-4, abs=1e-5)
    assert sum(e2e[10:]) < sum(e2e[:10])  # it trained (epoch 2's losses below epoch 1's): not two flat lines
    assert all(r["comm_s"] > 0 for r in row["ranks"])  # the comm hook timed the all-reduces


def test_baseline_batches_pair_each_batch_with_its_part_one_ahead():
    """bench/worker.streamed: each batch comes with the device copy of what `take` picked of it (a
    rank's part on the host, then uploaded), and the next batch's copy is issued before the current
    batch is handed out (the overlap); gpipe.full drops the partial last batch and counts it."""
    from decoupled.bench.dataparallel import part
    from decoupled.bench.gpipe import full
    from decoupled.bench.worker import streamed
    from decoupled.data import Split, batches
    split = Split(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    taken, seen = [], []

    def take(x, y):
        taken.append(int(y[0]))
        return part(x, 1, 2), None
    dropped = [0]
    for b, (x, none) in streamed(full(batches(split, 4, shuffle=False), 4, dropped), torch.device("cpu"), take):
        seen.append((int(b.y[0]), len(taken)))
        assert none is None and torch.equal(x, b.x[2:])  # rank 1's half of the batch
    assert seen == [(0, 2), (4, 2)]  # the second batch was taken before the first was handed out
    assert dropped == [2]  # the last batch, samples 8 and 9


# ------------------------------------------------------------------ baselines honour every setting or refuse it

# 300 / 32: 9 full batches and one of 12 an epoch (gpipe drops it); 3 epochs of a cosine schedule
HONOURED = {**MLP_PLAIN, "model.batchnorm": "off", "train.epochs": 3, "optim.schedule": "cosine",
            "train.mode": "e2e", "train.device": "cpu", "train.log_every": 1, "train.probe_epochs": 0,
            "train.eval_every": 0, "train.checkpoint": False}


def run_e2e(tmp_path, monkeypatch, cfg: dict, name: str) -> tuple[list[float], list[float]]:
    """The e2e trainer in this process: (the network optimizer's LR at every step, every step's loss)."""
    import decoupled.trainers.e2e as e2e_trainer
    lrs: list[list[float]] = []
    real = e2e_trainer.build_optimizer

    def spied(params, ocfg, lr):
        opt = real(params, ocfg, lr)
        seen: list[float] = []
        lrs.append(seen)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
        return opt
    monkeypatch.setattr(e2e_trainer, "build_optimizer", spied)
    train(load(None, overrides(cfg)), tmp_path / name)
    monkeypatch.undo()
    losses = [m["loss"] for m in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
              if m.get("kind") == "step"]
    return lrs[0], losses  # the first optimizer is the network's (the probes' are built after, unused here)


def run_worker(tmp_path, cfg_path, mode: str, nproc: int = 2, name: str | None = None) -> dict:
    """One baseline worker's torchrun job; its row."""
    from decoupled.bench.strategies import STRATEGIES
    out = tmp_path / f"{name or mode}.json"
    module = "decoupled.bench.dataparallel" if mode in STRATEGIES else "decoupled.bench.gpipe"
    args = [str(cfg_path), str(out)] + ([mode] if mode in STRATEGIES else ["2", mode])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
           *args]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)  # an in-process e2e run and seven 2-rank torchrun jobs: minutes on the loaded 2-core machine
def test_baselines_step_the_schedule_as_e2e_and_record_how_they_trained(tmp_path, monkeypatch):
    """Note [baseline settings] (bench/worker.py). (a) With a cosine schedule over 3 epochs, every
    baseline (ddp, the slow-link rows ddp-bf16, ddp-powersgd and localsgd, fsdp, and on each of its
    ranks gpipe and 1f1b) trains each epoch at the LR the e2e
    trainer's network optimizer steps at in that epoch (its LR read at every optimizer step: stepped
    once per epoch); ddp's losses still equal e2e's (a schedule it ignored would part them from epoch 2).
    (b) Their rows and the e2e row (rows.add_run_fields) record the same global batch, schedule and
    precision, and the same optimizer steps per epoch and first-epoch data order except where a row
    declares the difference: gpipe drops the partial last batch (12 of 300 samples), so it takes 9 steps
    an epoch, not 10, and its order hash is that of the 9 full batches (the same as data.batches draws);
    the slow-link rows take e2e's 10 steps in its order and declare how their updates differ (a
    compressed all-reduce; local steps between averagings)."""
    from decoupled.bench.rows import add_run_fields
    from decoupled.bench.worker import data_order_sha
    e2e_lrs, e2e_losses = run_e2e(tmp_path, monkeypatch, HONOURED, "e2e")
    per_epoch = len(e2e_lrs) // 3
    assert per_epoch == 10 and len(e2e_lrs) == 30
    assert all(len(set(e2e_lrs[e * 10:(e + 1) * 10])) == 1 for e in range(3))  # stepped per epoch, not per step
    epoch_lrs = e2e_lrs[::10]
    assert epoch_lrs == pytest.approx([0.05, 0.05 * 0.75, 0.05 * 0.25])  # cosine to 0 over 3 epochs
    cfg_path = tmp_path / "e2e" / "config.toml"
    e2e = {"mode": "e2e"}
    add_run_fields(e2e, "e2e", cfg_path)
    rows = {m: run_worker(tmp_path, cfg_path, m)
            for m in ("ddp", "ddp-bf16", "ddp-powersgd", "localsgd", "fsdp", "gpipe", "1f1b")}

    for mode, row in rows.items():  # (a)
        assert row["lrs"] == epoch_lrs, mode  # the same floats: the same LambdaLR stepped at the same points
        for r in row["ranks"]:
            assert r["lrs"] == epoch_lrs, (mode, r["rank"])  # the pipelines: every stage's own scheduler
    assert rows["ddp"]["losses"] == pytest.approx(e2e_losses, rel=1e-4, abs=1e-5)

    assert e2e["optimizer_steps_per_epoch"] == 10 and e2e["declared_differences"] == []  # (b)
    assert e2e["data_order_sha"] == data_order_sha(300, 32, 0)
    for mode, row in rows.items():
        for key in ("global_batch", "schedule", "precision"):
            assert row[key] == e2e[key], (mode, key)
        for key in ("optimizer_steps_per_epoch", "data_order_sha"):
            assert row[key] == e2e[key] or row["declared_differences"], (mode, key)
    assert e2e["schedule"]["name"] == "cosine" and e2e["global_batch"] == 32 and e2e["precision"] == "fp32"
    for mode in ("ddp", "fsdp"):
        assert rows[mode]["declared_differences"] == []
    for mode in ("ddp", "fsdp", "ddp-bf16", "ddp-powersgd", "localsgd"):
        assert rows[mode]["optimizer_steps_per_epoch"] == 10 and rows[mode]["data_order_sha"] == e2e["data_order_sha"]
    for mode in ("ddp-bf16", "ddp-powersgd", "localsgd"):
        (declared,) = rows[mode]["declared_differences"]
        assert declared.startswith(f"{mode}: "), declared
    assert "each rank steps its own copy" in rows["localsgd"]["declared_differences"][0]
    for mode in ("gpipe", "1f1b"):
        row = rows[mode]
        assert row["dropped_samples_per_epoch"] == 12 and row["optimizer_steps_per_epoch"] == 9
        assert row["data_order_sha"] == data_order_sha(300, 32, 0, full_only=True) != e2e["data_order_sha"]
        assert len(row["declared_differences"]) == 1 and "partial last batch" in row["declared_differences"][0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_honours_fp16_as_e2e(tmp_path, monkeypatch):
    """train.precision: on one rank the ddp worker under fp16 (autocast around the forward and the loss,
    GradScaler on the step, as the e2e trainer) makes e2e's fp16 losses; they are not its fp32 losses."""
    fp16 = {**HONOURED, "train.epochs": 2, "optim.schedule": "constant", "train.precision": "fp16"}
    _, e2e_losses = run_e2e(tmp_path, monkeypatch, fp16, "e2e")
    _, fp32_losses = run_e2e(tmp_path, monkeypatch, {**fp16, "train.precision": "fp32"}, "fp32")
    row = run_worker(tmp_path, tmp_path / "e2e" / "config.toml", "ddp", nproc=1)
    assert row["precision"] == "fp16" and len(row["losses"]) == len(e2e_losses) == 20
    assert row["losses"] == pytest.approx(e2e_losses, rel=1e-6, abs=1e-7)
    assert row["losses"] != pytest.approx(fp32_losses, rel=1e-6, abs=1e-7)


REFUSED = [("ddp", {"train.patience": 2}, "train.patience=2"),
           ("fsdp", {"train.plateau_factor": 0.5, "optim.schedule": "constant"}, "train.plateau_factor=0.5"),
           ("ddp", {"train.e2e_loss": "local"}, "train.e2e_loss='local'"),
           ("gpipe", {"train.precision": "bf16"}, "train.precision='bf16'"),
           ("1f1b", {"train.precision": "fp16"}, "train.precision='fp16'"),
           # each rank's GradScaler would skip its own steps between averagings (strategies.py)
           ("localsgd", {"train.precision": "fp16"}, "train.precision='fp16': the localsgd baseline")]


@pytest.mark.parametrize("mode,sets,named", REFUSED)
def test_a_refused_setting_stops_the_worker_before_its_process_group(tmp_path, monkeypatch, mode, sets, named):
    """Note [baseline settings]: a setting a baseline does not honour raises a ConfigError naming the
    key and its fix in `main`, right after the config loads: before start() creates the process group,
    so every rank refuses alike and none waits for a peer."""
    from decoupled.bench import dataparallel, gpipe
    from decoupled.job import to_toml
    path = tmp_path / "config.toml"
    path.write_text(to_toml(load(None, overrides({**HONOURED, **sets}))))
    worker = dataparallel if mode in dataparallel.STRATEGIES else gpipe

    def start(cfg):
        raise AssertionError("the process group was started")
    monkeypatch.setattr(worker, "start", start)
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")) as e:
        worker.main(str(path), str(tmp_path / "row.json"), mode) if worker is dataparallel else \
            worker.main(str(path), str(tmp_path / "row.json"), 2, mode)
    assert "set " in str(e.value)  # the fix
    assert not (tmp_path / "row.json").exists()


@pytest.mark.timeout(120)
def test_a_refusing_pipeline_exits_on_every_rank(tmp_path):
    """The same refusal under torchrun: both ranks exit with the named error (none is left waiting for
    the other), and no row is written."""
    from decoupled.job import to_toml
    path = tmp_path / "config.toml"
    path.write_text(to_toml(load(None, overrides({**HONOURED, "train.precision": "bf16"}))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "decoupled.bench.gpipe", str(path), str(tmp_path / "row.json"), "2", "gpipe"]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=100)
    assert p.returncode != 0 and not (tmp_path / "row.json").exists()
    assert (p.stdout + p.stderr).count("ConfigError: train.precision='bf16'") == 2, p.stderr[-3000:]


def test_activation_checkpointing_reaches_the_baselines(monkeypatch):
    """train.activation_checkpointing, honoured as the e2e trainer does (torch.utils.checkpoint per block,
    non-reentrant): the ddp / fsdp network recomputes every block and its gradients are the plain
    network's; the pipelines wrap each of a rank's blocks (gpipe.Checkpointed)."""
    from decoupled.bench import dataparallel, gpipe
    from decoupled.engine.build import build_rank_stages
    cfg = load(None, overrides({**HONOURED, "train.activation_checkpointing": True}))
    data = build_data(cfg.data, 0)
    calls = []
    real = dataparallel.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)
    monkeypatch.setattr(dataparallel, "checkpoint", counting)
    monkeypatch.setattr(gpipe, "checkpoint", counting)
    x, y = data.train.x[:8], data.train.y[:8]
    grads = []
    for on in (False, True):
        net = dataparallel.E2ENet(build_rank_stages(cfg, data.input_shape, data.num_classes, torch.device("cpu")), on)
        F.cross_entropy(net(x), y).backward()
        grads.append([p.grad for p in net.parameters()])
    assert calls == list(net.blocks)  # every block once, and only when on
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    module, plan, _ = gpipe.build_module(cfg, data, 0, 1, torch.device("cpu"))
    assert sum(isinstance(m, gpipe.Checkpointed) for m in module) == len(plan[0]) == 3
    F.cross_entropy(module(x), y).backward()
    assert len(calls) == 6


def test_rows_declare_how_the_decoupled_rows_differ(tmp_path):
    """rows.add_run_fields for the engine's rows: the e2e row's batch, schedule, precision and data order
    (the order data.batches draws: where the engine's sources start), the optimizer steps the engine
    counted (the most any block took), and declared differences: replicas averaging several batches
    per step (alternate; sync-auto's split replicas keep the batch), async's replay buffer, per-block LR
    decay."""
    from decoupled.bench.rows import add_run_fields
    from decoupled.bench.worker import data_order_sha
    from decoupled.job import to_toml
    path = tmp_path / "config.toml"
    path.write_text(to_toml(load(None, overrides({**HONOURED, "train.mode": "sync", "optim.block_lr_decay": 0.5}))))
    steps = lambda *per_rank: [{"optimizer_steps_per_epoch": [s]} for s in per_rank]  # noqa: E731  (pipeline_row's)
    e2e, sync = {}, {"ranks": steps(10.0, 10.0)}
    auto = {"replicas": [2, 1], "ranks": steps(10.0, 10.0, 10.0)}  # split replicas: a step per batch
    async_ = {"ranks": steps(10.0, 12.5)}  # a replaying rank
    for row, mode in ((e2e, "e2e"), (sync, "sync"), (auto, "sync-auto"), (async_, "async")):
        add_run_fields(row, mode, path)
        assert row["data_order_sha"] == data_order_sha(300, 32, 0) and row["global_batch"] == 32
        assert row["schedule"] == e2e["schedule"] and row["precision"] == "fp32"
    assert e2e["optimizer_steps_per_epoch"] == sync["optimizer_steps_per_epoch"] == 10
    assert isinstance(sync["optimizer_steps_per_epoch"], int) and async_["optimizer_steps_per_epoch"] == 12.5
    assert e2e["declared_differences"] == [] and ["block_lr_decay" in d for d in sync["declared_differences"]] == [True]
    # sync-auto's replicas split each batch (dist.replica_batch="split"): DDP's global batch, nothing to declare
    assert auto["optimizer_steps_per_epoch"] == 10 and not any("replicas" in d for d in auto["declared_differences"])
    alternate = {"replicas": [2, 1], "ranks": steps(5.0, 5.0, 10.0)}  # each of group 0's ranks half the batches
    path.write_text(to_toml(load(None, overrides({**HONOURED, "train.mode": "sync", "dist.replicas": [2, 1]}))))
    add_run_fields(alternate, "sync", path)
    assert any(d.startswith("dist.replicas=[2, 1]") for d in alternate["declared_differences"])
    assert any(d.startswith("async: ") for d in async_["declared_differences"])
