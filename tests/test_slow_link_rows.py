"""Issue 30 item 2, the rows people use on slow links (bench/strategies.py): ddp-bf16, ddp-powersgd and
localsgd, built from torch's own comm hooks, optimizer and averager. Their bench flags and refusals,
--tune over a bench flag, the Row registry keeping the old rows' commands, PowerSGD on gloo with
several buckets (Note [PowerSGD on gloo]), and each row run by `decoupled bench` on 2 ranks with its
throughput, accuracy, all-reduce bytes (counted by hand) and memory."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from decoupled.bench.knobs import Knobs
from decoupled.bench.rows import DEFAULT_ROWS, REGISTRY, ROWS, row_command
from decoupled.bench.strategies import in_order
from decoupled.bench.tune import parse_tune, tune_row
from decoupled.cli import main
from decoupled.data import build_data
from decoupled.engine.build import build_rank_stages
from decoupled.job import load, to_toml

from configs import MLP_PLAIN
from torchrun_utils import REPO, env, overrides, sets

SLOW_LINK = ("ddp-bf16", "ddp-powersgd", "localsgd")


@pytest.mark.parametrize("args,says", [
    (["--rows", "ddp-powersgd", "--powersgd-rank", "0"], "--powersgd-rank 0: must be >= 1"),
    (["--rows", "ddp-powersgd", "--powersgd-rank", "two"], "--powersgd-rank 'two': expected an integer"),
    (["--rows", "ddp-powersgd", "--powersgd-start", "1"], "--powersgd-start 1: must be >= 2"),
    (["--rows", "ddp", "--bucket-mb", "0"], "--bucket-mb 0: must be > 0"),
    (["--rows", "localsgd", "--localsgd-period", "0"], "--localsgd-period 0: must be >= 1"),
    (["--rows", "localsgd", "--localsgd-warmup", "-1"], "--localsgd-warmup -1: must be >= 0"),
    (["--rows", "ddp,sync", "--powersgd-rank", "8"], "--powersgd-rank does nothing here: it applies to ddp-powersgd"),
    (["--rows", "e2e", "--bucket-mb", "1"], "--bucket-mb does nothing here"),
    (["--rows", "ddp", "--tune", "localsgd-period=4,16"], "--localsgd-period does nothing here"),
    (["--rows", "ddp-powersgd", "--tune", "powersgd-rank=1,x"], "--powersgd-rank 'x'"),
    (["--rows", "ddp-powersgd", "--tune", "powersgd-rank=1,2", "--powersgd-rank", "8"], "sweeps --powersgd-rank"),
    (["--tune", "powersgd_ranks=1,2"], "or a bench flag's name"),
    (["--sweep", "depth", "--bucket-mb", "1"], "applies to the row bench"),
], ids=["rank-0", "rank-text", "start-1", "bucket-0", "period-0", "warmup-neg", "unread", "unread-bucket",
        "tune-unread", "tune-bad-value", "tune-and-flag", "tune-unknown", "sweep"])
def test_bad_bench_flags_are_refused_naming_the_flag_before_anything_runs(tmp_path, capsys, args, says):
    assert main(["bench", *args, "--out", str(tmp_path / "b")]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_the_registry_keeps_every_row_and_its_command():
    """The Row registry (rows.py) replaced four name tuples: the rows, their order and default, and every
    old row's process are as before; the new rows are workers that --curve evaluates, left out of the
    default, and hand their worker only the flags their strategy reads."""
    assert ROWS == ("e2e", "e2e-Kthreads", "e2e-checkpoint", "sequential", "sync", "sync-auto", "sync-int8", "async",
                    "ddp", "ddp-bf16", "ddp-powersgd", "localsgd", "fsdp", "gpipe", "1f1b")
    assert DEFAULT_ROWS == ("e2e", "e2e-Kthreads", "e2e-checkpoint", "sequential", "sync", "sync-auto", "async",
                            "ddp", "fsdp", "gpipe", "1f1b")
    c, d = Path("c.toml"), Path("d")
    train = ["decoupled", "train", "--config", "c.toml", "--out", "d"]
    e2e = ["--set", "train.mode=e2e", "--set", "train.probe_epochs=0"]

    def job(*args, **kw):  # (python -m arguments, ranks: 0 = one process, threads)
        j = row_command(*args, **kw)
        return j.module_args, j.nproc, j.threads

    assert job("e2e", c, d, 2, 0) == (train + e2e, 0, 1)
    assert job("e2e-Kthreads", c, d, 3, 0) == (train + e2e, 0, 3)
    checkpointed = ["--set", "train.activation_checkpointing=true"]
    assert job("e2e-checkpoint", c, d, 2, 0) == (train + e2e + checkpointed, 0, 1)
    assert job("sequential", c, d, 2, 0) == (train + ["--set", "train.mode=sequential"], 0, 1)
    cmd, nproc, threads = job("sync-auto", c, d, 2, 0)
    assert (nproc, threads) == (2, 1) and cmd[-8:] == ["--set", "train.mode=sync", "--set", 'dist.placement="auto"',
                                                       "--set", 'dist.replicas="auto"', "--set",
                                                       'dist.replica_batch="split"']
    assert job("async", c, d, 2, 0)[0][-4:] == ["--set", "train.mode=async", "--set", 'replay.budget="fresh"']
    assert job("ddp", c, d, 2, 0)[0][-4:] == ["decoupled.bench.dataparallel", "c.toml", "d/ddp.json", "ddp"]
    assert job("gpipe", c, d, 2, 4, [1, 1])[0][-6:] == ["decoupled.bench.gpipe", "c.toml", "d/gpipe.json",
                                                        "4", "gpipe", "1,1"]
    knobs = Knobs(bucket_mb=0.5, powersgd_rank=2, localsgd_period=8)
    assert job("ddp", c, d, 2, 0, knobs=knobs)[0][-2:] == ["--bucket-mb", "0.5"]
    assert job("ddp-powersgd", c, d, 2, 0, knobs=knobs)[0][-7:] == [
        "ddp-powersgd", "--bucket-mb", "0.5", "--powersgd-rank", "2", "--powersgd-start", "2"]
    assert job("localsgd", c, d, 2, 0, knobs=knobs)[0][-6:] == [
        "--bucket-mb", "0.5", "--localsgd-period", "8", "--localsgd-warmup", "0"]
    assert job("ddp-bf16", c, d, 2, 0)[0][-1] == "ddp-bf16"  # torch's default buckets: no flag
    for name in SLOW_LINK:
        assert REGISTRY[name].worker and REGISTRY[name].curve and not REGISTRY[name].default
        assert "bucket_mb" in REGISTRY[name].knobs


def test_tune_over_a_bench_flag_hands_each_candidate_its_value(tmp_path):
    """--tune FLAG=V1,V2: a bench flag by its name (knobs.py) tunes only the rows that read it; every
    candidate trains the bench's config (one epoch) with the flag at its value, the other flags as
    given, which are part of the setup a rerun must match."""
    cfg_sets = ["data.limit_train=100", "train.device=cpu"]
    tune = parse_tune("powersgd-rank=1,2", None, None, cfg_sets)
    assert (tune.key, tune.knob, tune.values, tune.overrides("2")) == ("powersgd-rank", "powersgd_rank", [1, 2], [])
    assert tune.applies(REGISTRY["ddp-powersgd"].knobs) and not tune.applies(REGISTRY["ddp"].knobs)
    assert not tune.applies(REGISTRY["sync"].knobs)
    assert parse_tune("optim.lr=0.1,0.2", None, None, cfg_sets).applies(())  # a config key: every row
    cfg = load(None, [*cfg_sets, "data.val_fraction=0.1"])
    given = Knobs(bucket_mb=1.0)
    seen = []

    def score(cfg_path, d, text):
        assert load(cfg_path).train.epochs == 1 and load(cfg_path).optim.lr == cfg.optim.lr
        seen.append(tune.knobs(given, text))
        return {"val_acc": {"1": 0.7, "2": 0.6}[text]}
    read = {k: getattr(given, k) for k in REGISTRY["ddp-powersgd"].knobs}
    rec = tune_row("ddp-powersgd", tune, cfg, tmp_path, score, read)
    assert rec["chosen"] == 1 and rec["chosen_text"] == "1" and rec["setup"]["knobs"] == read
    assert seen == [Knobs(bucket_mb=1.0, powersgd_rank=1), Knobs(bucket_mb=1.0, powersgd_rank=2)]
    seen.clear()
    assert tune_row("ddp-powersgd", tune, cfg, tmp_path, score, read) == rec and seen == []  # reused
    tune_row("ddp-powersgd", tune, cfg, tmp_path, score, {**read, "bucket_mb": 2.0})
    assert len(seen) == 2  # another bucket size: another setup, scored again


def test_in_order_starts_a_buckets_hook_once_the_previous_bucket_is_done():
    """Note [PowerSGD on gloo]: the wrapper waits for the previous bucket's future before it calls the
    hook for the next, so every rank issues a step's collectives in bucket order. The first future is
    completed by another thread a moment later, as gloo's worker completes an all-reduce."""
    futures, seen = [], []

    def hook(state, bucket):
        seen.append([f.done() for f in futures])
        fut = torch.futures.Future()
        futures.append(fut)
        return fut
    run = in_order(hook)
    first = run(None, 0)
    threading.Thread(target=lambda: (time.sleep(0.2), first.set_result(torch.zeros(1)))).start()
    second = run(None, 1)  # waits for the first
    second.set_result(torch.zeros(1))
    run(None, 2)
    assert seen == [[], [True], [True, True]]


def _digits_row_cfg(tmp_path, cfg: dict) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(to_toml(load(None, overrides({**cfg, "train.mode": "e2e", "train.device": "cpu"}))))
    return path


def _worker(tmp_path, cfg_path: Path, row: str, *flags: str, name: str | None = None) -> dict:
    out = tmp_path / f"{name or row}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "decoupled.bench.dataparallel", str(cfg_path), str(out), row, *flags]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)  # two 2-rank torchrun jobs
def test_powersgd_on_gloo_with_several_buckets(tmp_path):
    """Note [PowerSGD on gloo]: torch's powerSGD_hook with more than one bucket aborted on gloo (one tag,
    tensors of different sizes) where one bucket ran. With DDP's default buckets an MLP of 64 -> 512 -> 512
    (1.2 MB of gradients) makes two (a first of 1 MiB), and --bucket-mb 0.001 one bucket per parameter;
    both train every step to finite losses, compressing from step 2 on."""
    path = _digits_row_cfg(tmp_path, {**MLP_PLAIN, "model.widths": [512, 512], "train.epochs": 1})
    grads = 4 * sum(p.numel() for p in _network_params(path))
    assert grads > 2 ** 20  # more than DDP's first bucket
    for name, flags in (("default", ()), ("small", ("--bucket-mb", "0.001"))):
        row = _worker(tmp_path, path, "ddp-powersgd", *flags, name=name)
        assert len(row["losses"]) == 10 and all(math.isfinite(x) for x in row["losses"]), name
        for r in row["ranks"]:  # the error feedback holds a gradient's size, P and Q a little more
            assert r["exact_mem"]["comm_state_bytes"] > grads, (name, r["exact_mem"])


def _network_params(cfg_path: Path) -> list[torch.nn.Parameter]:
    """The e2e network's parameters, as the data-parallel worker builds it."""
    cfg = load(cfg_path, ["train.mode=e2e"])
    data = build_data(cfg.data, cfg.train.seed)
    stages = build_rank_stages(cfg, data.input_shape, data.num_classes, torch.device("cpu"))
    return [p for s in stages for p in s.block.parameters()] + list(stages[-1].objective.head.parameters())


@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.timeout(900)  # the stages worker and four 2-rank torchrun jobs under --curve
def test_every_slow_link_row_runs_under_bench_and_reports(tmp_path):
    """`decoupled bench --curve` with ddp and the three slow-link rows on 2 ranks (digits MLP, 300
    samples, batch 32: 10 steps an epoch, 2 epochs, the second timed): each reports samples/s, its
    accuracy, its all-reduce bytes and its exact memory, and bench.md says how each trains. Bytes by
    hand, per rank per timed epoch over the 300 samples: ddp all-reduces every gradient (G bytes) every
    step; ddp-bf16 half of that; localsgd (warm-up 0, period 4) only its averagings, of a flat float32
    copy of the parameters (G bytes too) at steps 12 and 16; ddp-powersgd less than ddp."""
    out = tmp_path / "bench"
    cfg = {**MLP_PLAIN, "train.device": "cpu"}
    cmd = [sys.executable, "-m", "decoupled", "bench", "--curve", "--epochs", "2", "--rows",
           "ddp,ddp-bf16,ddp-powersgd,localsgd", "--ranks", "2", "--localsgd-period", "4", "--powersgd-rank", "2",
           "--out", str(out), "--timeout", "240", *sets(cfg)]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=850)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "bench.json").read_text())
    rows = {r["mode"]: r for r in res["rows"]}
    assert list(rows) == ["ddp", "ddp-bf16", "ddp-powersgd", "localsgd"] and res["n_train"] == 300
    G = 4 * sum(p.numel() for p in _network_params(out / "config.toml"))
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["samples_per_s"] > 0 and 0.0 <= row["final_acc"] <= 1.0 and len(row["curve"]) == 2, name
        assert len(row["ranks"]) == 2 and row["per_rank_batch"] == [16, 16]
        for r in row["ranks"]:
            assert r["exact_train_mem_bytes"] > 0 and r["exact_mem"]["params_bytes"] == G and r["comm_s"] >= 0
    assert rows["ddp"]["comm_bytes_per_sample"] == 2 * G * 10 / 300
    assert rows["ddp-bf16"]["comm_bytes_per_sample"] == 2 * (G // 2) * 10 / 300
    assert rows["localsgd"]["comm_bytes_per_sample"] == 2 * 2 * G / 300
    assert 0 < rows["ddp-powersgd"]["comm_bytes_per_sample"] < rows["ddp"]["comm_bytes_per_sample"]
    assert all(r["exact_mem"]["comm_state_bytes"] > G for r in rows["ddp-powersgd"]["ranks"])  # error + P + Q
    assert all(r["exact_mem"]["allreduce_bytes"] == G for r in rows["localsgd"]["ranks"])  # the averager's copy
    assert rows["ddp-powersgd"]["knobs"] == {"bucket_mb": None, "powersgd_rank": 2, "powersgd_start": 2}
    assert rows["localsgd"]["knobs"] == {"bucket_mb": None, "localsgd_period": 4, "localsgd_warmup": 0}
    assert rows["ddp"]["declared_differences"] == []
    for name in SLOW_LINK:
        (declared,) = rows[name]["declared_differences"]
        assert declared.startswith(f"{name}: ")
    md = (out / "bench.md").read_text()
    assert "| localsgd (each rank steps on its 1/2 of a batch, averaged every 4 steps) |" in md
    assert "| ddp-powersgd (rank 2 from step 2) |" in md and "all-reduce B/sample" in md
