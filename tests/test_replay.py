"""The replay buffer alone: bounds, reuse cap, policies, epoch accounting."""
import pytest
import torch

from decoupled.engine.ranks.replay import Entry, ReplayBuffer


def entry(i: int, epoch: int = 0) -> Entry:
    return Entry(torch.full((2, 3), float(i)), torch.zeros(2, dtype=torch.int64), torch.arange(2), epoch, step=i)


@pytest.mark.parametrize("policy", ["fifo", "random", "priority-lifo"])
def test_capacity_and_reuse_cap_hold(policy):
    buf = ReplayBuffer(capacity=3, policy=policy, max_reuse=2, seed=0)
    for i in range(10):
        buf.put(entry(i))
        assert len(buf) <= 3
        if i % 3 == 0:
            buf.pick()
    while buf.pick() is not None:
        pass
    st = buf.stats
    assert st.occupancy_max <= 3 and len(buf) == 0
    assert all(k <= 2 for k in st.reuse_hist)
    assert st.received == 10 and st.evicted == 10
    assert st.dropped == st.reuse_hist.get(0, 0)


def test_fifo_takes_fresh_data_in_order_then_replays():
    buf = ReplayBuffer(capacity=4, policy="fifo", max_reuse=3, seed=0)
    for i in range(3):
        buf.put(entry(i))
    assert [buf.pick().step for _ in range(5)] == [0, 1, 2, 0, 1]


def test_priority_lifo_takes_newest_fresh_first():
    buf = ReplayBuffer(capacity=4, policy="priority-lifo", max_reuse=3, seed=0)
    for i in range(3):
        buf.put(entry(i))
    assert [buf.pick().step for _ in range(4)] == [2, 1, 0, 2]


def test_random_is_seeded():
    def draws(seed):
        buf = ReplayBuffer(capacity=5, policy="random", max_reuse=100, seed=seed)
        for i in range(5):
            buf.put(entry(i))
        return [buf.pick().step for _ in range(20)]
    assert draws(1) == draws(1) and draws(1) != draws(2)


def test_epoch_done_counts_used_or_dropped_batches():
    buf = ReplayBuffer(capacity=2, policy="fifo", max_reuse=5, seed=0)
    buf.put(entry(0, epoch=0))
    buf.put(entry(1, epoch=0))
    assert not buf.epoch_done(0)
    buf.pick()
    buf.put(entry(2, epoch=1))  # evicts entry 0 (used) -> entry 1 still pending
    assert not buf.epoch_done(0)
    buf.put(entry(3, epoch=1))  # evicts entry 1 unused -> dropped, epoch 0 done
    assert buf.epoch_done(0) and buf.stats.dropped == 1 and not buf.epoch_done(1)
    assert buf.latest_step == 3
