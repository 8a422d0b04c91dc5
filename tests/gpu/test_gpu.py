"""What one GPU can show (skipped without CUDA). Two NCCL ranks need two GPUs: the multi-rank NCCL jobs
are in tests/gpu/run.sh (run with >= 2 GPUs) and the CPU tests of the same code; here:
every single-process mode on CUDA, AMP, the side-stream hand-over (also against allocator reuse and
under the CUDA sanitizer), no host sync in a train step (fp32, bf16, fp16, a replica's) or from the
async hand-off cache's source, NCCL's wait(timeout) against our completion poll on a world of one,
and a throughput reading (printed, never asserted)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from decoupled.device import accel
from decoupled.job import load
from decoupled.run_job import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = ["data.name=synthetic", "data.synthetic_shape=[3,16,16]", "data.synthetic_train=512",
         "data.synthetic_test=128", "model.name=vgg", "model.hierarchy=[1,1,1]", "model.width=8",
         "train.epochs=2", "train.device=cuda", "data.batch_size=64"]


@pytest.mark.parametrize("mode", ["e2e", "sequential", "simultaneous", "sync", "async"])
def test_every_single_process_mode_on_cuda(tmp_path, mode):
    s = train(load(None, SMALL + [f"train.mode={mode}"]), tmp_path / mode)
    assert s["device"].startswith("cuda") and all(0 <= l["test_acc"] <= 1 for l in s["layers"])
    assert s["ranks"][0]["peak_mem_bytes"] > 0


def test_evaluation_peak_apart_on_cuda():
    """The allocator's peak restarts around an evaluation (no synchronize): a 64 MiB evaluation between
    two 8 MiB training phases is eval_peak_mem_bytes, not training's peak; the exact meter's CUDA
    figure is the meter's training peak, so the restarts do not clobber it."""
    from decoupled.memory import ExactMemory
    from decoupled.metrics import PeakMemory
    dev = torch.device("cuda")
    mem = PeakMemory(dev)
    w = torch.nn.Parameter(torch.ones(1024, device=dev))
    opt = torch.optim.SGD([w], lr=0.1)
    with ExactMemory([w], dev, allocator_peak=mem.peak_bytes) as exact:
        x = torch.ones(2 * 2**20, device=dev)  # 8 MiB of training
        (w.sum() * x.sum()).backward()
        opt.step()
        del x
        with mem.evaluating():
            y = torch.ones(16 * 2**20, device=dev)  # 64 MiB of evaluation
            del y
        x = torch.ones(2 * 2**20, device=dev)
        (w.sum() * x.sum()).backward()
        opt.step()
        del x
    r = mem.report()
    assert 8 * 2**20 <= r["peak_mem_bytes"] < 32 * 2**20 and r["eval_peak_mem_bytes"] >= 64 * 2**20, r
    assert 8 * 2**20 <= exact.report()["exact_mem"]["cuda_max_allocated_bytes"] < 32 * 2**20


def test_quicknet_on_cuda(tmp_path):
    s = train(load(None, SMALL + ["train.mode=quicknet", "objective.name=quicknet", "optim.name=adam",
                                  "optim.lr=0.001", "train.patience=1"]), tmp_path / "qn")
    assert s["exit_curve"]


@pytest.mark.parametrize("precision,wire", [("bf16", "bfloat16"), ("fp16", "float16"), ("bf16", "float32")])
def test_amp_and_wire_dtypes_on_cuda(tmp_path, precision, wire):
    sets = SMALL + ["train.mode=simultaneous", f"train.precision={precision}", f"dist.wire_dtype={wire}"]
    s = train(load(None, sets), tmp_path / "amp")
    assert s["layers"][-1]["test_acc"] > 0.2  # learns despite reduced precision
    got = train(load(None, sets[:-2] + ["train.mode=sync", f"train.precision={precision}",
                                        f"dist.wire_dtype={wire}"]), tmp_path / "amp-sync")
    for a, b in zip(s["layers"], got["layers"]):
        assert abs(a["test_acc"] - b["test_acc"]) < 0.05


def test_side_stream_handover_while_the_side_stream_is_busy():
    """A tensor produced on a side stream and handed over by an event (Accel.hand_over, the device
    layer's, as the receiver uses it) is read correctly by the main stream while the side stream
    still has queued work."""
    dev = accel(torch.device("cuda", torch.cuda.current_device()))
    side = dev.side_stream()
    a = torch.randn(2048, 2048, device="cuda")
    with dev.on(side):
        x = a @ a  # the hand-over tensor, allocated on the side stream
        ready = dev.event()
        ready.record(side)
        for _ in range(20):  # keep the side stream busy after the event
            a @ a
    dev.hand_over(ready, x)
    got = x.sum()  # main stream: waits for `ready`, not for the later work
    dev.synchronize()
    assert torch.allclose(got, (a @ a).sum(), rtol=1e-3)


def _steps_without_host_sync(stages, warm: int, steps: int = 5) -> None:
    """A warm-up step through the first `warm` stages (lazy initialisation may sync), then `steps`
    steps through all of them under torch.cuda.set_sync_debug_mode("error"): any host sync raises."""
    x = torch.randn(64, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    h = x
    for s in stages[:warm]:
        h, _ = s.train_step(h, y)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            h = x
            for s in stages:
                h, _ = s.train_step(h, y)
            for s in stages:  # a replica's round closes after the send (stepping.AllReduce)
                s.settle()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_step_makes_no_host_sync(precision):
    """fp16: the optimizers are fused on CUDA, so GradScaler.step passes the inf flag on the device
    instead of reading it with .item() (optim._fused)."""
    from decoupled.engine.build import build_stages
    cfg = load(None, SMALL + ["train.check_every=1000", "train.log_every=100000", f"train.precision={precision}"])
    stages = build_stages(cfg, (3, 16, 16), 10, torch.device("cuda"))
    assert all(g.get("fused") for s in stages for g in s.optimizer.param_groups)
    _steps_without_host_sync(stages, warm=len(stages))


def test_replicas_reference_on_cuda(tmp_path):
    """train.mode=simultaneous with dist.replicas: blocks accumulate R batches per step on the GPU."""
    s = train(load(None, SMALL + ["train.mode=simultaneous", "dist.replicas=[2,1]"]), tmp_path / "acc")
    assert all(0 <= l["test_acc"] <= 1 for l in s["layers"])


def test_replicated_step_makes_no_host_sync(tmp_path):
    """A replica's step (stepping.AllReduce): gradients, BN buffers and the sample count in one NCCL
    all-reduce, the division on the device; no host sync. One GPU hosts one NCCL rank, so the group
    here is a world of one playing replica 0 of 2 (the all-reduce then sums one contribution)."""
    import torch.distributed as dist
    from decoupled.engine.build import build_stages
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        cfg = load(None, SMALL + ["train.check_every=1000", "train.log_every=100000"])
        stages = build_stages(cfg, (3, 16, 16), 10, torch.device("cuda"),
                              replication=lambda n: ({j: 2 for j in range(n)}, 0))
        for s in stages:
            s.join(dist.group.WORLD, sync_bn=False)
        _steps_without_host_sync(stages, warm=len(stages))  # the warm-up also creates NCCL's communicators
        assert all(s.stats.updates == 6 for s in stages)
    finally:
        dist.destroy_process_group()


def test_simultaneous_vs_e2e_throughput_vgg11(tmp_path, capsys):
    sets = ["data.name=synthetic", "data.synthetic_shape=[3,32,32]", "data.synthetic_train=8192",
            "data.synthetic_test=512", "model.name=vgg", "model.hierarchy=[1,1,2,2,2]", "model.width=64",
            "train.epochs=2", "train.device=cuda", "data.batch_size=128", "train.eval_every=0",
            "train.checkpoint=false", "train.probe_epochs=0"]
    rates = {}
    for mode in ("e2e", "simultaneous"):
        t0 = time.perf_counter()
        s = train(load(None, sets + [f"train.mode={mode}"]), tmp_path / mode)
        rates[mode] = s["ranks"][0]["samples_per_s"]
        print(f"{mode}: {rates[mode]:.0f} samples/s ({time.perf_counter() - t0:.1f}s) "
              f"on {torch.cuda.get_device_name()}")
    assert all(r > 0 for r in rates.values())


HANDOVER_REUSE = """
import torch
from decoupled.device import accel
dev = accel(torch.device("cuda", torch.cuda.current_device()))
side = dev.side_stream()
with dev.on(side):  # the receiver: a message lands in a block of the side stream's pool
    x = torch.ones(1 << 20, device="cuda")
    ready = dev.event()
    ready.record(side)
dev.hand_over(ready, x)  # the training (default) stream takes it
torch.cuda._sleep(200_000_000)  # a long queue ahead of the read on the default stream
got = x.clone()  # queued behind the sleep
x_ptr = x.data_ptr()
del x  # freed by the host while the read is still queued
with torch.cuda.stream(side):  # the next irecv: the same size, on the side stream
    z = torch.empty(1 << 20, device="cuda")
    z.fill_(2.0)
torch.cuda.synchronize()
assert z.data_ptr() != x_ptr, "the block was reused while the default stream still had to read it"
assert bool((got == 1).all()), "the read saw the next message"
print("ok")
"""


@pytest.mark.parametrize("sanitizer", [False, True], ids=["plain", "TORCH_CUDA_SANITIZER"])
def test_handover_keeps_a_freed_block_from_the_next_receive(sanitizer):
    """Accel.hand_over: record_stream makes the allocator wait for the training stream's queued
    read before it gives the block to the side stream again (the hand-off tap and the replay buffer
    rely on it). In a subprocess: the sanitizer is switched on at import."""
    env = {**os.environ, **({"TORCH_CUDA_SANITIZER": "1"} if sanitizer else {})}
    r = subprocess.run([sys.executable, "-c", HANDOVER_REUSE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_wait_with_timeout_polls_slower_than_our_completion_poll(tmp_path, capsys):
    """NCCL's WorkNCCL::wait(timeout) polls isCompleted() with a 1 ms sleep; transport.Link._await
    (Accel.wait) polls is_completed() with a short backoff, then wait() without a timeout. A world of one: a small
    all-reduce (point-to-point to oneself is not allowed)."""
    import torch.distributed as dist
    from decoupled.engine.ranks.transport import Link
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        link = Link(dist.group.WORLD, 0, torch.device("cuda", 0), timeout_s=30, max_count=1)
        t = torch.zeros(256, device="cuda")

        def per_op(wait, n=200) -> float:
            dist.all_reduce(t)  # warm
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                wait(dist.all_reduce(t, async_op=True))
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n

        timed = per_op(lambda w: w.wait(timedelta(seconds=30)))
        polled = per_op(lambda w: link._await(w, "all-reduce"))
        print(f"per all-reduce: wait(timeout) {timed * 1e6:.0f} us, poll + wait() {polled * 1e6:.0f} us "
              f"on {torch.cuda.get_device_name()}")
        assert polled < timed
    finally:
        dist.destroy_process_group()


def test_handoff_source_makes_no_host_sync(tmp_path):
    """The async cascade hand-off: a memory cache filled by offer() serves its epochs (train batches,
    markers, the evaluation with the ensemble votes) without a host sync: the epoch's order goes to
    the device once, from pinned memory, and every gather indexes device data with device ids."""
    import contextlib
    from decoupled.engine.ranks.sources import HandoffCache
    from decoupled.engine.ranks.transport import Kind, Message
    from decoupled.engine.run import Run
    cfg = load(None, SMALL + ["train.mode=async", "train.cache=memory", "train.eval_every=0",
                              "data.eval_batch_size=64"])
    bar = SimpleNamespace(update=lambda *a: None)
    run = SimpleNamespace(cfg=cfg, rank=0, device=torch.device("cuda"), out=tmp_path,
                          recorder=SimpleNamespace(log=lambda **kw: None),
                          progress=lambda total, desc: contextlib.nullcontext(bar))
    run.to_device = lambda *ts: Run.to_device(run, *ts)
    n_train, n_test, classes = 96, 40, 10
    cache = HandoffCache(run, 0, "memory", n_train, n_test, classes, in_shape=(8, 4, 4))
    for kind, n in ((Kind.TRAIN, n_train), (Kind.EVAL, n_test)):
        for ids in torch.arange(n, device="cuda").split(32):
            aux = torch.randn(len(ids), classes, device="cuda") if kind == Kind.EVAL else None
            cache.offer(Message(kind, 0, 0, torch.randn(len(ids), 8, 4, 4, device="cuda"),
                                torch.randint(0, classes, (len(ids),), device="cuda"), ids, aux))
    source = cache.source(last=2)  # checks completeness: one read, before serving
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kinds = [m.kind for m in source]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert kinds.count(Kind.TRAIN) == 2 * 2 and kinds.count(Kind.EVAL) == 1 and kinds[-1] == Kind.STOP
