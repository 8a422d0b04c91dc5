"""Async budgets (replay.budget): "steps" gives every block its full budget of optimizer steps (DGL's
reference), "upstream" lets a slow rank drop what it cannot take; the buffer's policies and its
unlimited reuse as in the reference."""
from __future__ import annotations

import pytest
import torch

from decoupled.bench.runner import read_jsonl
from decoupled.engine.ranks.replay import Entry, ReplayBuffer

from torchrun_utils import check, sets, summary, torchrun


def entry(i: int, epoch: int = 0) -> Entry:
    return Entry(torch.full((2, 3), float(i)), torch.zeros(2, dtype=torch.int64), torch.arange(2), epoch, step=i)


def test_max_reuse_zero_never_evicts_for_reuse():
    buf = ReplayBuffer(capacity=3, policy="fifo", max_reuse=0, seed=0)
    for i in range(3):
        buf.put(entry(i))
    picks = [buf.pick().step for _ in range(30)]
    assert len(buf) == 3 and buf.stats.evicted == 0  # 10 uses each, nothing left
    assert picks[:6] == [0, 1, 2, 0, 1, 2]
    buf.put(entry(3))  # only a newer batch evicts (the oldest), and it was used: not a drop
    assert buf.stats.evicted == 1 and buf.stats.dropped == 0
    assert buf.stats.as_dict()["fresh_draws"] == 3 and buf.stats.as_dict()["replayed_draws"] == 27


def test_priority_lifo_fewest_uses_first_newest_among_ties():
    """The reference's rule (eugenium/DGL cifar_buffer.py): least used first; among those, the newest."""
    buf = ReplayBuffer(capacity=4, policy="priority-lifo", max_reuse=0, seed=0)
    for i in range(2):
        buf.put(entry(i))
    assert [buf.pick().step for _ in range(2)] == [1, 0]  # fresh first, newest first
    buf.put(entry(2))
    assert buf.pick().step == 2  # a fresh arrival beats every replay
    buf.put(entry(3))
    buf.put(entry(4))
    # 4, 3 fresh (newest first); then every entry has been used once: the newest again
    assert [buf.pick().step for _ in range(4)] == [4, 3, 4, 3]


def test_fifo_oldest_least_used_and_random_only_among_usable():
    buf = ReplayBuffer(capacity=3, policy="fifo", max_reuse=2, seed=0)
    for i in range(3):
        buf.put(entry(i))
    assert [buf.pick().step for _ in range(6)] == [0, 1, 2, 0, 1, 2] and len(buf) == 0  # reuse cap: all evicted


# Rank 1 holds 6 of 8 blocks (64 -> 512, then 512 -> 512): a straggler between a fast source and a
# fast sink. 512 / 16 = 32 batches an epoch.
STRAGGLER = {"data.limit_train": 512, "model.widths": [512] * 8, "data.batch_size": 16, "train.epochs": 2,
             "dist.placement": [1, 6, 1], "train.eval_every": 0, "train.checkpoint": False,
             "replay.capacity": 2, "replay.max_reuse": 2}
PER_EPOCH = 512 // 16


@pytest.fixture(scope="module")
def straggler(shared_run):
    """The straggler job once per mode and budget, for both tests below."""
    return {name: summary(shared_run(3, {**STRAGGLER, **extra})[0])
            for name, extra in (("sync", {"train.mode": "sync"}),
                                ("steps", {"train.mode": "async", "replay.budget": "steps"}),
                                ("upstream", {"train.mode": "async", "replay.budget": "upstream"}))}


@pytest.mark.slow
def test_steps_budget_gives_the_slow_rank_the_sync_step_count(straggler):
    """sync: every block 2 x 32 steps. async "steps": the same, rank 0 streaming fresh data through its
    frozen block until rank 1 is done. async "upstream": rank 1 drops what it cannot take and makes
    fewer steps."""
    runs = straggler
    assert runs["sync"]["ranks"][1]["optimizer_steps"] == [2 * PER_EPOCH] * 6
    assert runs["steps"]["ranks"][1]["optimizer_steps"] == [2 * PER_EPOCH] * 6
    assert all(l["epochs"] == 2 for l in runs["steps"]["layers"])
    up = runs["upstream"]["ranks"][1]
    assert up["replay"]["dropped"] > 0 and max(up["optimizer_steps"]) < 2 * PER_EPOCH
    # under "steps" the finished rank 0 kept streaming fresh data: more than its own 2 epochs
    assert runs["steps"]["ranks"][0]["samples_sent"] > 2 * 512
    assert runs["steps"]["ranks"][0]["optimizer_steps"] == [2 * PER_EPOCH]  # but never trained on it
    for name in ("steps", "upstream"):
        for r in runs[name]["ranks"][1:]:
            rep = r["replay"]
            assert rep["fresh_draws"] + rep["replayed_draws"] == rep["draws"]


@pytest.mark.slow
def test_straggler_drops_upstream_and_replays_downstream(straggler):
    """async: the slow rank drops what it cannot take (and reports it), the fast rank after it replays
    batches (reuse counts > 1); sync trains every batch on every rank. How long upstream is blocked in
    each mode is a timing claim: `decoupled bench --guard` measures it, a test on 2 shared cores cannot."""
    runs = straggler
    assert all(r["optimizer_steps"] == [2 * PER_EPOCH] * len(r["blocks"]) for r in runs["sync"]["ranks"])
    assert all(r["samples_trained"] == 2 * 512 * len(r["blocks"]) for r in runs["sync"]["ranks"])
    for name in ("steps", "upstream"):
        ranks = runs[name]["ranks"]
        assert ranks[1]["replay"]["dropped"] > 0
        reuse = {int(k): v for k, v in ranks[2]["replay"]["reuse_at_eviction"].items()}
        assert any(k > 1 for k in reuse), reuse
        assert ranks[2]["replay"]["replayed_draws"] > 0
        for up, down in zip(ranks, ranks[1:]):  # nothing lost on the wire: drops happen in the buffer
            assert down["samples_recv"] == up["samples_sent"] and down["bytes_recv"] == up["bytes_sent"]
        for r in ranks[1:]:  # every batch received was taken fresh, dropped unused, or still buffered at the stop
            rep = r["replay"]
            assert 0 <= rep["received"] - rep["fresh_draws"] - rep["dropped"] <= STRAGGLER["replay.capacity"], rep
            assert r["samples_trained"] == 16 * sum(r["optimizer_steps"]), r


@pytest.mark.slow
def test_steps_budget_with_cascade_budgets_streams_until_every_block_is_done(tmp_path):
    """Cascade budgets 1, 3, 5 epochs under "steps": no hand-off (a block's epochs are its own steps),
    the frozen upstream ranks stream on until the last block has made 5 epochs of steps, then stop."""
    cfg = {"data.limit_train": 256, "model.widths": [32, 32, 32], "data.batch_size": 32, "train.mode": "async",
           "objective.name": "cascade", "objective.cascade_epoch_increment": 2, "replay.budget": "steps",
           "train.checkpoint": False}
    check(torchrun(3, ["--out", str(tmp_path / "sc"), *sets(cfg)], timeout=300))
    s = summary(tmp_path / "sc")
    assert [l["epochs"] for l in s["layers"]] == [1, 3, 5]
    assert [r["optimizer_steps"] for r in s["ranks"]] == [[8], [24], [40]]
    # an evaluation after every epoch of the stream (the bench's curve), and one more when every block is final
    evals = [m["epoch"] for m in read_jsonl(tmp_path / "sc" / "metrics.jsonl") if m.get("kind") == "eval"
             and m["rank"] == 2]
    assert evals[:4] == [0, 1, 2, 3] and len(evals) == 5 and evals[4] >= 4, evals


def test_random_draws_the_least_used_first():
    """Pacing under "random" (note [paced frozen stream]): a batch never trained on is drawn before any
    replay, so the paced stream's next batch is let in as soon as the unused ones are drawn."""
    buf = ReplayBuffer(capacity=4, policy="random", max_reuse=0, seed=3)
    for i in range(3):
        buf.put(entry(i))
    for _ in range(5):
        buf.pick()  # 3 fresh, then replays
    buf.put(entry(3))
    assert buf.unused() == 1 and buf.pick().step == 3  # the fresh one, not a replay
    first = sorted(e.step for e in [buf.pick() for _ in range(4)])
    assert buf.stats.fresh_draws == 4 and len(first) == 4


# Rank 0 holds 5 of 6 blocks, rank 1 one small block: a fast last rank that replays while it waits.
FAST_SINK = {"data.limit_train": 256, "model.widths": [256] * 5 + [16], "data.batch_size": 16, "train.epochs": 2,
             "dist.placement": [5, 1], "train.eval_every": 0, "train.checkpoint": False, "train.mode": "async",
             "replay.capacity": 4, "replay.max_reuse": 4, "replay.policy": "priority-lifo"}


@pytest.mark.slow
def test_fresh_budget_spans_upstream_training(tmp_path):
    """Note [fresh budget]: the last rank's last epoch ends only after upstream's last training batch
    reached it (causal: it needs E x S fresh batches, and upstream's training makes exactly E x S), so
    its training spans upstream's whatever the speeds; its replays did not spend its budget."""
    check(torchrun(2, ["--out", str(tmp_path / "fresh"), *sets({**FAST_SINK, "replay.budget": "fresh"})]))
    ends = [m for m in read_jsonl(tmp_path / "fresh" / "metrics.jsonl") if m.get("kind") == "own_epoch_end"]
    last = {r: max((m for m in ends if m["rank"] == r), key=lambda m: m["epoch"]) for r in (0, 1)}
    assert last[0]["epoch"] == last[1]["epoch"] == 1
    assert last[0]["last_step"] == 2 * 16 - 1  # the source's last training batch
    assert last[1]["last_step"] >= last[0]["last_step"]
    s = summary(tmp_path / "fresh")
    rep = s["ranks"][1]["replay"]
    # every fresh batch trained on, replays on top (a draw after the budget only forwards: no step)
    assert rep["fresh_draws"] >= 2 * 16 and 2 * 16 <= s["ranks"][1]["optimizer_steps"][0] <= rep["draws"]
    assert all(l["epochs"] == 2 for l in s["layers"])


def test_a_stream_past_its_last_epoch_that_brings_nothing_stops_with_the_reason():
    """An unfinished rank under "steps" whose frozen upstream routes every sample away (QuickNet)
    would read marker after marker forever: the first epoch past the last that brings no batch stops it."""
    from types import SimpleNamespace

    from decoupled.engine.ranks.budget import FreshSteps, OwnSteps
    for budget_class in (OwnSteps, FreshSteps):
        b = budget_class(last=1, steps_per_epoch=4, board=None)
        stages = [SimpleNamespace(training=True)]
        b.at_stream_epoch_end(0, 4, stages, rank=2)
        b.at_stream_epoch_end(1, 4, stages, rank=2)  # the last epoch brought nothing: the stream goes on
        b.at_stream_epoch_end(2, 7, stages, rank=2)  # past the last, but batches came: it may yet finish
        with pytest.raises(RuntimeError, match="rank 2: epoch 3 of the stream.*replay.budget='upstream'"):
            b.at_stream_epoch_end(3, 7, stages, rank=2)
        b.at_stream_epoch_end(4, 7, [SimpleNamespace(training=False)], rank=2)  # done: nothing to wait for
