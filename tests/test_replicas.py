"""Stage groups (dist.replicas): a stage held by several ranks that average their gradients every
step. Real torchrun jobs (gloo, CPU, 3 ranks, tiny models, timeouts) against the single-process
reference that accumulates R batches per step."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from decoupled import checkpoint
from decoupled.job import ConfigError, load
from decoupled.engine.ranks.groups import Layout, next_index, share
from decoupled.engine.ranks.placement import BlockCosts, best_layout, best_replicas, layout

from configs import MLP, MLP_PLAIN, VGG_CASCADE
from torchrun_utils import check, copy_run, sets, summary, torchrun

# MLP: 300 samples / 32 = 10 batches an epoch (even rounds); 3 blocks, dropout: per-slot RNG streams
# VGG_CASCADE: conv + BN + dropout, cascade budgets 1, 2, 3: frozen blocks, averaged BN buffers; 200 / 32 = 7
# batches an epoch, so a replica pads the last round of every epoch


def assert_replicas_match_reference(ref_dir, dist_dir, lay: Layout, epoch: int) -> None:
    """Every rank's blocks equal the reference's, weights and buffers bit for bit; each replica's RNG
    stream is the reference's slot of the same index."""
    ref = {s["index"]: s for s in checkpoint.load(checkpoint.path(ref_dir, 0, epoch))["stages"]}
    for rank in range(lay.size):
        replica = lay.replica_of(rank)
        for s in checkpoint.load(checkpoint.path(dist_dir, rank, epoch))["stages"]:
            a = ref[s["index"]]
            for part in ("block", "objective"):
                for k in a[part]:
                    assert torch.equal(a[part][k], s[part][k]), f"rank {rank} block {s['index']} {part}.{k} differs"
            assert torch.equal(a["rng_slots"].get(replica, a["rng"])["cpu"], s["rng"]["cpu"])


@pytest.mark.parametrize("cfg,replicas", [(MLP, [2, 1]), (VGG_CASCADE, [1, 2])], ids=["mlp-source-replicated",
                                                                           "vgg-cascade-sink-replicated"])
def test_sync_with_replicas_equals_the_accumulating_reference(shared_run, shared_reference, cfg, replicas):
    cfg = {**cfg, "dist.replicas": replicas}
    ref_dir, ref = shared_reference(cfg)
    run, _ = shared_run(3, {**cfg, "train.mode": "sync"})
    got = summary(run)
    key = lambda s: [(l["block"], l["test_acc"], l["train_samples"], l["epochs"]) for l in s["layers"]]  # noqa
    assert key(got) == key(ref) and got["ensemble_test_acc"] == ref["ensemble_test_acc"]
    assert got["replicas"] == replicas and got["placement"] == [[0, 1], [2]]
    lay = Layout(got["placement"], replicas)
    assert [r["stage"] for r in got["ranks"]] == [lay.group_of(r) for r in range(3)]
    for g in range(2):  # replicas hold identical parameters at the end
        assert len({got["ranks"][r]["params_sha"] for r in lay.ranks(g)}) == 1
    n = cfg["data.limit_train"]
    for layer in got["layers"]:  # every sample reaches each block once per epoch, across its replicas
        assert layer["epoch_samples"] == [n] * layer["epochs"]
    replicated = [r for r in got["ranks"] if lay.replicas[r["stage"]] > 1]
    assert all(r["allreduce_s"] > 0 for r in replicated)
    last = max(checkpoint.epochs(ref_dir, 0))
    assert_replicas_match_reference(ref_dir, run, lay, last)


# Note [split replicas]: 289 / 32 = 9 batches and one of a single row, so the last batch leaves a replica
# an empty part (it joins its group's all-reduce with n = 0); [2, 1]: the source group splits and the
# sink joins both parts; [1, 2]: the single source rank sends each sink replica its rows
@pytest.mark.parametrize("cfg,replicas", [({**MLP, "data.limit_train": 289}, [2, 1]),
                                          ({**VGG_CASCADE, "data.limit_train": 193}, [1, 2])],
                         ids=["mlp-source-split", "vgg-cascade-sink-split"])
def test_split_replicas_equal_the_splitting_reference(shared_run, shared_reference, cfg, replicas):
    cfg = {**cfg, "dist.replicas": replicas, "dist.replica_batch": "split"}
    ref_dir, ref = shared_reference(cfg)
    run, _ = shared_run(3, {**cfg, "train.mode": "sync"})
    got = summary(run)
    key = lambda s: [(l["block"], l["test_acc"], l["train_samples"], l["epochs"]) for l in s["layers"]]  # noqa
    assert key(got) == key(ref) and got["ensemble_test_acc"] == ref["ensemble_test_acc"]
    lay = Layout(got["placement"], replicas)
    steps = -(-cfg["data.limit_train"] // cfg["data.batch_size"])
    for r in got["ranks"]:  # one optimizer step per batch, as an unreplicated run takes (not one per R)
        g = lay.group_of(r["rank"])
        assert r["optimizer_steps"] == [steps * e for e in ref_epochs(ref, lay.blocks[g])], r
    n = cfg["data.limit_train"]
    for layer in got["layers"]:  # every sample reaches each block once per epoch, across its replicas
        assert layer["epoch_samples"] == [n] * layer["epochs"]
    assert_replicas_match_reference(ref_dir, run, lay, max(checkpoint.epochs(ref_dir, 0)))


def ref_epochs(ref: dict, blocks: list[int]) -> list[int]:
    return [ref["layers"][j]["epochs"] for j in blocks]


def test_split_replicas_train_the_unreplicated_experiment(shared_run, shared_reference):
    """Split replicas step on the whole batch (DDP's batch semantics): without BatchNorm and dropout,
    every block ends where the unreplicated simultaneous run's does, up to float rounding (the sum of
    the parts' row-weighted losses is not the whole batch's mean bit for bit); alternate replicas,
    one step per 2 batches, end elsewhere."""
    cfg = {**MLP_PLAIN, "dist.replicas": [2, 1], "train.mode": "sync"}
    plain_dir, _ = shared_reference(MLP_PLAIN)
    split, _ = shared_run(3, {**cfg, "dist.replica_batch": "split"})
    last = max(checkpoint.epochs(plain_dir, 0))
    want = {s["index"]: s["block"] for s in checkpoint.load(checkpoint.path(plain_dir, 0, last))["stages"]}
    for rank in (0, 2):  # a replica of the split group, and the group after it
        for s in checkpoint.load(checkpoint.path(split, rank, last))["stages"]:
            for k, w in want[s["index"]].items():
                assert torch.allclose(s["block"][k], w, rtol=1e-4, atol=1e-6), (rank, s["index"], k)
    alternate, _ = shared_run(3, cfg)
    s = checkpoint.load(checkpoint.path(alternate, 0, last))["stages"][0]
    assert not all(torch.allclose(s["block"][k], w, rtol=1e-4, atol=1e-6) for k, w in want[0].items())


@pytest.mark.slow
@pytest.mark.timeout(300)  # an in-process e2e run and two 2-rank torchrun jobs
def test_split_replicas_make_the_ddp_rows_losses_on_one_block(tmp_path):
    """On a one-block network the local loss is the end-to-end loss (the block's head is the network's
    output), so split replicas of that block train DDP's experiment: the ddp worker on 2 ranks (each
    its tensor_split part of every global batch, Note [global batch]) and sync with dist.replicas=[2]
    split (each replica its rows, Note [split replicas]) make the same per-step losses. No BatchNorm or
    dropout (per-part statistics and masks would make different training); batch 32 splits 16 / 16 (the
    last batch of 12: 6 / 6), so the global loss is the mean of the two replicas' logged part losses.
    Float32 summation order differs (parts and all-reduce against one mean): rtol 1e-4, atol 1e-5."""
    import json
    import subprocess
    import sys
    from decoupled.run_job import train
    from torchrun_utils import REPO, env, overrides
    cfg = {**MLP_PLAIN, "model.widths": [24], "model.batchnorm": "off", "train.device": "cpu", "train.log_every": 1,
           "train.checkpoint": False}
    train(load(None, overrides({**cfg, "train.mode": "e2e", "train.probe_epochs": 0})), tmp_path / "e2e")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "decoupled.bench.dataparallel", str(tmp_path / "e2e" / "config.toml"), str(tmp_path / "ddp.json"),
           "ddp"]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())["losses"]
    run = tmp_path / "split"
    check(torchrun(2, ["--out", str(run), *sets({**cfg, "train.mode": "sync", "dist.replicas": [2],
                                                      "dist.replica_batch": "split"})]))
    parts: dict = {}
    for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        if m.get("kind") == "step":
            parts.setdefault((m["epoch"], m["step"]), []).append(m["loss"])
    assert all(len(v) == 2 for v in parts.values()) and len(parts) == len(ddp) == 2 * 10
    split = [sum(v) / 2 for _, v in sorted(parts.items())]
    assert split == pytest.approx(ddp, rel=1e-4, abs=1e-5)
    assert sum(split[10:]) < sum(split[:10])  # it trained


def test_split_layouts_are_searched_and_checked():
    c = BlockCosts([1.0, 1.0, 4.0, 1.0], [0.0] * 4, [100.0] * 4, 1e-4, 1e-3)
    d = load(None, ["train.mode=sync", "dist.placement=auto", "dist.replicas=auto", "dist.replica_batch=split"]).dist
    lay = layout(d, 4, 5, c)
    assert all(a == b or 1 in (a, b) for a, b in zip(lay.replicas, lay.replicas[1:])) and lay.size == 5
    # split all-reduces every batch, alternate every R-th: with a costly all-reduce split replicates less
    c_slow = BlockCosts([1.0, 1.0, 4.0, 1.0], [0.0] * 4, [1e6] * 4, 1e-5, 0.0)
    assert dataclasses.replace(c_slow, split=True).group_s([2], 2) > c_slow.group_s([2], 2)
    with pytest.raises(ConfigError, match="groups 0 and 1 hold 2 and 3 replicas"):
        load(None, ["train.mode=sync", "dist.replicas=[2, 3]", "dist.replica_batch=split"])
    with pytest.raises(ConfigError, match="train.mode='async'"):
        load(None, ["train.mode=async", "dist.replicas=[2, 1]", "dist.replica_batch=split"])
    with pytest.raises(ConfigError, match="dist.replica_batch='split' does nothing here"):
        load(None, ["train.mode=sync", "dist.replica_batch=split"])


def test_resume_with_replicas_continues_bit_for_bit(tmp_path, shared_run, shared_reference):
    """The finished 2-epoch sync run with replicas, resumed with train.epochs=3, ends where an
    uninterrupted 3-epoch run ends."""
    cfg = {**MLP, "dist.replicas": [2, 1]}
    ref_dir, ref = shared_reference({**cfg, "train.epochs": 3})
    run = copy_run(shared_run(3, {**cfg, "train.mode": "sync"})[0], tmp_path / "resumed")
    check(torchrun(3, ["--resume", str(run), "--set", "train.epochs=3"]))
    got = summary(run)
    assert [l["test_acc"] for l in got["layers"]] == [l["test_acc"] for l in ref["layers"]]
    assert [l["epochs"] for l in got["layers"]] == [3, 3, 3]
    assert_replicas_match_reference(ref_dir, run, Layout([[0, 1], [2]], [2, 1]), 2)


@pytest.mark.parametrize("replicas", [[1, 2], [2, 1]], ids=["sink-replicated", "source-replicated"])
def test_async_with_replicas_keeps_them_identical(tmp_path, replicas):
    # 280 / 32 = 9 batches an epoch: a replicated source streams by global step, alternating across
    # epoch ends, and the replicas stop (in whatever epoch each has reached) when all made their budget
    cfg = {**MLP, "data.limit_train": 280, "dist.replicas": replicas, "train.mode": "async", "replay.capacity": 2}
    check(torchrun(3, ["--out", str(tmp_path / "async"), *sets(cfg)]))
    got = summary(tmp_path / "async")
    lay = Layout(got["placement"], replicas)
    group = [got["ranks"][r] for r in lay.ranks(replicas.index(2))]
    assert group[0]["params_sha"] == group[1]["params_sha"]
    # replay.budget="steps": each replica makes ceil(9 / 2) steps an epoch, in lockstep
    assert group[0]["optimizer_steps"] == group[1]["optimizer_steps"] == [5 * 2] * len(group[0]["optimizer_steps"])
    assert all(0.0 <= l["test_acc"] <= 1.0 for l in got["layers"])
    # resumed: the replicas continue from one state (each checkpointed when its own buffer was done)
    check(torchrun(3, ["--resume", str(tmp_path / "async"), "--set", "train.epochs=3"]))
    again = summary(tmp_path / "async")
    assert len({again["ranks"][r]["params_sha"] for r in lay.ranks(replicas.index(2))}) == 1


def test_which_replica_takes_what():
    assert [share(b, 2) for b in range(5)] == [0, 1, 0, 1, 0]
    assert [next_index(c, 1, 3) for c in range(6)] == [1, 1, 4, 4, 4, 7]
    lay = Layout([[0], [1, 2], [3]], [2, 1, 1])
    assert lay.ranks(0) == [0, 1] and lay.group_of(2) == 1 and lay.replica_of(1) == 1
    assert lay.upstream(2) == [0, 1] and lay.downstream(0) == [2] and lay.block_replicas() == {0: 2, 1: 1, 2: 1, 3: 1}


def test_auto_layout_replicates_the_dominant_block():
    # block 0 costs 4x the others; an all-reduce of 1 MB costs ~10 ms: two replicas of block 0 and a
    # pipeline of the rest (2.005 s per batch) beat pure data parallelism (2.019) and a pipeline (4)
    costs = BlockCosts([4.0, 1.0, 1.0, 1.0, 1.0], [0.0] * 5, [1e6] * 5, comm_s_per_byte=1e-8)
    assert best_layout(costs, 5, 4) == ([1, 2, 2], [2, 1, 1])
    cfg = load(None, ["train.mode=sync", "dist.placement=auto", "dist.replicas=auto"])
    assert layout(cfg.dist, 5, 4, costs) == Layout([[0], [1, 2], [3, 4]], [2, 1, 1])
    # a fixed split: spare ranks go to the slowest group
    assert best_replicas(costs, [[0], [1, 2, 3, 4]], 4) == [2, 2]
    # a costly all-reduce keeps one rank per group
    slow = BlockCosts([4.0, 1.0, 1.0, 1.0], [0.0] * 4, [1e6] * 4, comm_s_per_byte=1e-5)
    assert best_layout(slow, 4, 4) == ([1, 1, 1, 1], [1, 1, 1, 1])


def test_bench_pipelines_ignore_replicas():
    from decoupled.engine.ranks.placement import placement
    cfg = load(None, ["train.mode=sync", "dist.replicas=[2, 1]"])
    assert placement(cfg, 3, 3) == [[0], [1], [2]]  # one rank per group for gpipe / 1f1b / stage timings


def test_bad_replicas_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="dist.replicas=.2, 2. holds 4 ranks but the world has 3"):
        layout(load(None, ["train.mode=sync", "dist.replicas=[2, 2]"]).dist, 3, 3)
    with pytest.raises(ConfigError, match="routing objective"):
        load(None, ["train.mode=sync", "dist.replicas=[2, 1]", "objective.name=quicknet"])
    with pytest.raises(ConfigError, match="replay.budget='steps'"):
        load(None, ["train.mode=async", "dist.replicas=[2, 1]", "replay.budget=upstream"])
    with pytest.raises(ConfigError, match="one entry per stage group"):
        load(None, ["train.mode=sync", "dist.replicas=[2, 1]", "dist.placement=[1, 1, 1]"])
    with pytest.raises(ConfigError, match="dist.sync_bn=true needs CUDA"):
        from decoupled.engine.ranks.world import resolve_backend
        resolve_backend(load(None, ["train.mode=sync", "dist.replicas=[2, 1]", "dist.sync_bn=true",
                                    "train.device=cpu"]))
    p = torchrun(3, ["--out", str(tmp_path / "bad"), *sets({**MLP, "train.mode": "sync", "dist.replicas": [3, 1]})],
                 timeout=180)
    assert p.returncode != 0 and "dist.replicas=[3, 1] holds 4 ranks but the world has 3" in p.stderr
    assert not (tmp_path / "bad" / "summary.json").exists()
