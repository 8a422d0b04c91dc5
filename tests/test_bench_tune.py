"""`decoupled bench --tune` (bench/tune.py): the choice on hand-made results, the refusals, every
worker's validation accuracy, and one tiny tuned bench under timeouts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from decoupled.bench.tune import choose, parse_tune, tune_row
from decoupled.cli import main
from decoupled.data import build_data
from decoupled.job import load, to_toml

from test_bench import TINY
from torchrun_utils import REPO, env, overrides, sets


def test_tuner_picks_the_argmax_records_the_grid_and_reuses_finished_candidates(tmp_path):
    tune = parse_tune("optim.lr=0.01,0.1,1", None, None, overrides(TINY))
    assert tune.values == [0.01, 0.1, 1.0] and tune.val_fraction == 0.1  # the default hold-out
    cfg = load(None, [*overrides(TINY), "data.val_fraction=0.1"])
    made = {"0.01": 0.5, "0.1": 0.75, "1": None}  # the last one failed
    calls = []

    def score(cfg_path, d, text):
        calls.append(d.name)
        lr = load(cfg_path).optim.lr
        text = next(t for t in made if float(t) == lr)
        assert load(cfg_path).train.epochs == 1  # the one-epoch budget
        return {"val_acc": made[text]} if made[text] is not None else {"val_acc": None, "error": "boom"}

    rec = tune_row("sync", tune, cfg, tmp_path, score)
    assert rec["chosen"] == 0.1 and rec["chosen_text"] == "0.1" and rec["grid"] == [0.01, 0.1, 1.0]
    assert [c["val_acc"] for c in rec["candidates"]] == [0.5, 0.75, None]
    assert json.loads((tmp_path / "tune" / "sync.json").read_text()) == rec  # written to the output folder
    calls.clear()
    assert tune_row("sync", tune, cfg, tmp_path, score) == rec
    assert calls == ["sync-2"]  # a rerun scores only the candidate that has no accuracy yet
    assert choose([{"value": 1, "val_acc": 0.5}, {"value": 2, "val_acc": 0.5}]) == 1  # a tie: grid order
    assert choose([{"value": 1, "val_acc": None}]) is None


@pytest.mark.parametrize("args,says", [
    (["--tune", "optim.lr"], "expected SECTION.KEY=V1,V2"),
    (["--tune", "optim.lr=0.1,,0.2"], "expected SECTION.KEY=V1,V2"),
    (["--tune", "lr=0.1,0.2"], "expected SECTION.KEY=V1,V2"),  # neither a config key nor a bench flag
    (["--tune", "optim.learning_rate=0.1,0.2"], "optim.learning_rate"),
    (["--tune", "optim.lr=0.1,fast"], "optim.lr=fast"),
    (["--tune", "optim.lr=0.1,0.1"], "listed twice"),
    (["--tune", "train.epochs=1,2"], "sets train.epochs"),
    (["--tune", "optim.lr=0.1", "--val-fraction", "0"], "--val-fraction 0"),
    (["--val-fraction", "0.2"], "--val-fraction applies to --tune"),
    (["--tune", "optim.lr=0.1", "--set", "data.val_fraction=0.2"], "drop --set data.val_fraction"),
], ids=["no-values", "empty-value", "no-section", "unknown-key", "bad-value", "twice", "reserved", "no-holdout",
        "fraction-alone", "fraction-twice"])
def test_bad_tune_is_refused_before_anything_runs(tmp_path, capsys, args, says):
    assert main(["bench", *args, "--out", str(tmp_path / "b")]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.timeout(600)  # four 2-rank torchrun jobs
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "gpipe", "1f1b"])
def test_every_worker_reports_the_validation_accuracy(tmp_path, mode):
    cfg = load(None, [*overrides(TINY), "data.val_fraction=0.25", "train.epochs=1", "train.mode=e2e"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    module = "decoupled.bench.dataparallel" if mode in ("ddp", "fsdp") else "decoupled.bench.gpipe"
    args = [str(path), str(tmp_path / "row.json")] + ([mode] if mode in ("ddp", "fsdp") else ["2", mode])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", module, *args]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    acc = json.loads((tmp_path / "row.json").read_text())["val_acc"]
    held_out = len(build_data(cfg.data, cfg.train.seed).val)  # about 25 % of 128, stratified
    assert 0.0 <= acc <= 1.0 and round(acc * held_out) == pytest.approx(acc * held_out)  # a count over the hold-out


def _tuned_bench(out, rows: str, tune: str) -> dict:
    """`decoupled bench --rows ROWS --tune TUNE` on 2 ranks of the tiny config, its bench.json."""
    cmd = [sys.executable, "-m", "decoupled", "bench", "--rows", rows, "--ranks", "2", "--repeats", "1",
           "--tune", tune, "--val-fraction", "0.25", "--out", str(out), "--timeout", "150", *sets(TINY)]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=550)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())


@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_tuned_bench_runs_each_row_at_its_chosen_value(tmp_path):
    out = tmp_path / "bench"
    res = _tuned_bench(out, "e2e,sync", "optim.lr=0.001,0.05")
    assert res["tune"]["key"] == "optim.lr" and res["tune"]["grid"] == [0.001, 0.05]
    assert res["n_train"] == 128 - 34  # the real runs train on the rest of the tuning hold-out
    for row in res["rows"]:
        t = row["tune"]
        accs = {c["value"]: c["val_acc"] for c in t["candidates"]}
        assert set(accs) == {0.001, 0.05} and t["chosen"] == max(accs, key=accs.get)
        assert load(out / "tune" / f"{row['mode']}-chosen.toml").optim.lr == t["chosen"]  # the real run's config
    assert "optim.lr" in (out / "bench.md").read_text()


@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_bench_flag_is_tuned_on_the_rows_that_read_it(tmp_path):
    """--tune powersgd-rank=1,2 (a bench flag, knobs.py): ddp-powersgd scores both ranks on the hold-out
    and runs at its choice; ddp reads no such flag and runs once, untuned ("-" in bench.md's column)."""
    out = tmp_path / "bench"
    res = _tuned_bench(out, "ddp,ddp-powersgd", "powersgd-rank=1,2")
    assert res["tune"]["key"] == "powersgd-rank" and res["tune"]["grid"] == [1, 2]
    assert res["tune"]["rows"] == ["ddp-powersgd"]
    ddp, powersgd = res["rows"]
    assert "tune" not in ddp and "error" not in ddp and not (out / "tune" / "ddp.json").exists()
    t = powersgd["tune"]
    accs = {c["value"]: c["val_acc"] for c in t["candidates"]}
    assert set(accs) == {1, 2} and t["chosen"] == max(accs, key=accs.get)
    assert powersgd["knobs"]["powersgd_rank"] == t["chosen"]  # the real run's rank
    md = (out / "bench.md").read_text()
    assert "ddp-powersgd at its own powersgd-rank" in md
    cells = {line.split(" | ")[0].lstrip("| ").split()[0]: line.split(" | ")[7] for line in md.splitlines()
             if line.startswith("| ddp")}
    assert cells == {"ddp": "-", "ddp-powersgd": str(t["chosen"])}
