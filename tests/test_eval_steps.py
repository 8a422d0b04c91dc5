"""Issue 31, item 4: time to target at a resolution under an epoch. train.eval_every_steps evaluates
between an epoch's batches (Note [mid-epoch evaluation]) on train.eval_subset; `decoupled bench
--curve --eval-every-steps N --eval-subset M` sets both on every curve row, whose points then carry
`step`, with the evaluations cut out of train_s, and states M and the standard error sqrt(p(1-p)/M)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from decoupled.bench.curve import epoch_seconds, pipeline_curve, single_process_curve, time_to_target
from decoupled.bench.report import markdown
from decoupled.cli import main
from decoupled.data import Split
from decoupled.engine.evaluate import evaluates_at, mid_epoch_test
from decoupled.job import ConfigError, load

from configs import MLP_EVAL_STEPS
from test_bench_curve import TARGET, TINY, _table
from torchrun_utils import REPO, env, sets, torchrun


def test_evaluation_points_are_every_nth_source_step_but_epoch_ends():
    t = SimpleNamespace(eval_every_steps=3)
    assert [c for c in range(1, 21) if evaluates_at(t, c, 10)] == [3, 6, 9, 12, 15, 18]  # 30 ends an epoch
    assert [c for c in range(1, 13) if evaluates_at(t, c, 4)] == [3, 6, 9]  # 12 is epoch 3's end
    assert not any(evaluates_at(SimpleNamespace(eval_every_steps=0), c, 4) for c in range(1, 13))


def test_the_subset_is_the_first_test_samples_and_no_more_than_there_are():
    test = Split(torch.arange(10.0)[:, None], torch.arange(10))
    assert mid_epoch_test(test, SimpleNamespace(eval_subset=4)).y.tolist() == [0, 1, 2, 3]
    assert mid_epoch_test(test, SimpleNamespace(eval_subset=0)) is test
    with pytest.raises(ConfigError, match=r"train.eval_subset=11 is more than the 10 test samples"):
        mid_epoch_test(test, SimpleNamespace(eval_subset=11))


@pytest.mark.parametrize("sets_,match", [
    (["train.mode=sequential", "train.eval_every_steps=5"], r"train.eval_every_steps=5 .* not 'sequential'"),
    (["train.mode=quicknet", "objective.name=quicknet", "train.eval_every_steps=5"], r"not 'quicknet'"),
    (["train.eval_subset=100"], r"train.eval_subset=100 does nothing here: it applies to train.eval_every_steps"),
    (["train.eval_every_steps=-1"], r"train.eval_every_steps"),
])
def test_bad_settings_are_refused_by_name(sets_, match):
    with pytest.raises(ConfigError, match=match):
        load(None, sets_)


@pytest.mark.parametrize("args,match", [
    (["--eval-every-steps", "5"], "add --curve"),
    (["--curve", "--eval-every-steps", "-1"], "must be >= 0"),
    (["--curve", "--eval-subset", "100"], "add --eval-every-steps"),
])
def test_bench_refuses_bad_options_before_anything_runs(tmp_path, capsys, args, match):
    assert main(["bench", *args, "--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.timeout(240)
def test_the_engine_refuses_it_with_replicated_stage_groups(tmp_path):
    """A group's replicas all-reduce every round: an evaluation inside one would split it. Every rank
    refuses at setup, before any trains, naming the key and the fix."""
    cfg = {**MLP_EVAL_STEPS, "train.mode": "sync", "dist.replicas": [2, 1], "dist.placement": [2, 1]}
    p = torchrun(3, ["--out", str(tmp_path / "run"), *sets(cfg)])
    assert p.returncode != 0
    assert p.stderr.count("config error: train.eval_every_steps=3 with stage groups of several ranks") == 3, \
        p.stderr[-3000:]
    assert "dist.replicas=[]" in p.stderr and "dist.replica_batch='split'" in p.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_split_replicas_evaluate_mid_epoch_as_their_reference(shared_run, shared_reference):
    """Split replicas close a round with every batch (Note [split replicas]): mid-epoch evaluations fall
    between rounds, at the reference's steps with its accuracies (replica 0 and 1 of the sink group each
    score their share of the subset)."""
    cfg = {**MLP_EVAL_STEPS, "dist.replicas": [1, 2], "dist.placement": [2, 1], "dist.replica_batch": "split"}
    ref_dir, _ = shared_reference(cfg)
    run, _ = shared_run(3, {**cfg, "train.mode": "sync"})
    read = lambda d: [m for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                      if m.get("kind") == "step_eval"]
    ref = read(ref_dir)
    sink = [m for m in read(run) if m["rank"] in (1, 2)]
    assert [m["step"] for m in ref] == sorted({m["step"] for m in sink}) == [3, 6, 9, 12, 15, 18]
    for r in ref:  # the sink replicas' shares of the subset, weighted by what each scored
        parts = [m for m in sink if m["step"] == r["step"]]
        assert sum(m["tested"] for m in parts) == r["tested"] == 100
        correct = sum(round(m["test_acc"]["2"] * m["tested"]) for m in parts)
        assert correct == round(r["test_acc"][-1] * r["tested"]), (r, parts)


def _write(d, records):
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_curves_cut_mid_epoch_evaluations_out_of_train_s(tmp_path):
    """Stamps by hand (Note [evaluation windows]), 4 steps an epoch, evaluations after steps 2 and 6:
    each mid-epoch evaluation's window (train_end_s to its time_s) is cut out of every later point."""
    _write(tmp_path, [{"kind": "train_start", "time_s": 1.0},
                      {"kind": "step_eval", "epoch": 0, "step": 2, "train_end_s": 3.0, "time_s": 4.0, "tested": 8,
                       "test_acc": [0.1, 0.4]},
                      {"kind": "step", "epoch": 0, "time_s": 6.0},
                      {"kind": "epoch", "epoch": 0, "time_s": 8.0, "test_acc": [0.2, 0.5]},
                      {"kind": "step_eval", "epoch": 1, "step": 6, "train_end_s": 10.0, "time_s": 11.0, "tested": 8,
                       "test_acc": [0.3, 0.7]},
                      {"kind": "step", "epoch": 1, "time_s": 13.0},
                      {"kind": "epoch", "epoch": 1, "time_s": 14.0, "test_acc": [0.3, 0.8]}])
    curve = single_process_curve(tmp_path, 4)
    assert curve == [{"epoch": 0.5, "step": 2, "train_s": 2.0, "test_acc": 0.4, "tested": 8},
                     {"epoch": 1, "step": 4, "train_s": 4.0, "test_acc": 0.5},  # 5 s less the 1 s evaluation
                     {"epoch": 1.5, "step": 6, "train_s": 6.0, "test_acc": 0.7, "tested": 8},  # 9 s less 1 and 2
                     {"epoch": 2, "step": 8, "train_s": 8.0, "test_acc": 0.8}]  # 12 s less 1, 2 and 1
    assert time_to_target(curve, 0.65) == 6.0  # half an epoch earlier than the epoch points say
    assert epoch_seconds(curve) == 4.0  # from the epoch points alone
    rank = [{"kind": "train_start", "rank": 1, "time_s": 1.0},
            {"kind": "step_eval", "rank": 1, "epoch": 0, "step": 2, "train_end_s": 3.0, "time_s": 4.0, "tested": 8,
             "test_acc": {"1": 0.4}},
            {"kind": "epoch_end", "rank": 1, "epoch": 0, "time_s": 6.0},
            {"kind": "eval", "rank": 1, "epoch": 0, "time_s": 8.0, "tested": 20, "test_acc": {"1": 0.5}}]
    _write(tmp_path, rank)
    assert pipeline_curve(tmp_path, 1, 4) == curve[:2]


def test_bench_md_states_the_subset_and_its_standard_error():
    c = {"epochs": 2, "target_acc": 0.9, "seeds": 1, "rows": ["e2e"], "eval_every_steps": 20, "eval_subset": 400,
         "eval_subset_se": math.sqrt(0.9 * 0.1 / 400), "eval_subset_se_at": 0.9}
    res = {"n_train": 128, "batch_size": 32, "ranks": 2, "repeats": 3, "curve": c, "rows": [],
           "machine": {"torch": "x", "cpu_count": 2, "loadavg_start": [0.0, 0.0, 0.0]}}
    md = markdown(res)
    assert "every 20 source steps" in md and "first 400 test samples" in md and "= 0.0150 at p = 0.9" in md


@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_curve_rows_evaluate_every_n_source_steps(tmp_path):
    """e2e, sync and ddp under --eval-every-steps 3 on 4 batches an epoch: points after source steps 3
    (mid-epoch, on the first 16 test samples), 4 (epoch 1's end, the whole test set), 6 and 8; samples/s
    from the epoch points; bench.json and bench.md state the subset and its standard error."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "decoupled", "bench", "--curve", "--epochs", "2", "--target-acc", str(TARGET),
           "--eval-every-steps", "3", "--eval-subset", "16", "--rows", "e2e,sync,ddp", "--ranks", "2",
           "--out", str(out), "--timeout", "150", *sets(TINY)]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=560)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "bench.json").read_text())
    c = res["curve"]
    assert (c["eval_every_steps"], c["eval_subset"], c["eval_subset_se_at"]) == (3, 16, TARGET)
    assert c["eval_subset_se"] == pytest.approx(math.sqrt(TARGET * (1 - TARGET) / 16))
    for row in res["rows"]:
        assert "error" not in row, row
        curve = row["curve"]
        assert [p["step"] for p in curve] == [3, 4, 6, 8], row["mode"]
        assert [p["epoch"] for p in curve] == [0.75, 1, 1.5, 2]
        assert [p.get("tested") for p in curve] == [16, None, 16, None]
        assert all(0 < a["train_s"] < b["train_s"] for a, b in zip(curve, curve[1:])), curve
        assert row["time_to_target_s"] == time_to_target(curve, TARGET)
        assert row["samples_per_s"] == pytest.approx(128 / epoch_seconds(curve))
    md = (out / "bench.md").read_text()
    assert "every 3 source steps" in md and "first 16 test samples" in md
    assert set(_table(md)) >= {"e2e", "sync", "ddp"}
