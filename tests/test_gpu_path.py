"""What the CPU can show of the CUDA/NCCL path (issue 21): the receiver thread's device, the hand-off
tap's hand-over, the NCCL environment defaults, the device ordinal, and a replica sending before its
round's all-reduce. The device layer's torch.cuda is a recorder (tests/fake_cuda.py); tests/gpu/ has
the rest, and tests/test_device.py the layer itself."""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist

from decoupled import device as device_mod
from decoupled.device import CudaAccel
from decoupled.job import load
from decoupled.engine.ranks import feed as feed_mod, pipeline, world
from decoupled.engine.ranks.budget import UpstreamEpochs
from decoupled.engine.ranks.transport import Kind, Message
from decoupled.engine.build import build_stages

from fake_cuda import install


class FakeLink:
    """Hands out `messages` in order; records what this thread's CUDA device was at each recv."""

    def __init__(self, device, messages, fake):
        self.device, self.peer, self.messages, self.fake = device, 0, list(messages), fake

    def recv(self):
        self.fake.log.append(("recv", (self.fake.current,)))
        return self.messages.pop(0)


def _receiver(monkeypatch, messages, tap=None):
    fake = install(monkeypatch)  # the device layer's torch.cuda, recording
    link = FakeLink(torch.device("cuda", 3), messages, fake)
    cfg = load(None, ["train.mode=sync"])
    r = feed_mod.SyncFeed([link], 1, cfg.dist, cfg.replay, cfg.train.seed, tap=tap)
    r.start()
    got = []
    while not got or got[-1] is None or got[-1].kind != Kind.STOP:
        got.append(r.inboxes[0].get(timeout=10))
        r.check()
    return fake.log, got


def test_receiver_thread_sets_its_device_before_receiving(monkeypatch):
    log, got = _receiver(monkeypatch, [Message(Kind.STOP)])
    assert log[0] == ("set_device", (torch.device("cuda", 3),))
    assert log[1] == ("recv", (torch.device("cuda", 3),))  # every recv runs on the link's device
    assert [m.kind for m in got] == [Kind.STOP]


def test_the_tap_reads_a_message_only_after_it_is_handed_over(monkeypatch):
    """HandoffCache.offer (the tap) reads on the receiver thread's current stream: the message must be
    handed over to it first (Accel.hand_over with the message's event)."""
    order = []
    monkeypatch.setattr(CudaAccel, "hand_over", lambda self, ready, *ts: order.append(("handover", ready, len(ts))))
    x, y, ids = torch.ones(2, 3), torch.zeros(2, dtype=torch.int64), torch.arange(2)
    m = Message(Kind.TRAIN, 0, 0, x, y, ids, ready="event")
    _, got = _receiver(monkeypatch, [m, Message(Kind.STOP)], tap=lambda msg: order.append(("tap", msg.ready)))
    assert order == [("handover", "event", 4), ("tap", "event")]
    assert [g.kind for g in got] == [Kind.TRAIN, Kind.STOP]


def test_nccl_environment_defaults_respect_the_user(monkeypatch):
    for name in world.NCCL_ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC", "30000")  # the user's choice stands
    world.nccl_env_defaults()
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0"
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert os.environ["TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC"] == "30000"


def test_nccl_environment_is_set_before_the_process_group(monkeypatch):
    for name in world.NCCL_ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = {}

    class Created(Exception):
        pass

    def init_process_group(backend, **kw):
        seen.update(backend=backend, env={k: os.environ.get(k) for k in world.NCCL_ENV_DEFAULTS})
        raise Created

    monkeypatch.setattr(world, "resolve_backend", lambda cfg: ("nccl", torch.device("cpu")))
    monkeypatch.setattr(world.dist, "init_process_group", init_process_group)
    try:
        world.init(load(None, ["train.mode=sync"]))
    except Created:
        pass
    assert seen["backend"] == "nccl" and seen["env"] == world.NCCL_ENV_DEFAULTS


def test_device_ordinal_is_local_rank_modulo_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for local, visible, want in [(5, 4, 1), (3, 1, 0), (2, 8, 2), (1, 0, 1)]:
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setattr(torch.cuda, "device_count", lambda v=visible: v)
        assert device_mod.local_cuda_index() == want
        assert device_mod.resolve_device("cuda") == torch.device("cuda", want)
        assert world.resolve_backend(load(None, ["train.mode=sync"])) == ("nccl", torch.device("cuda", want))


def test_a_replica_sends_before_it_closes_the_round(monkeypatch):
    """stepping.AllReduce defers the round's all-reduce and step until the pipeline has sent the
    batch's activations on, so downstream never waits for the group's slowest replica."""
    events = []

    def all_reduce(t, group=None, **kw):  # a group of one: the sum is the tensor itself
        events.append("all_reduce")

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    cfg = load(None, ["model.widths=[16,16]", "data.batch_size=8"])
    stages = build_stages(cfg, (1, 8, 8), 10, torch.device("cpu"), replication=lambda n: ({j: 2 for j in range(n)}, 0))
    for s in stages:
        s.join(None, sync_bn=False)
    fake = SimpleNamespace(delay=None, stages=stages, _log=None, last_step=0, steps=0, budget=UpstreamEpochs(0),
                           _maybe_done=lambda: None,
                           _send_flow=lambda flow, step: events.extend("send" for _ in flow), split=False,
                           run=SimpleNamespace(recorder=SimpleNamespace(t0=0.0)))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for step in range(2):
        pipeline.Pipeline.train_batch(fake, x, y, torch.arange(8), step)
        # per stage: one bucket of gradients (dist.allreduce_bucket_mb), then [buffers, flags, n]
        assert events == ["send"] + ["all_reduce"] * 2 * len(stages), events
        assert all(s.stats.updates == step + 1 for s in stages)  # settled: every round closed after the send
        events.clear()
