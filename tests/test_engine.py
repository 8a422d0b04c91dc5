"""The decoupled engine on real torchrun jobs (gloo, CPU, 2-3 ranks, tiny models, timeouts)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from decoupled import checkpoint
from decoupled.job import ConfigError, load
from decoupled.run_job import train

from configs import MLP, MLP_EVAL_STEPS, VGG_CASCADE
from torchrun_utils import (REPO, assert_same_results, assert_same_states, check, copy_run, env, free_port, overrides,
                            sets, summary, torchrun)


@pytest.mark.parametrize("cfg,world", [(MLP, 2), (VGG_CASCADE, 3), (MLP_EVAL_STEPS, 3)],
                         ids=["mlp-2ranks-grouped", "vgg-cascade-3ranks", "mlp-eval-every-steps-3ranks"])
def test_sync_equals_simultaneous_bit_for_bit(shared_run, shared_reference, cfg, world):
    ref_dir, ref = shared_reference(cfg)
    run, _ = shared_run(world, {**cfg, "train.mode": "sync"})
    got = summary(run)
    assert got["world_size"] == world and len(got["ranks"]) == world
    assert_same_results(ref, got)
    last = max(checkpoint.epochs(ref_dir, 0))
    assert_same_states(ref_dir, run, world, last)
    if world == 2:  # 3 blocks on 2 ranks: contiguous, earlier rank takes the extra block
        assert got["placement"] == [[0, 1], [2]]


def test_sync_scores_the_validation_split_as_simultaneous(shared_run, shared_reference):
    """data.val_fraction: every rank scores its heads on the held-out split after training (Kind.VAL),
    the very floats the single-process trainer reports, and training is untouched by it."""
    cfg = {**MLP, "data.val_fraction": 0.2}
    _, ref = shared_reference(cfg)
    run, _ = shared_run(2, {**cfg, "train.mode": "sync"})
    got = summary(run)
    assert_same_results(ref, got)
    assert [layer["val_acc"] for layer in got["layers"]] == [layer["val_acc"] for layer in ref["layers"]]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    from decoupled.data import build_data
    held_out = len(build_data(load(None, overrides(cfg)).data, 0).val)  # about 20 % of 300, stratified
    assert sum(r["tested"] for r in records if r.get("kind") == "val" and r["rank"] == 1) == held_out


def test_sync_evaluates_mid_epoch_as_simultaneous_does(shared_run, shared_reference):
    """train.eval_every_steps (Note [mid-epoch evaluation]): the sink scores the test subset after the
    same source steps as the reference, with the same accuracies (the same weights then), and the
    epochs' own evaluations stay on the whole test set."""
    ref_dir, _ = shared_reference(MLP_EVAL_STEPS)
    run, _ = shared_run(3, {**MLP_EVAL_STEPS, "train.mode": "sync"})
    read = lambda d, kind: [m for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                            if m.get("kind") == kind]
    ref, got = read(ref_dir, "step_eval"), [m for m in read(run, "step_eval") if m["rank"] == 2]
    assert [m["step"] for m in ref] == [m["step"] for m in got] == [3, 6, 9, 12, 15, 18]
    assert [m["test_acc"][-1] for m in ref] == [m["test_acc"]["2"] for m in got]
    assert {m["tested"] for m in ref + got} == {100}
    assert [m["tested"] for m in read(run, "eval") if m["rank"] == 2] == [_test_size(MLP)] * 2


def _test_size(cfg: dict) -> int:
    from decoupled.data import build_data
    c = load(None, overrides(cfg))
    return len(build_data(c.data, c.train.seed).test)


def test_sync_in_one_process_equals_simultaneous(tmp_path, shared_reference):
    _, ref = shared_reference(MLP)
    got = train(load(None, overrides({**MLP, "train.mode": "sync"})), tmp_path / "sync1")
    assert_same_results(ref, got)


def test_async_completes_within_buffer_bounds(tmp_path):
    cfg = {**MLP, "train.mode": "async", "replay.capacity": 2, "replay.max_reuse": 3,
           "replay.policy": "priority-lifo"}
    check(torchrun(3, ["--out", str(tmp_path / "async"), *sets(cfg)]))
    s = summary(tmp_path / "async")
    assert [l["block"] for l in s["layers"]] == [0, 1, 2]
    assert all(0.0 <= l["test_acc"] <= 1.0 and l["epochs"] == 2 for l in s["layers"])
    for r in s["ranks"][1:]:  # ranks with an upstream have a buffer
        rep = r["replay"]
        assert rep["occupancy_max"] <= 2
        assert all(int(k) <= 3 for k in rep["reuse_at_eviction"])
        # every batch received was drawn fresh, dropped unused, or still in the buffer when the rank
        # stopped (how many of each is up to the scheduler; that they add up is not)
        assert rep["received"] > 0 and 0 <= rep["received"] - rep["fresh_draws"] - rep["dropped"] <= 2, rep
        assert rep["draws"] == rep["fresh_draws"] + rep["replayed_draws"]
        assert r["bytes_recv"] > 0
    assert s["ranks"][0]["bytes_sent"] > 0 and "replay" not in s["ranks"][0]


def test_resume_extends_a_sync_run_bit_for_bit(tmp_path, shared_run, shared_reference):
    """A finished 2-epoch sync run, resumed with train.epochs=3, ends where an uninterrupted 3-epoch
    run ends: same accuracies, same weights, heads and RNG states."""
    ref_dir, ref = shared_reference({**MLP, "train.epochs": 3})
    run = copy_run(shared_run(2, {**MLP, "train.mode": "sync"})[0], tmp_path / "resumed")
    assert summary(run)["layers"][0]["epochs"] == 2
    check(torchrun(2, ["--resume", str(run), "--set", "train.epochs=3"]))
    assert_same_results(ref, summary(run))
    assert_same_states(ref_dir, run, 2, 2)


@pytest.mark.parametrize("extra", [{}, {"dist.replicas": [2]}], ids=["pipeline", "one-group-two-replicas"])
def test_two_torchrun_agents_multi_node(tmp_path, shared_reference, extra):
    """--nnodes=2 through the c10d rendezvous on loopback: two agents, one rank each; either a
    pipeline across the nodes, or one stage group whose two replicas all-reduce across them."""
    _, ref = shared_reference({**MLP, **extra})
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=mn-{port}",
               "-m", "decoupled", "train", "--out", str(tmp_path / "mn"), *sets({**MLP, **extra, "train.mode": "sync"})]
        procs.append(subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    got = summary(tmp_path / "mn")
    assert got["world_size"] == 2
    assert_same_results(ref, got)


def test_world_larger_than_blocks_fails_before_training(tmp_path):
    p = torchrun(3, ["--out", str(tmp_path / "big"), *sets({"model.widths": [8, 8], "train.mode": "sync"})],
                 timeout=180)
    assert p.returncode != 0
    assert "world size 3 > 2 blocks" in p.stderr
    assert not (tmp_path / "big" / "summary.json").exists()
    assert not list((tmp_path / "big").glob("checkpoints/*.pt"))


def test_placement_and_backend_choice(monkeypatch):
    from decoupled.engine.ranks import placement as setup, world as distributed
    cfg = load(None, ["train.mode=sync"])
    assert setup.placement(cfg, 5, 2) == [[0, 1, 2], [3, 4]]
    cfg.dist.placement = [1, 4]
    assert setup.placement(cfg, 5, 2) == [[0], [1, 2, 3, 4]]
    cfg.dist.placement = [2, 2]
    with pytest.raises(ConfigError, match="dist.placement"):
        setup.placement(cfg, 5, 2)
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    assert distributed.resolve_backend(load(None, ["train.mode=sync"]))[0] == expected
    # auto picks NCCL on cuda:LOCAL_RANK wherever CUDA is present
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.resolve_backend(load(None, ["train.mode=sync"])) == ("nccl", torch.device("cuda", 1))
    assert distributed.resolve_backend(load(None, ["train.mode=sync", "dist.backend=gloo",
                                                   "train.device=cpu"]))[0] == "gloo"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 1, reason="needs a GPU")
def test_nccl_sync_equals_simultaneous_on_gpu(tmp_path, shared_reference):
    cfg = {**MLP, "train.device": "cuda"}
    _, ref = shared_reference(cfg)
    n = min(2, torch.cuda.device_count())
    check(torchrun(n, ["--out", str(tmp_path / "nccl"), *sets({**cfg, "train.mode": "sync"})]))
    got = summary(tmp_path / "nccl")
    assert got["backend"] == "nccl"
    # same device kind, same kernels: accuracies agree (bitwise equality is only promised on CPU)
    for a, b in zip(ref["layers"], got["layers"]):
        assert abs(a["test_acc"] - b["test_acc"]) < 0.05


def test_cascade_handoff_plan():
    from decoupled.engine.ranks.feed import AsyncFeed, SyncFeed
    from decoupled.engine.ranks.setup import cascade_handoffs
    cfg = load(None, ["train.mode=async", "objective.name=cascade", "objective.cascade_initial_epochs=1",
                      "objective.cascade_epoch_increment=2"])  # budgets 1, 3, 5
    assert cascade_handoffs(cfg, [[0], [1], [2]], 0, AsyncFeed) == [None, None, None]  # "steps": upstream streams on
    cfg.replay.budget = "upstream"
    assert cascade_handoffs(cfg, [[0], [1], [2]], 0, AsyncFeed) == [None, 1, 3]
    assert cascade_handoffs(cfg, [[0, 1], [2]], 0, AsyncFeed) == [None, 3]
    assert cascade_handoffs(cfg, [[0], [1], [2]], 4, AsyncFeed) == [None, None, None]  # resumed late: nothing left
    # sync recomputes: it must equal the single-process trainer bit for bit
    assert cascade_handoffs(cfg, [[0], [1], [2]], 0, SyncFeed) == [None, None, None]


def test_async_cascade_serves_cached_pseudo_inputs(tmp_path):
    """Layer l trains 1 + 2l epochs; once upstream is frozen a rank caches its outputs and the
    upstream ranks stop."""
    cfg = {**MLP, "train.mode": "async", "objective.name": "cascade", "objective.cascade_epoch_increment": 2,
           "train.cache": "disk", "replay.budget": "upstream"}  # epochs follow the stream (the hand-off plan)
    check(torchrun(3, ["--out", str(tmp_path / "ac"), *sets(cfg)]))
    s = summary(tmp_path / "ac")
    assert [l["epochs"] for l in s["layers"]] == [1, 3, 5]
    lines = [json.loads(x) for x in (tmp_path / "ac" / "metrics.jsonl").read_text().splitlines()]
    caches = sorted((m["rank"], m["epoch"], m["train"]) for m in lines if m["kind"] == "cache")
    assert caches == [(1, 1, 300), (2, 3, 300)]
    assert (tmp_path / "ac" / "cache" / "rank2-train.npy").exists()
    last_epoch = {r: max(m["epoch"] for m in lines if m["kind"] == "epoch_end" and m["rank"] == r) for r in range(3)}
    assert last_epoch == {0: 1, 1: 3, 2: 4}  # upstream ranks stop after the epoch downstream cached


def test_auto_placement_balances_measured_blocks(tmp_path):
    """dist.placement="auto": every block's training step is timed at start-up, the split whose slowest
    rank is fastest is chosen and printed, and summary.json carries the predictions."""
    from decoupled.engine.ranks.placement import best_split
    assert best_split([1, 1, 1, 1], 2) == [2, 2] and best_split([4, 1, 1, 1, 1], 2) == [1, 4]
    assert best_split([1, 1, 3], 2, mem=[1, 1, 5], cap=6) == [2, 1]
    with pytest.raises(ConfigError, match="max_stage_mem_mb"):
        best_split([1, 1, 1], 2, mem=[4, 4, 4], cap=6)  # a pair would need 8
    # blocks 1 and 2 (1024 -> 1024) each cost several times block 0 (64 -> 1024) and block 3 (1024 -> 8):
    # [[0, 1], [2, 3]] is the one split near the best; every other has a rank with both heavy blocks, about
    # twice as slow, so the choice does not hang on timing noise (a measured 5 % must not flip it)
    cfg = {"model.widths": [1024, 1024, 1024, 8], "data.limit_train": 256, "train.epochs": 1, "train.mode": "sync",
           "dist.placement": "auto", "train.checkpoint": False}
    p = check(torchrun(2, ["--out", str(tmp_path / "auto"), *sets(cfg)]))
    s = summary(tmp_path / "auto")
    assert "dist.placement=auto" in p.stdout and len(s["predicted_stage_s"]) == 2
    assert s["placement"] == [[0, 1], [2, 3]], s["predicted_stage_s"]
    assert sum(len(g) for g in s["placement"]) == 4
