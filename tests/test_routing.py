"""Re-batching of routed samples: every sample delivered exactly once per epoch (in order, or
class-balanced like the sequential QuickNet trainer), and routed sync runs equal simultaneous ones."""
import copy

import pytest
import torch

from decoupled.objectives.router import Rebatcher


def test_rebatcher_delivers_every_sample_once_in_order():
    g = torch.Generator().manual_seed(0)
    rb = Rebatcher(batch_size=8)
    sent, got = [], []
    next_id = 0
    for _ in range(20):  # routed sub-batches of random sizes, some empty
        n = int(torch.randint(0, 7, (1,), generator=g))
        ids = torch.arange(next_id, next_id + n)
        next_id += n
        sent.append(ids)
        rb.add(ids.float().unsqueeze(1), ids % 10, ids)
        for x, y, i in rb.full():
            assert len(i) == 8 and torch.equal(x[:, 0].long(), i) and torch.equal(y, i % 10)
            got.append(i)
    tail = list(rb.flush())
    assert all(len(i) <= 8 for _, _, i in tail)
    got += [i for _, _, i in tail]
    assert torch.equal(torch.cat(got), torch.cat(sent))
    assert rb.count == 0 and list(rb.flush()) == []


def rare_class_stream(n: int = 2000, parts: int = 4):
    """Received sub-batches where class 1 is rare (about 10 %); x carries the id, to check rows stay whole."""
    y = (torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.1).long()
    ids = torch.arange(n)
    return [(i.float().unsqueeze(1), y[i], i) for i in ids.chunk(parts)], torch.bincount(y, minlength=2)


def cut(stream, balance: str, counts0, batch_size: int = 50, seed: int = 0, rb: Rebatcher | None = None):
    rb = rb or Rebatcher(batch_size, balance, counts0, seed, index=1)
    out = []
    for x, y, ids in stream:
        rb.add(x, y, ids)
        out += list(rb.full())
    return out + list(rb.flush())


@pytest.mark.parametrize("balance", ["remaining", "equal"])
def test_balanced_rebatching_follows_the_class_weights(balance):
    """Counts0 = the pool's own class sizes, so both rules make the two classes equally likely: a
    batch cut from the pool is about half class 1, where the pool (and FIFO) holds 10 %."""
    (pool,), counts0 = rare_class_stream(parts=1)  # a pool far larger than a batch: little depletion
    x, y, ids = pool
    shares = []
    for seed in range(50):  # the first cut of independent runs: the draw's class mix, not depletion
        rb = Rebatcher(20, balance, counts0, seed, index=1)
        rb.add(x, y, ids)
        shares.append(next(rb.full())[1].double().mean())
    assert y.double().mean() < 0.15 and abs(float(torch.stack(shares).mean()) - 0.5) < 0.06


def test_balanced_rebatching_trains_every_sample_once_deterministically_and_resumes():
    stream, counts0 = rare_class_stream()
    labels = torch.cat([y for _, y, _ in stream])
    got = cut(stream, "remaining", counts0)
    ids = torch.cat([i for _, _, i in got])
    assert sorted(ids.tolist()) == list(range(2000)) and all(len(i) == 50 for _, _, i in got)
    assert all(torch.equal(x[:, 0].long(), i) and torch.equal(y, labels[i]) for x, y, i in got)  # rows whole
    assert not torch.equal(ids, torch.arange(2000))  # balancing reordered the stream
    same = torch.cat([i for _, _, i in cut(stream, "remaining", counts0)])
    other = torch.cat([i for _, _, i in cut(stream, "remaining", counts0, seed=1)])
    assert torch.equal(ids, same) and not torch.equal(ids, other)
    # resume: a checkpointed re-batcher (its pool and cut counter) goes on with the very same batches
    rb = Rebatcher(50, "remaining", counts0, 0, index=1)
    rb.add(*stream[0])
    head = list(rb.full())
    resumed = Rebatcher(50, "remaining", counts0, 0, index=1)
    resumed.load_state_dict(copy.deepcopy(rb.state_dict()))
    tail = cut(stream[1:], "remaining", counts0, rb=resumed)
    assert torch.equal(torch.cat([i for _, _, i in head + tail]), ids)


def test_rebatching_without_balance_is_the_fifo():
    stream, counts0 = rare_class_stream()
    got = cut(stream, "none", counts0)
    assert torch.equal(torch.cat([i for _, _, i in got]), torch.arange(2000))


QUICK = {"objective.name": "quicknet", "train.epochs": 3, "optim.name": "adam", "optim.lr": 0.003,
         "objective.quicknet_threshold": 0.5, "data.limit_train": 400}


def test_routed_samples_reach_the_next_block_exactly_once_per_epoch(tmp_path, monkeypatch):
    from decoupled.job import load
    from decoupled.engine import flow
    from decoupled.run_job import train
    from torchrun_utils import overrides

    seen: list[tuple[int, list[int], list[int]]] = []  # (block, ids in, ids passed on)
    original = flow.step

    def recording(stage, x, y, ids, log):
        outs = list(original(stage, x, y, ids, log))
        seen.append((stage.index, ids.tolist(), [i for _, _, o in outs for i in o.tolist()]))
        yield from outs

    monkeypatch.setattr(flow, "step", recording)
    s = train(load(None, overrides({**QUICK, "train.mode": "simultaneous", "data.limit_train": 0})), tmp_path / "q")
    per_epoch = 1438  # all of the digits training split
    # walk the record epoch by epoch: block 0 sees every sample once per epoch
    inputs = {b: [i for blk, ins, _ in seen if blk == b for i in ins] for b in range(3)}
    passed = {b: [i for blk, _, outs in seen if blk == b for i in outs] for b in range(3)}
    assert len(inputs[0]) == 3 * per_epoch
    for b in (1, 2):  # exactly what the block before passed on, each sample once, nothing else
        assert sorted(inputs[b]) == sorted(passed[b - 1])
        assert len(passed[b - 1]) < len(inputs[b - 1])  # learned samples were removed
    assert [l["train_samples"] for l in s["layers"]] == [len(inputs[b]) for b in range(3)]
    assert all(len(set(ins)) == len(ins) for _, ins, _ in seen)


def test_quicknet_sync_with_routing_equals_simultaneous(tmp_path):
    """Class-balanced re-batching (objective.quicknet_balance's default) included."""
    from decoupled.job import load
    from decoupled.run_job import train
    from torchrun_utils import check, overrides, sets, summary, torchrun

    ref = train(load(None, overrides({**QUICK, "train.mode": "simultaneous"})), tmp_path / "ref")
    check(torchrun(3, ["--out", str(tmp_path / "sync"), *sets({**QUICK, "train.mode": "sync"})]))
    got = summary(tmp_path / "sync")
    key = lambda s: [(l["block"], l["test_acc"], l["train_samples"]) for l in s["layers"]]  # noqa: E731
    assert key(got) == key(ref) and got["ensemble_test_acc"] == ref["ensemble_test_acc"]
    assert ref["layers"][2]["train_samples"] < ref["layers"][0]["train_samples"]  # routing happened
    recv = [r["bytes_recv"] for r in got["ranks"]]
    assert recv[2] < recv[1]  # batches on the wire shrink downstream
    # the early-exit curve, joined from the ranks' exits on rank 0, is the single-process one
    assert got["exit_curve"] == ref["exit_curve"] and got["exit_fallback"] == ref["exit_fallback"]
    assert [l["inference_flops"] for l in got["layers"]] == [l["inference_flops"] for l in ref["layers"]]
    assert (tmp_path / "sync" / "exit_curve.png").is_file()
