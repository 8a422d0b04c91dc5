"""The engine at real scale, on CPU: what breaks in long async runs, on NCCL-shaped transport and with
reduced precision, each defect with a test that failed before the fix (issue: engine at scale)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from decoupled import checkpoint
from decoupled.job import load
from decoupled.data import Split
from decoupled.engine.ranks.feed import AsyncFeed
from decoupled.engine.ranks.replay import Entry, ReplayBuffer
from decoupled.engine.ranks.setup import cascade_handoffs
from decoupled.engine.ranks.sources import DatasetSource
from decoupled.engine.ranks.transport import Kind, Message
from decoupled.run_job import train

from torchrun_utils import (MLP, assert_same_results, assert_same_states, check, copy_run, overrides, sets, summary,
                            torchrun)


def records(run: Path, kind: str) -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m["kind"] == kind]


# ---------------------------------------------------------------------------- async cascade, long runs

def test_async_cascade_tail_outlives_dist_timeout(tmp_path):
    """Rank 0 stops after its 1-epoch budget while rank 2 trains 9 epochs, far longer than
    dist.timeout_s: the end-of-run report must wait for it (it used to time out in the gather)."""
    cfg = {**MLP, "train.mode": "async", "objective.name": "cascade", "objective.cascade_initial_epochs": 1,
           "objective.cascade_epoch_increment": 4, "dist.timeout_s": 3, "dist.debug_delay_ms": 150,
           "train.eval_every": 0, "replay.budget": "upstream"}  # the hand-off: rank 0 stops after epoch 1
    t0 = time.monotonic()
    check(torchrun(3, ["--out", str(tmp_path / "tail"), *sets(cfg)], timeout=300))
    s = summary(tmp_path / "tail")
    assert [l["epochs"] for l in s["layers"]] == [1, 5, 9]
    ends = {r: max(m["time_s"] for m in records(tmp_path / "tail", "epoch_end") if m["rank"] == r) for r in range(3)}
    assert ends[2] - ends[0] > 3, ends  # the tail really outlived the timeout
    assert time.monotonic() - t0 < 300
    assert sorted(p.name for p in (tmp_path / "tail" / "reports").iterdir()) == [f"rank{r}.json" for r in range(3)]


def test_async_cascade_resumes_after_pruned_checkpoints(tmp_path):
    """keep_checkpoints prunes each rank's own series; frozen early ranks stopped epochs ago, so no
    epoch is on every rank. A frozen rank's last checkpoint stands for every later epoch."""
    run = tmp_path / "ac"
    cfg = {**MLP, "train.mode": "async", "objective.name": "cascade", "objective.cascade_epoch_increment": 2,
           "train.keep_checkpoints": 2, "replay.budget": "upstream"}  # epochs follow the stream
    check(torchrun(3, ["--out", str(run), *sets(cfg)]))
    assert [checkpoint.epochs(run, r) for r in range(3)] == [[0, 1], [2, 3], [3, 4]]
    checkpoint.path(run, 2, 4).unlink()  # rank 2 died during its last epoch
    (run / "summary.json").unlink()
    check(torchrun(3, ["--resume", str(run)]))
    s = summary(run)
    assert [l["epochs"] for l in s["layers"]] == [1, 3, 5]
    assert checkpoint.epochs(run, 2)[-1] == 4


def test_cache_auto_with_augmentation_never_freezes_a_view():
    cfg = load(None, ["train.mode=async", "objective.name=cascade", "objective.cascade_epoch_increment=2",
                      "model.name=vgg", "model.hierarchy=[1,1,1]", "data.augment=true", "replay.budget=upstream"])
    assert cfg.train.cache == "auto"
    assert cascade_handoffs(cfg, [[0], [1], [2]], 0, AsyncFeed) == [None, None, None]  # recompute, as sequential does


def test_handoff_feed_carries_on_from_the_cache_after_upstream_stops(tmp_path):
    """The async cascade hand-off as a feed: upstream's messages up to (not including) its STOP, the
    tap's cache of the hand-off epoch filled on the way; then the cache's epochs, ending in one STOP."""
    from decoupled.engine.ranks.sources import HandoffCache, HandoffFeed
    from decoupled.engine.run import Run
    from decoupled.metrics import Recorder
    cfg = load(None, ["data.batch_size=4", "train.eval_every=0", "train.quiet=true"])
    run = Run(cfg, None, [], torch.device("cpu"), tmp_path, Recorder(None))
    cache = HandoffCache(run, 0, "memory", n_train=6, n_test=3, num_classes=2, in_shape=(5,))
    y = torch.zeros(6, dtype=torch.int64)
    upstream = [Message(Kind.TRAIN, 0, 0, torch.ones(6, 5), y, torch.arange(6)), Message(Kind.END_EPOCH, 0),
                Message(Kind.EVAL, 0, 0, torch.ones(3, 5), y[:3], torch.arange(3), torch.zeros(3, 2)),
                Message(Kind.END_EVAL, 0), Message(Kind.STOP, 0)]

    class Upstream(list):  # the upstream feed, with the tap the receiver thread would call
        buffer, idle_s = None, 0.0

        def __iter__(self):
            for m in list.__iter__(self):
                if m.kind in (Kind.TRAIN, Kind.EVAL):
                    cache.offer(m)
                yield m

    got = [(m.kind, m.epoch) for m in HandoffFeed(Upstream(upstream), cache, last=2)]
    assert got[:4] == [(m.kind, m.epoch) for m in upstream[:4]]  # upstream's, without its STOP
    rest = got[4:]
    assert [e for k, e in rest if k == Kind.END_EPOCH] == [1, 2]  # the cache serves epochs 1..last
    assert sum(k == Kind.TRAIN for k, _ in rest) == 2 * 2 and rest[-1] == (Kind.STOP, 2)
    assert [k for k, _ in got].count(Kind.STOP) == 1


# ---------------------------------------------------------------------------- receiver and buffer

class FakeLink:
    """Delivers `messages` then blocks; counts what the receiver thread has read."""

    def __init__(self, messages):
        self.messages, self.read = list(messages), 0
        self.samples = self.bytes = self.train_samples = 0  # the counters Pipeline.rank_metrics reads
        self.peer, self.device = 0, torch.device("cpu")

    def recv(self):
        if self.read < len(self.messages):
            self.read += 1
            return self.messages[self.read - 1]
        threading.Event().wait()


def test_control_queue_is_bounded_under_a_slow_rank():
    """Evaluation messages carry activations: a rank that is slow to handle them must make its
    receiver (and so upstream) wait once it holds replay.eval_buffer_mb of them, not hold the whole
    test set."""
    x = torch.zeros(4, 8)
    evals = [Message(Kind.EVAL, 0, i, x, torch.zeros(4, dtype=torch.int64), torch.arange(4)) for i in range(20)]
    two = 2 * (4 * 8 * 4 + 2 * 4 * 8)  # two messages' bytes: activations, labels, ids
    cfg = load(None, ["train.mode=async", f"replay.eval_buffer_mb={two / 2**20}"])
    rx = AsyncFeed([FakeLink(evals)], 1, cfg.dist, cfg.replay, cfg.train.seed)
    rx.start()
    wait_until(lambda: len(rx.control) == 2)
    time.sleep(0.3)  # the training thread handles nothing meanwhile: the receiver must stay blocked
    assert len(rx.control) == 2 and rx.links[0].read <= 3
    handled = [rx.next_control() for _ in range(2)]
    wait_until(lambda: len(rx.control) == 2)
    time.sleep(0.3)
    assert [m.step for m in handled] == [0, 1] and len(rx.control) == 2 and rx.links[0].read <= 5


def test_a_frozen_stream_is_paced_by_the_ranks_draws():
    """Note [paced frozen stream]: batches through blocks that have made their budget are held back
    while the buffer has two never trained on; each draw lets one more in. Unfrozen batches are not
    paced (a slow rank must never hold up a training upstream)."""
    x = torch.zeros(4, 8)
    batch = lambda i, frozen: Message(Kind.TRAIN, 0, i, x, torch.zeros(4, dtype=torch.int64),  # noqa: E731
                                      torch.arange(4), frozen=frozen)
    cfg = load(None, ["train.mode=async", "replay.capacity=8", "replay.max_reuse=0"])
    rx = AsyncFeed([FakeLink([batch(i, True) for i in range(10)])], 1, cfg.dist, cfg.replay, cfg.train.seed)
    rx.start()
    wait_until(lambda: len(rx.buffer) == 2)
    time.sleep(0.3)  # nothing drawn meanwhile: the thread must stay held
    assert len(rx.buffer) == 2 and rx.links[0].read <= 3
    assert rx.buffer.pick() is not None
    rx.picked()
    wait_until(lambda: len(rx.buffer) == 3)
    assert rx.buffer.unused() == 2
    free = AsyncFeed([FakeLink([batch(i, False) for i in range(6)])], 1, cfg.dist, cfg.replay, cfg.train.seed)
    free.start()
    wait_until(lambda: len(free.buffer) == 6)  # a training upstream's batches all go in


def wait_until(predicate, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_staleness_counts_source_steps_across_epochs(tmp_path):
    """Messages carry the global source step (epoch * steps + batch), so staleness does not reset
    at an epoch boundary (it used to be a per-epoch index)."""
    cfg = load(None, ["data.batch_size=4", "train.eval_every=0"])
    from decoupled.engine.run import Run
    from decoupled.metrics import Recorder
    run = Run(cfg, None, [], torch.device("cpu"), None, Recorder(None))
    split = Split(torch.zeros(10, 2), torch.zeros(10, dtype=torch.int64))
    steps = [m.step for m in DatasetSource(run, split, split, 0, 1) if m.kind == Kind.TRAIN]
    assert steps == [0, 1, 2, 3, 4, 5]  # 3 batches per epoch, 2 epochs
    buf = ReplayBuffer(capacity=8, policy="fifo", max_reuse=1, seed=0)
    for s in steps:
        buf.put(Entry(torch.zeros(1), torch.zeros(1), torch.zeros(1), s // 3, s))
    assert buf.pick().step == 0 and buf.stats.staleness_max == 5


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # an epoch with no step, on purpose
def test_epoch_end_logs_replay_stats_even_with_an_empty_buffer(tmp_path):
    """Root cause of the bench's KeyError('replay') race: an empty ReplayBuffer is falsy (__len__),
    and `if self.buffer` dropped the stats from epoch ends at which the buffer happened to be empty."""
    from decoupled.engine.ranks.budget import UpstreamEpochs
    from decoupled.engine.ranks.pipeline import Pipeline
    from decoupled.engine.run import Run
    from decoupled.metrics import Recorder
    from decoupled.engine.build import build_stages
    cfg = load(None, ["train.mode=async", "replay.budget=upstream", "train.eval_every=0", "train.checkpoint=false",
                      "train.quiet=true", "model.widths=[6]"])
    stages = build_stages(cfg, (1, 8, 8), 10, torch.device("cpu"))
    run = Run(cfg, None, stages, torch.device("cpu"), None, Recorder(tmp_path / "metrics.jsonl"))
    feed = AsyncFeed([FakeLink([])], 1, cfg.dist, cfg.replay, cfg.train.seed, source_steps=3)  # not started
    rank = Pipeline(run, feed, UpstreamEpochs(0), 1, recv=feed.links, send=[], batch_index=lambda step: step)
    assert rank.buffer is not None and len(rank.buffer) == 0 and not rank.buffer
    rank.end_epoch(0)
    run.recorder.close()
    (end,) = records(tmp_path, "epoch_end")
    assert end["replay"] == rank.buffer.stats.as_dict() and end["replay"]["occupancy_max"] == 0


# ---------------------------------------------------------------------------- checkpoints

def test_truncated_newest_checkpoint_falls_back(tmp_path, capsys):
    cfg = {**MLP, "train.epochs": 3}
    ref = train(load(None, overrides(cfg)), tmp_path / "ref")
    run = tmp_path / "run"
    train(load(None, overrides({**cfg, "train.epochs": 2})), run)
    newest = checkpoint.path(run, 0, 1)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # damaged copy
    got = train(load(None, overrides(cfg)), run, resume=True)
    assert str(newest) in capsys.readouterr().err
    assert [l["epochs"] for l in got["layers"]] == [3, 3, 3]
    # resumed after epoch 0 and re-ran epochs 1 and 2: the same as never interrupted
    assert [l["test_acc"] for l in got["layers"]] == [l["test_acc"] for l in ref["layers"]]


def test_truncated_checkpoint_on_one_rank_falls_back_on_every_rank(tmp_path, shared_run, shared_reference):
    """Rank 1's newest checkpoint is damaged: every rank resumes from the epoch before (rank 0's newest
    is fine), and the run ends where an uninterrupted one ends."""
    run = copy_run(shared_run(2, {**MLP, "train.mode": "sync"})[0], tmp_path / "run")
    bad = checkpoint.path(run, 1, 1)
    bad.write_bytes(b"PK\x03\x04 truncated")
    p = check(torchrun(2, ["--resume", str(run), "--set", "train.epochs=3"]))
    assert str(bad) in p.stderr
    ref_dir, ref = shared_reference({**MLP, "train.epochs": 3})
    assert [l["epochs"] for l in summary(run)["layers"]] == [3, 3, 3]
    assert_same_results(ref, summary(run))
    assert_same_states(ref_dir, run, 2, 2)


# ---------------------------------------------------------------------------- precision and the wire

@pytest.mark.parametrize("objective,precision,wire", [
    ("khidden", "fp32", "bfloat16"), ("predsim", "bf16", "bfloat16"), ("cascade", "fp16", "float16"),
    ("quicknet", "bf16", "float16")])
def test_sync_equals_simultaneous_for_precision_and_wire(shared_run, shared_reference, objective, precision, wire):
    """Every block's weights and buffers, its head, and its RNG state equal the reference's, bit for bit
    (and every block is there: the ranks hold exactly the reference's blocks)."""
    cfg = {**MLP, "objective.name": objective, "train.precision": precision, "dist.wire_dtype": wire}
    ref_dir, ref = shared_reference(cfg)
    run, _ = shared_run(2, {**cfg, "train.mode": "sync"})
    assert_same_results(ref, summary(run))
    assert_same_states(ref_dir, run, 2, 1)


def test_wire_dtype_halves_the_bytes(shared_run):
    got = {wire: summary(shared_run(2, {**MLP, "train.mode": "sync",
                                        "dist.wire_dtype": wire})[0])["ranks"][0]["bytes_sent"]
           for wire in ("float32", "bfloat16")}
    # activations are half the bytes; headers (labels, ids) are not: well under 0.75x in total
    assert got["bfloat16"] < 0.75 * got["float32"], got
