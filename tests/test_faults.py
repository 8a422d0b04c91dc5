"""Fail fast, never hang, resume exactly: bad input, diverging blocks, killed and hung ranks,
atomic checkpoints, torchrun restarts, and async runs under random delays (gloo, CPU)."""
from __future__ import annotations

import errno
import json
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from decoupled import checkpoint
from decoupled.job import ConfigError, load
from decoupled.engine.ranks.setup import dry_run, handshake
from decoupled.run_job import train

from configs import MLP_PLAIN
from torchrun_utils import (assert_same_results, assert_same_states, check, kill_tree, overrides, sets, summary,
                            torchrun, torchrun_popen, wait_for, workers)


# ---------------------------------------------------------------------------- bad input, before training

@pytest.mark.parametrize("bad,field", [
    ({"data.name": "mnist", "data.root": "/nonexistent/data"}, "data.root"),
    ({"model.name": "vgg", "model.hierarchy": [1, 1, 1, 1, 1], "model.widths": [150, 150, 150]}, "model.hierarchy"),
], ids=["missing-root", "hierarchy-vs-input"])
def test_bad_input_fails_every_rank_before_training(tmp_path, bad, field):
    p = torchrun(2, ["--out", str(tmp_path / "r"), *sets({**MLP_PLAIN, "train.mode": "sync", **bad})], timeout=120)
    assert p.returncode != 0
    assert field in p.stderr
    assert not list((tmp_path / "r").glob("checkpoints/*.pt")) and not (tmp_path / "r" / "summary.json").exists()


def test_labels_out_of_range_are_rejected(monkeypatch):
    from decoupled import data

    def corrupt(cfg, seed):
        x = torch.zeros(10, 1, 4, 4)
        return x, torch.arange(10) + 5, x, torch.zeros(10, dtype=torch.int64), 10  # labels up to 14

    monkeypatch.setitem(data.LOADERS, "synthetic", corrupt)
    with pytest.raises(ConfigError, match=r"train labels outside \[0, 10\)"):
        data.build_data(load(None, ["data.name=synthetic"]).data, 0)


def test_dry_run_and_handshake_catch_shape_mismatches():
    from decoupled.engine.build import build_stages
    cfg = load(None, ["model.widths=[6,5]"])
    stages = build_stages(cfg, (1, 8, 8), 10, torch.device("cpu"))
    assert dry_run(stages, (1, 8, 8), torch.device("cpu")) == [(1, 8, 8), (6,), (5,)]
    stages[1].out_shape = (7,)  # a builder that lies about its output
    with pytest.raises(ConfigError, match=r"block 1 produces \(5,\) but declares \(7,\)"):
        dry_run(stages, (1, 8, 8), torch.device("cpu"))
    with pytest.raises(ConfigError, match="stage group 0 sends .6,. but group 1 expects .5,."):
        handshake([{"shapes": [(1, 8, 8), (6,)]}, {"shapes": [(5,), (5,)]}], group=1)


# ---------------------------------------------------------------------------- divergence

def test_nan_stops_every_rank_naming_block_and_step(tmp_path):
    p = torchrun(3, ["--out", str(tmp_path / "nan"), *sets({**MLP_PLAIN, "train.mode": "sync", "optim.lr": 1e30})],
                 timeout=120)
    assert p.returncode != 0
    assert "block 0 step" in p.stderr and "not finite" in p.stderr
    # every rank exits non-zero: the diverged one with 1, its peers by their own error or torchrun's SIGTERM
    codes = [line.split(":")[1].split()[0] for line in p.stderr.splitlines() if line.strip().startswith("exitcode")]
    assert len(codes) == 3 and "0" not in codes
    assert not (tmp_path / "nan" / "summary.json").exists()


# ---------------------------------------------------------------------------- dead and hung ranks

def _long_job(tmp_path: Path, timeout_s: float, mode: str = "sync", extra: list[str] = ()) -> tuple:
    out = tmp_path / "long"
    replicas = {"dist.replicas": [2, 1]} if mode.endswith("-replicas") else {}  # rank 1 = block group 0's 2nd replica
    cfg = {**MLP_PLAIN, "train.mode": mode.removesuffix("-replicas"), "train.epochs": 500, "dist.timeout_s": timeout_s,
           "train.eval_every": 0, **replicas}
    agent = torchrun_popen(3, ["--out", str(out), *sets(cfg)], extra=extra)
    wait_for(lambda: len(checkpoint.epochs(out, 2)) > 0 or agent.poll() is not None, 120, "training to start")
    assert agent.poll() is None, agent.communicate()[1][-3000:]
    return agent, workers(agent)


def _dead(p: psutil.Process) -> bool:
    return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async", "sync-replicas"])
def test_killed_rank_ends_the_whole_job(tmp_path, mode):
    """A SIGKILLed rank: each peer fails with an error naming it (docs/fault-tolerance.md), then torchrun
    ends the job non-zero, no orphans. torchrun looks at its workers only every --monitor-interval
    seconds, here longer than dist.timeout_s: the peers must fail by themselves, within dist.timeout_s,
    before torchrun would stop them (with its default 0.1 s it could stop them first, a race)."""
    timeout_s = 5
    agent, procs = _long_job(tmp_path, timeout_s=timeout_s, mode=mode, extra=[f"--monitor-interval={timeout_s + 3}"])
    try:
        assert sorted(procs) == [0, 1, 2]
        t0 = time.monotonic()
        procs[1].send_signal(signal.SIGKILL)
        _, err = agent.communicate(timeout=timeout_s + 40)
        assert agent.returncode != 0
        assert time.monotonic() - t0 < timeout_s + 40
        for p in procs.values():  # no orphans
            assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        named = {r for r in (0, 2) if re.search(rf"rank {r}: .*rank 1 failed or timed out", err)}
        assert named == {0, 2}, err[-4000:]
    finally:
        kill_tree(agent)


@pytest.mark.slow
def test_hung_rank_is_named_by_its_peers_within_the_timeout(tmp_path):
    timeout_s = 5
    agent, procs = _long_job(tmp_path, timeout_s=timeout_s)
    try:
        t0 = time.monotonic()
        procs[1].send_signal(signal.SIGSTOP)  # alive but silent
        wait_for(lambda: _dead(procs[0]) or _dead(procs[2]), timeout_s + 20, "a peer of the hung rank to fail")
        assert time.monotonic() - t0 < timeout_s + 20
        # torchrun now stops the job: SIGTERM, then SIGKILL after a fixed 30 s grace for a worker that
        # is still there, which a stopped one always is (it handles no signal but SIGKILL). The hung
        # rank has been named: end it as that SIGKILL would, without the wait.
        procs[1].send_signal(signal.SIGKILL)
        _, err = agent.communicate(timeout=60)
        assert agent.returncode != 0
        assert "rank 1" in err and ("timed out" in err or "nothing from rank 1" in err)
        for p in procs.values():
            assert _dead(p)
    finally:
        kill_tree(agent)


# ---------------------------------------------------------------------------- checkpoints and restarts

def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "rank0-epoch0.pt"
    checkpoint.save({"v": torch.arange(3)}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        checkpoint.save({"v": torch.arange(5)}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["v"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_checkpoint_into_unwritable_place_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoint"):
        checkpoint.save({}, blocker / "rank0-epoch0.pt")


@pytest.mark.slow
def test_torchrun_restart_resumes_by_itself_bit_for_bit(tmp_path):
    """--max-restarts=1: a rank dies after epoch 1; the restarted job finds its checkpoints and
    ends exactly where an uninterrupted run ends: same accuracies, weights, heads and RNG states."""
    cfg = {**MLP_PLAIN, "train.epochs": 6, "dist.debug_delay_ms": 60.0}  # the delay only slows; numbers are unchanged
    ref_dir = tmp_path / "ref"
    ref = train(load(None, overrides({**cfg, "train.mode": "simultaneous"})), ref_dir)
    out = tmp_path / "restarted"
    agent = torchrun_popen(2, ["--out", str(out), *sets({**cfg, "train.mode": "sync"})], extra=["--max-restarts=1"])
    try:
        wait_for(lambda: 1 in checkpoint.epochs(out, 1) or agent.poll() is not None, 120, "epoch 1 checkpoints")
        procs = workers(agent)
        for p in procs.values():  # freeze the job, then look: it cannot finish between the look and the kill
            p.send_signal(signal.SIGSTOP)
        assert agent.poll() is None and checkpoint.epochs(out, 1)[-1] < 5, "finished before it could be interrupted"
        procs[1].send_signal(signal.SIGKILL)
        procs[0].send_signal(signal.SIGCONT)  # torchrun stops it (SIGTERM) and restarts both
        _, err = agent.communicate(timeout=240)
        assert agent.returncode == 0, err[-4000:]
    finally:
        kill_tree(agent)
    got = summary(out)
    assert_same_results(ref, got)
    assert_same_states(ref_dir, out, 2, 5)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(m["kind"] == "epoch_end" and m["epoch"] == 0 for m in lines)  # the first attempt's lines are kept


# ---------------------------------------------------------------------------- async under random delays

@pytest.mark.parametrize("policy,seed", [("random", 1), ("fifo", 2)])
def test_async_with_random_delays_finishes_within_bounds(tmp_path, policy, seed):
    cfg = {**MLP_PLAIN, "train.mode": "async", "train.seed": seed, "dist.debug_delay_ms": 15.0,
           "replay.capacity": 2, "replay.max_reuse": 2, "replay.policy": policy}
    check(torchrun(3, ["--out", str(tmp_path / "a"), *sets(cfg)], timeout=180))
    s = summary(tmp_path / "a")
    assert [l["epochs"] for l in s["layers"]] == [2, 2, 2]
    for r in s["ranks"][1:]:
        assert r["replay"]["occupancy_max"] <= 2
        assert all(int(k) <= 2 for k in r["replay"]["reuse_at_eviction"])
