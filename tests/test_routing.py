"""Re-batching of routed samples: every sample delivered exactly once per epoch, in order."""
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


QUICK = {"objective.name": "quicknet", "train.epochs": 3, "optim.name": "adam", "optim.lr": 0.003,
         "objective.quicknet_threshold": 0.5, "data.limit_train": 400}


def test_routed_samples_reach_the_next_block_exactly_once_per_epoch(tmp_path, monkeypatch):
    from decoupled.config import load
    from decoupled.engine.stage import Stage
    from decoupled.train import train
    from torchrun_utils import overrides

    seen: list[tuple[int, list[int], list[int]]] = []  # (block, ids in, ids passed on)
    original = Stage._step

    def recording(self, x, y, ids, log):
        outs = list(original(self, x, y, ids, log))
        seen.append((self.index, ids.tolist(), [i for _, _, o in outs for i in o.tolist()]))
        yield from outs

    monkeypatch.setattr(Stage, "_step", recording)
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
    from decoupled.config import load
    from decoupled.train import train
    from torchrun_utils import check, overrides, sets, summary, torchrun

    ref = train(load(None, overrides({**QUICK, "train.mode": "simultaneous"})), tmp_path / "ref")
    check(torchrun(3, ["--out", str(tmp_path / "sync"), *sets({**QUICK, "train.mode": "sync"})]))
    got = summary(tmp_path / "sync")
    key = lambda s: [(l["block"], l["test_acc"], l["train_samples"]) for l in s["layers"]]  # noqa: E731
    assert key(got) == key(ref) and got["ensemble_test_acc"] == ref["ensemble_test_acc"]
    assert ref["layers"][2]["train_samples"] < ref["layers"][0]["train_samples"]  # routing happened
    recv = [r["bytes_recv"] for r in got["ranks"]]
    assert recv[2] < recv[1]  # batches on the wire shrink downstream
