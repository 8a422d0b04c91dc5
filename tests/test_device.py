"""The device layer (decoupled/device.py, note [one code path]): the marker hand-over that crashed
every multi-GPU job, the CUDA class against a recording fake of torch.cuda, the checked host's
hazards one by one (note [checked host]), and the engine's sync and async jobs on the checked host."""
from __future__ import annotations

import ast
import inspect
import threading
from types import SimpleNamespace

import pytest
import torch

from decoupled import checkpoint, device as device_mod
from decoupled.device import CheckError, CheckedHostAccel, CudaAccel, StepTimer, accel
from decoupled.engine.ranks.pipeline import Pipeline
from decoupled.engine.ranks.transport import Kind, Message

from configs import MLP, VGG_CASCADE
from fake_cuda import install
from torchrun_utils import assert_same_results, assert_same_states, check, sets, summary, torchrun

GPU = torch.device("cuda", 1)


@pytest.mark.parametrize("kind", [Kind.END_EPOCH, Kind.END_EVAL, Kind.STOP, Kind.ABORT])
def test_every_marker_is_handed_over_by_its_event(monkeypatch, kind):
    """Issue 29's crash: a received marker carries the receiver stream's event and no tensor, and
    Pipeline.handle hands every message over; the hand-over took its device from the tensors
    (StopIteration on a marker). Now the stream waits on the event and nothing else happens."""
    fake = install(monkeypatch)
    dev = accel(GPU)
    ready = dev.event()
    ready.record("side")
    handled = []
    me = SimpleNamespace(dev=dev, run=SimpleNamespace(memory_phase=lambda phase: handled.append(phase)),
                         end_epoch=lambda e: handled.append("end_epoch"),
                         end_eval=lambda e, count=0: handled.append("end_eval"),
                         send=lambda m: handled.append(m.kind))
    fake.log.clear()
    going = Pipeline.handle(me, Message(kind, epoch=0, ready=ready))
    assert fake.names() == ["current_stream", "current.wait_event"]  # no record_stream: no tensor
    assert fake.log[0][1] == (GPU,)
    assert going == (kind != Kind.STOP)
    assert handled[0] == ("eval" if kind == Kind.END_EVAL else "train")


def test_a_data_message_is_handed_over_tensor_by_tensor(monkeypatch):
    fake = install(monkeypatch)
    dev = accel(GPU)
    ready = dev.event()
    tensors = [SimpleNamespace(record_stream=lambda s, n=n: fake.log.append((f"t{n}.record_stream", (s,))))
               for n in range(3)]
    fake.log.clear()
    dev.hand_over(ready, tensors[0], None, tensors[1], tensors[2])
    assert fake.names() == ["current_stream", "current.wait_event", "t0.record_stream", "t1.record_stream",
                            "t2.record_stream"]
    dev.hand_over(None, *tensors)  # made on this stream: nothing to order
    assert len(fake.log) == 5


def test_the_cuda_class_is_straight_torch_cuda_calls(monkeypatch):
    fake = install(monkeypatch)
    dev = accel(GPU)
    assert isinstance(dev, CudaAccel)
    dev.bind()
    dev.synchronize()
    side = dev.side_stream()
    with dev.on(side):
        ev = dev.event(timing=True)
        ev.record(side)
    ev.query()
    ev.synchronize()
    ev.seconds_to(dev.event(timing=True))
    dev.rng_devices()
    dev.set_rng_state(dev.get_rng_state())
    dev.reset_peak_memory_stats()
    dev.memory_allocated(), dev.max_memory_allocated(), dev.max_memory_reserved()
    from fake_cuda import Obj
    dev.pin(Obj(fake.log, "host"))
    assert dev.issue(object()) is device_mod._ISSUE_LOCK  # note [NCCL issue lock]: one lock per process
    assert fake.names()[-1] == "host.pin_memory"
    fake.log.pop()
    assert fake.names() == [
        "set_device", "synchronize", "Stream", "stream", "Event", "event.record", "event.query",
        "event.synchronize", "Event", "event.elapsed_time", "get_rng_state", "set_rng_state",
        "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated", "max_memory_reserved"]
    assert all(args[0] == GPU for name, args in fake.log
               if name in ("set_device", "synchronize", "Stream", "get_rng_state", "memory_allocated"))
    assert dev.rng_devices() == [GPU] and dev.process_group_device() == GPU and dev.fused_optimizer()
    assert not dev.blocking_wait and dev.pinned and dev.allocator and not dev.host_clock


def test_the_cuda_class_has_no_control_flow_of_its_own():
    """Note [one code path]: every branch, loop and wait is in Accel, which the CPU suite walks."""
    tree = ast.parse(inspect.getsource(CudaAccel))
    flow = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, (ast.If, ast.For, ast.While, ast.Try,
                                                                        ast.IfExp, ast.With, ast.comprehension))]
    assert flow == []


def test_peak_memory_reads_the_allocator_through_the_layer(monkeypatch):
    fake = install(monkeypatch)
    from decoupled.metrics import PeakMemory
    m = PeakMemory(GPU)
    m.enter("eval")
    m.enter("train")
    rep = m.report()
    assert rep["mem_method"] == "cuda" and rep["peak_mem_bytes"] == 4000 and rep["peak_reserved_bytes"] == 8192
    assert "synchronize" not in fake.names()  # a device-wide wait could stall on a posted receive


def test_step_timer_folds_events_without_waiting(monkeypatch):
    timer = StepTimer(torch.device("cpu"))
    for _ in range(300):
        timer.stop(timer.start())
    assert len(timer.pending) < 300 and timer.seconds >= 0 and timer.pending == []


class _Done:
    """A completed work."""

    def wait(self, timeout=None):
        return True


def _landed(dev: CheckedHostAccel, buf: torch.Tensor, stream):
    from decoupled.device import _CheckedRecv
    with dev.on(stream):
        dev.posted += 1
        work = _CheckedRecv(dev, _Done(), buf)
        work.wait()
    return work


def test_checked_host_poisons_a_received_buffer_until_its_event_is_waited():
    dev = CheckedHostAccel(torch.device("cpu"))
    truth = torch.arange(32, dtype=torch.uint8)
    buf = truth.clone()
    side = dev.side_stream()
    early = dev.event()
    early.record(side)  # before the receive: covers nothing
    _landed(dev, buf, side)
    assert bool((buf == 0xFF).all())  # the training stream sees poison: NaN floats, labels -1
    header = dev.download(torch.empty(2, dtype=torch.int64), buf[:16].view(torch.int64), side)
    assert header == truth[:16].view(torch.int64).tolist()  # the receiving stream reads the bytes
    dev.hand_over(early, buf)
    assert bool((buf == 0xFF).all())
    ready = dev.event()
    ready.record(side)
    dev.hand_over(ready, buf[4:8])  # a view hands its buffer over
    assert torch.equal(buf, truth) and dev.pending == {}
    with pytest.raises(CheckError):
        dev.event().wait(dev.current_stream())  # never recorded


def test_checked_host_refuses_a_send_buffer_written_in_flight():
    from decoupled.device import _CheckedSend
    buf = torch.zeros(8)
    ok = _CheckedSend(_Done(), buf)
    assert ok.wait() and ok.is_completed()
    bad = _CheckedSend(_Done(), buf)
    buf[3] = 1.0  # reused before its send was waited on
    with pytest.raises(CheckError, match="written while its send was in flight"):
        bad.wait()


def test_checked_host_drives_each_process_group_from_one_thread():
    """Note [NCCL communicators]: the invariant the design relies on (R1), after the warm-up (R3)."""
    dev = CheckedHostAccel(torch.device("cpu"))
    group = object()
    with pytest.raises(CheckError, match="before its warm-up"):
        dev.issue(group)
    dev.issue_first(group)
    with dev.issue(group):
        pass
    errors = []

    def other():
        try:
            dev.issue(group)
        except CheckError as e:
            errors.append(e)
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1 and "two threads" in str(errors[0])
    other_group = object()
    dev.issue_first(other_group)
    t = threading.Thread(target=dev.issue, args=(other_group,))  # another group, another thread
    t.start()
    t.join()
    assert dev.drivers[id(other_group)] != dev.drivers[id(group)]


def test_checked_host_refuses_a_device_wide_synchronize_while_a_receive_is_posted():
    dev = CheckedHostAccel(torch.device("cpu"))
    dev.synchronize()
    dev.posted = 1
    with pytest.raises(CheckError, match="receive"):
        dev.synchronize()


def test_the_switch_picks_the_checked_host(monkeypatch):
    monkeypatch.setattr(device_mod, "_ACCELS", {})
    monkeypatch.setenv(device_mod.CHECK_ENV, "1")
    assert isinstance(accel(torch.device("cpu")), CheckedHostAccel)
    monkeypatch.setattr(device_mod, "_ACCELS", {})
    monkeypatch.setenv(device_mod.CHECK_ENV, "0")
    assert type(accel(torch.device("cpu"))).__name__ == "HostAccel"


# ---------------------------------------------------------------------------------------------- jobs
@pytest.mark.parametrize("cfg,world", [(MLP, 2), (VGG_CASCADE, 3)], ids=["mlp-2ranks", "vgg-cascade-3ranks"])
def test_sync_equals_simultaneous_on_the_checked_host(tmp_path, monkeypatch, shared_reference, cfg, world):
    """Note [checked host]: received buffers are poison until handed over, send buffers must stay
    unchanged in flight, waits poll as CUDA's do, one thread per process group: still bit for bit."""
    monkeypatch.setenv(device_mod.CHECK_ENV, "1")
    ref_dir, ref = shared_reference(cfg)
    check(torchrun(world, ["--out", str(tmp_path / "run"), *sets({**cfg, "train.mode": "sync"})]))
    got = summary(tmp_path / "run")
    assert_same_results(ref, got)
    assert_same_states(ref_dir, tmp_path / "run", world, max(checkpoint.epochs(ref_dir, 0)))
    assert {r["mem_method"] for r in got["ranks"]} == {"checked-host"}  # the allocator's path, walked


@pytest.mark.parametrize("world", [2, 3])
def test_async_on_the_checked_host(tmp_path, monkeypatch, world):
    """Async hands batches from the receiver thread to the replay buffer and replays them: with poison
    until the hand-over, a batch drawn without its event would train on labels -1 (an IndexError) and
    NaN activations (the finiteness check, every step on the host, names the block): the job completes."""
    monkeypatch.setenv(device_mod.CHECK_ENV, "1")
    cfg = {**MLP, "train.mode": "async", "replay.capacity": 2, "replay.max_reuse": 3}
    check(torchrun(world, ["--out", str(tmp_path / "run"), *sets(cfg)]))
    s = summary(tmp_path / "run")
    assert [l["block"] for l in s["layers"]] == [0, 1, 2]
    assert all(l["epochs"] == 2 and 0.0 <= l["test_acc"] <= 1.0 for l in s["layers"]), s["layers"]
    assert all(r["replay"]["fresh_draws"] > 0 for r in s["ranks"][1:])
    assert {r["mem_method"] for r in s["ranks"]} == {"checked-host"}
