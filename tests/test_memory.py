"""Peak memory says how it was measured, and an unmeasurable peak is unknown (None), never 0; the
evaluations' peak apart from training's. Exact memory (decoupled/memory.py) by hand counts: a replica's
all-reduce copy, a held batch autograd also saves (once), held bytes sampled where no optimizer steps,
the bench's slow-link rows' communication state (PowerSGD's error feedback and P / Q, local SGD's
averaged copy), and FSDP's figure marked a lower bound in bench.md."""
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from decoupled import metrics
from decoupled.console import format_summary
from decoupled.device import accel
from decoupled.engine.ranks.pipeline import Pipeline
from decoupled.engine.ranks.replay import Entry, ReplayBuffer
from decoupled.engine.ranks.transport import Kind, Message
from decoupled.memory import ExactMemory, pipeline_held


def _allocate_and_measure(mem: metrics.PeakMemory) -> dict:
    mem.reset()
    # 64 MiB above the process's lifetime peak, touched: ru_maxrss cannot be reset, so after earlier
    # tests in this process grew and freed more than 64 MiB, a plain 64 MiB would not raise it (a
    # test-order flake); the lifetime peak minus the current RSS is what the allocation must exceed
    import psutil
    headroom = max(0, (metrics._maxrss_bytes() or 0) - psutil.Process().memory_info().rss)
    x = torch.ones((headroom + 64 * 2**20) // 4)
    x += 1
    out = mem.report()  # no wait: a sampled peak includes the moment of the report
    del x
    return out


def _clear_refs_writable() -> bool:
    try:
        with open(metrics.CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def test_proc_method_on_linux(monkeypatch, tmp_path):
    if metrics._proc_status_kib("VmHWM") is None:
        pytest.skip("no /proc here")
    r = _allocate_and_measure(metrics.PeakMemory(torch.device("cpu")))
    assert r["mem_method"] == "proc-vmhwm" and r["peak_mem_bytes"] >= 32 * 2**20
    # the high-water mark was reset at the start where the kernel allows it, and the report says so
    assert r["hwm_reset"] is _clear_refs_writable()
    # where it does not (an older kernel, a sandbox): still measured, and the report says it was not reset
    monkeypatch.setattr(metrics, "CLEAR_REFS", str(tmp_path / "no-clear-refs" / "clear_refs"))
    r = _allocate_and_measure(metrics.PeakMemory(torch.device("cpu")))
    assert r["mem_method"] == "proc-vmhwm" and r["hwm_reset"] is False and r["peak_mem_bytes"] >= 32 * 2**20


@pytest.mark.parametrize("method", ["resource-maxrss", "psutil-sampled"])
def test_fallback_without_proc(monkeypatch, tmp_path, method):
    monkeypatch.setattr(metrics, "PROC_STATUS", str(tmp_path / "no-proc" / "status"))
    monkeypatch.setattr(metrics, "CLEAR_REFS", str(tmp_path / "no-proc" / "clear_refs"))
    if method == "psutil-sampled":  # no getrusage either (Windows)
        monkeypatch.setattr(metrics, "_maxrss_bytes", lambda: None)
    mem = metrics.PeakMemory(torch.device("cpu"))
    assert mem.method == method
    r = _allocate_and_measure(mem)
    assert r["mem_method"] == method
    # ru_maxrss cannot be reset: the growth of the mark is a lower bound, but a fresh 64 MiB on top of a
    # small test process's setup still raises it
    assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] > 0


def test_unmeasurable_is_unknown(monkeypatch):
    monkeypatch.setattr(metrics, "_cpu_method", lambda: None)
    r = metrics.PeakMemory(torch.device("cpu")).report()
    assert r["peak_mem_bytes"] is None and r["mem_method"] is None
    summary = {"mode": "simultaneous", "objective": "khidden", "model": "mlp", "dataset": "digits",
               "world_size": 1, "wall_s": 1.0, "layers": [], "ensemble_test_acc": 0.5,
               "ranks": [{"rank": 0, "blocks": [0], "samples_per_s": 1.0, **r}]}
    assert "peak_mem unknown" in format_summary(summary)


def _touch(mib: int) -> torch.Tensor:
    x = torch.ones(mib * 2**20 // 4)
    x += 1  # touched: resident
    return x


@pytest.mark.parametrize("method", ["proc-vmhwm", "psutil-sampled"])
def test_evaluation_peak_apart_from_training(monkeypatch, tmp_path, method):
    """A 96 MiB evaluation between two 24 MiB training phases: training's peak leaves it out, even
    after it (the heap it freed is given back), and eval_peak_mem_bytes is it. Where the mark cannot
    restart, one peak of both and no eval figure."""
    if method == "proc-vmhwm" and not (metrics._proc_status_kib("VmHWM") and _clear_refs_writable()):
        pytest.skip("no resettable VmHWM here")
    if method == "psutil-sampled":
        monkeypatch.setattr(metrics, "PROC_STATUS", str(tmp_path / "no-proc" / "status"))
        monkeypatch.setattr(metrics, "_maxrss_bytes", lambda: None)
    mem = metrics.PeakMemory(torch.device("cpu"))
    assert mem.method == method and mem.restarts
    x = _touch(24)
    mem.peak_bytes()
    del x
    with mem.evaluating():  # 96 MiB in 80 KB tensors: glibc's heap, which keeps freed pages resident
        ys = [torch.ones(20480) for _ in range(1200)]
        mem._since_restart()  # a sampled meter sees the moment it is asked
        del ys
    x = _touch(24)  # training after it: the evaluation's freed heap was trimmed (metrics.trim_heap)
    r = mem.report()
    del x
    assert 20 * 2**20 <= r["peak_mem_bytes"] < 64 * 2**20, r
    assert r["eval_peak_mem_bytes"] >= 90 * 2**20, r
    monkeypatch.setattr(metrics, "CLEAR_REFS", str(tmp_path / "no-clear-refs" / "clear_refs"))
    if method == "proc-vmhwm":  # the kernel does not allow the reset: no evaluation figure
        mem = metrics.PeakMemory(torch.device("cpu"))
        with mem.evaluating():
            y = _touch(96)
            del y
        r = mem.report()
        assert r["eval_peak_mem_bytes"] is None and r["peak_mem_bytes"] >= 90 * 2**20, r


def test_a_sample_read_before_a_restart_never_lands_after_it():
    """The psutil sampler's race, made to happen (seen once in CI: training's peak read as the
    evaluation's): its thread reads a high RSS, the phase restarts the mark, then the thread folds
    its stale reading. A restart waits for a sample in flight, so the mark holds the RSS after it."""
    import threading
    pytest.importorskip("psutil")
    reading, restarted = threading.Event(), threading.Event()

    class Proc:
        def memory_info(self):
            if threading.current_thread().name == "rss-sampler" and not restarted.is_set():
                reading.set()  # the sampler is inside its read of the evaluation's RSS
                restarted.wait(0.5)  # the restart comes now, while the reading is in flight
                return SimpleNamespace(rss=900)
            return SimpleNamespace(rss=100)

    sampler = metrics._RssSampler.__new__(metrics._RssSampler)
    sampler.proc, sampler.every_s, sampler._lock, sampler.peak = Proc(), 0.001, threading.Lock(), 100
    threading.Thread(target=sampler._run, daemon=True, name="rss-sampler").start()
    assert reading.wait(5)
    done = threading.Thread(target=lambda: (sampler.restart(), restarted.set()))
    done.start()
    time.sleep(0.05)  # without the lock, the restart finishes here, before the stale fold
    restarted.set()
    done.join(5)
    time.sleep(0.05)
    assert sampler.peak == 100, "the evaluation's stale sample landed in the restarted mark"


def test_phases_restart_the_mark_only_where_they_change(monkeypatch, tmp_path):
    """A torchrun rank sets the phase on every message (metrics.PeakMemory.enter): a run of evaluation
    batches restarts the mark once on entry and once when training resumes, not per batch, and a
    report taken during an evaluation still keeps the two peaks apart."""
    monkeypatch.setattr(metrics, "PROC_STATUS", str(tmp_path / "no-proc" / "status"))
    monkeypatch.setattr(metrics, "_maxrss_bytes", lambda: None)
    trim, restarts = metrics.trim_heap, []
    trim()  # the earlier tests' freed heap is not resident: training's 24 MiB grows the RSS
    mem = metrics.PeakMemory(torch.device("cpu"))  # psutil-sampled: restarts everywhere
    monkeypatch.setattr(metrics, "trim_heap", lambda: (restarts.append(mem.phase), trim()))
    x = _touch(24)
    for phase in ["train"] * 3 + ["eval"] * 5 + ["train"] * 2 + ["eval"] * 2:
        mem.enter(phase)
        if phase == "eval":
            y = _touch(48)
            mem._since_restart()  # a sampled meter sees the moment it is asked
            del y
    del x
    assert restarts == ["train", "eval", "train"]  # each restart trims the heap first, in the phase it leaves
    r = mem.report()
    assert 20 * 2**20 <= r["peak_mem_bytes"] < 44 * 2**20, r
    assert r["eval_peak_mem_bytes"] >= 44 * 2**20, r
    with mem.evaluating():  # nested in an evaluation: no restart, and the phase comes back
        pass
    assert mem.phase == "eval" and restarts == ["train", "eval", "train"]


# ---------------------------------------------------------------------- exact memory (decoupled/memory.py)
CPU = torch.device("cpu")


def _rank(buffer=None, queued=(), **parts) -> SimpleNamespace:
    """What Pipeline.handle and memory.pipeline_held read of a rank, by hand: a replay buffer (async),
    the feed's queued messages, no links; `parts` replace the handlers."""
    me = SimpleNamespace(dev=accel(CPU), buffer=buffer, feed=SimpleNamespace(queued=lambda: list(queued)),
                         recv_links=[], send_links=[], stages=[], run=SimpleNamespace(memory_phase=lambda p: None),
                         train_batch=lambda *a: None, end_epoch=lambda e: None, end_eval=lambda e, count=0: None,
                         send=lambda m: None, tally=SimpleNamespace(add=lambda stages, m: (m.x, None)),
                         eval_from=None, trained_at=0.0)
    me.__dict__.update(parts)
    return me


def test_a_replicas_all_reduce_copy_is_counted():
    """stepping.AllReduce.close all-reduces flat float32 copies, one at a time: of the gradients in
    buckets of dist.allreduce_bucket_mb, then of [the float buffers, a flag per parameter, n]; the
    largest is training memory. Stage 0 of an MLP with BatchNorm (Linear 64->16 without bias,
    BatchNorm 16, head Linear 16->10), 2 replicas in one process: one bucket of 4 * (1024 + 16 + 16 +
    160 + 10) = 4904 bytes of gradients, larger than the rest (4 * (16 + 16 running stats + 5 flags +
    1) = 152) and than stage 1's (4 * (256 + 32 + 170) = 1832), and in the total. With buckets of one
    parameter each, the largest gradient: 4 * 1024."""
    from decoupled.job import load
    from decoupled.engine.build import build_stages
    from decoupled.engine.ranks.budget import UpstreamEpochs
    mp = pytest.MonkeyPatch()
    mp.setattr(dist, "all_reduce", lambda t, group=None, **kw: None)  # a group of one: the sum is the tensor
    try:
        cfg = load(None, ["model.widths=[16,16]", "model.batchnorm=true", "data.batch_size=8"])
        stages = build_stages(cfg, (1, 8, 8), 10, CPU, replication=lambda n: ({j: 2 for j in range(n)}, 0))
        for s in stages:
            s.join(None, sync_bn=False)
        # one bucket of gradients (dist.allreduce_bucket_mb: 25), then [float buffers, had flags, n]
        grads = [4 * sum(p.numel() for p in s.stepper.params()) for s in stages]
        rest = [4 * (sum(b.numel() for b in s.stepper.buffers() if b.is_floating_point()) + len(s.stepper.params()) + 1)
                for s in stages]
        assert grads == [4 * (1024 + 16 + 16 + 160 + 10), 4 * (256 + 16 + 16 + 160 + 10)] and rest == [4 * 38] * 2
        fake = SimpleNamespace(delay=None, stages=stages, _log=None, last_step=0, steps=0, budget=UpstreamEpochs(0),
                               _maybe_done=lambda: None, _send_flow=lambda flow, step: None, split=False,
                               run=SimpleNamespace(recorder=SimpleNamespace(t0=0.0)))
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
        with ExactMemory([p for s in stages for p in s.parameters()], CPU) as m:
            for step in range(2):
                Pipeline.train_batch(fake, x, y, torch.arange(8), step)
        assert all(s.stats.updates == 2 for s in stages)
        for s in stages:  # buckets of one parameter each: the largest copy is the largest gradient
            s.stepper.bucket_bytes = 1
        with ExactMemory([p for s in stages for p in s.parameters()], CPU) as small:
            Pipeline.train_batch(fake, x, y, torch.arange(8), 2)
    finally:
        mp.undo()
    assert small.report()["exact_mem"]["allreduce_bytes"] == 4 * 1024
    r = m.report()
    assert r["exact_mem"]["allreduce_bytes"] == 4904 == max(grads + rest)
    parts = ["params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "held_bytes", "allreduce_bytes"]
    assert r["exact_train_mem_bytes"] == r["exact_mem"]["total_bytes"] == sum(r["exact_mem"][k] for k in parts)
    with ExactMemory(stages[0].parameters(), CPU) as m:  # no replicas, no copy: no such part
        stages[0].forward(x)
    assert "allreduce_bytes" not in m.report()["exact_mem"]


def test_a_held_batch_the_first_layer_saves_counts_once():
    """An async rank's drawn batch stays in the replay buffer (held) and is the input its first Linear
    saves for backward (activations): counted once. Linear 6->3, batch n=5, loss = sum (saves nothing),
    SGD without momentum (no state): params = grads = (6*3 + 3) * 4 = 84; x = 5*6*4 = 120 bytes, y and
    ids 5*8 = 40 each. Held, x is in held_bytes (with y and ids) and not in activations_bytes; not
    held, it is the 120 activation bytes; either way the total has it once."""
    n, d, k = 5, 6, 3
    params = (d * k + k) * 4

    def steps(m: ExactMemory, x: torch.Tensor, lin: nn.Linear, opt) -> None:
        opt.zero_grad()
        lin(x).sum().backward()
        opt.step()
        assert m.live == 0

    torch.manual_seed(0)
    lin = nn.Linear(d, k)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    x, y, ids = torch.randn(n, d), torch.randint(0, k, (n,)), torch.arange(n)
    buffer = ReplayBuffer(4, "fifo", max_reuse=0, seed=0)
    buffer.put(Entry(x, y, ids, epoch=0, step=0))
    me = _rank(buffer, train_batch=lambda x, y, ids, step, fresh: steps(m, x, lin, opt))
    with ExactMemory(lin.parameters(), CPU, held=pipeline_held(me)) as m:
        for _ in range(2):
            e = buffer.pick()  # as AsyncFeed draws: max_reuse 0 keeps it in the buffer
            Pipeline.handle(me, Message(Kind.TRAIN, e.epoch, e.step, e.x, e.y, e.ids))
    r = m.report()["exact_mem"]
    assert r == {"params_bytes": params, "grads_bytes": params, "optimizer_bytes": 0, "activations_bytes": 0,
                 "held_bytes": n * d * 4 + 2 * n * 8, "total_bytes": 2 * params + n * d * 4 + 2 * n * 8}
    with ExactMemory(lin.parameters(), CPU) as m:  # nothing held: the saved input is an activation
        steps(m, x, lin, opt)
    r = m.report()["exact_mem"]
    assert r["activations_bytes"] == n * d * 4 and r["held_bytes"] == 0
    assert r["total_bytes"] == 2 * params + n * d * 4
    # a batch that has left the buffer since the last sample and been freed: whatever is saved in its
    # place (at its address, maybe) is an activation again
    with ExactMemory(lin.parameters(), CPU, held=pipeline_held(me)) as m:
        m.sample_held()
        buffer.clear()
        del e, x
        steps(m, torch.randn(n, d), lin, opt)
    assert m.report()["exact_mem"]["activations_bytes"] == n * d * 4


def test_held_bytes_are_sampled_at_evaluation_batches_and_frozen_forwards():
    """No optimizer step: an evaluation, and a rank whose budget is made (it only forwards). Every
    message samples the held tensors (Pipeline.handle), so the peak is over them too. Evaluation: three
    batches of 4 x 8 float32 (128 bytes, y and ids 32 each: 192) queued in the control queue; at the
    first one's handling two are still queued: 384. Frozen: a buffer of three such batches: 576."""
    def batch():
        return torch.randn(4, 8), torch.randint(0, 3, (4,)), torch.arange(4)

    queue = [Message(Kind.EVAL, 0, i, *batch()) for i in range(3)]
    me = _rank(queued=queue)
    with ExactMemory([], CPU, held=pipeline_held(me)) as m:
        while queue:
            Pipeline.handle(me, queue.pop(0))
        Pipeline.handle(me, Message(Kind.END_EVAL, 0))
    assert m.report()["exact_mem"]["held_bytes"] == 2 * 192

    buffer = ReplayBuffer(4, "fifo", max_reuse=1, seed=0)  # budget made: each batch forwarded once
    for i in range(3):
        buffer.put(Entry(*batch(), epoch=0, step=i))
    me = _rank(buffer, train_batch=lambda *a: None)
    with ExactMemory([], CPU, held=pipeline_held(me)) as m:
        while (e := buffer.pick()) is not None:  # the first draw leaves two in the buffer
            Pipeline.handle(me, Message(Kind.TRAIN, e.epoch, e.step, e.x, e.y, e.ids))
    assert m.report()["exact_mem"]["held_bytes"] == 2 * 192


def test_an_evaluation_is_one_phase_whatever_an_async_rank_trains_between_its_batches(monkeypatch, tmp_path):
    """An async rank draws training batches between its evaluation batches: EVAL, TRAIN, EVAL, TRAIN,
    END_EVAL, TRAIN restarts the mark twice (when the evaluation begins, after its END_EVAL), not at
    every change of message kind (6 restarts, each a heap trim), and the trailing training is training's."""
    monkeypatch.setattr(metrics, "PROC_STATUS", str(tmp_path / "no-proc" / "status"))
    monkeypatch.setattr(metrics, "_maxrss_bytes", lambda: None)
    mem = metrics.PeakMemory(CPU)  # psutil-sampled: restarts everywhere
    assert mem.restarts
    restarts, trained = [], []
    monkeypatch.setattr(mem, "reset_peak", lambda: restarts.append(mem.phase))
    me = _rank(run=SimpleNamespace(memory_phase=mem.enter),
               train_batch=lambda *a: trained.append(mem.phase))
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    for kind in [Kind.EVAL, Kind.TRAIN, Kind.EVAL, Kind.TRAIN, Kind.END_EVAL, Kind.TRAIN]:
        m = Message(kind, 0, 0, x, y, torch.arange(2)) if kind != Kind.END_EVAL else Message(kind, 0)
        Pipeline.handle(me, m)
    assert restarts == ["train", "eval"]  # the phase each restart leaves
    assert trained == ["eval", "eval", "train"] and mem.phase == "train"


def test_bench_md_marks_the_fsdp_exact_memory_a_lower_bound():
    """FSDP's exact figure counts its shards, not the parameters it all-gathers nor its unsharded
    gradients: bench.md's cell says "≥" and the memory note says why; the other rows' cells do not."""
    from decoupled.bench.report import markdown
    ranks = [{"compute_s": 1.0, "comm_s": 0.0, "idle_s": 0.0, "exact_train_mem_bytes": 2 ** 20,
              "peak_mem_bytes": 2 ** 21, "eval_peak_mem_bytes": None}]
    res = {"n_train": 128, "batch_size": 32, "ranks": 2, "repeats": 3,
           "machine": {"torch": "x", "cpu_count": 2, "loadavg_start": [0.0, 0.0, 0.0]},
           "rows": [{"mode": m, "samples_per_s": 100.0, "ranks": ranks} for m in ("e2e", "ddp", "fsdp")]}
    md = markdown(res)
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[4] for line in md.splitlines()
             if line.startswith("| ") and "samples/s" not in line}
    assert cells == {"e2e": "1.00", "ddp": "1.00", "fsdp": "≥ 1.00"}
    assert "lower bound (fsdp: the parameters FSDP all-gathers" in md


@pytest.fixture
def world_of_one():
    """A gloo process group of this process alone, for torch's DDP hooks and averagers in-process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _steps(model, opt, n: int) -> None:
    torch.manual_seed(0)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(8, 64)).square().sum().backward()
        opt.step()


@pytest.mark.timeout(120)
def test_the_slow_link_rows_communication_state_by_hand(world_of_one):
    """bench/strategies.py's wrapping of Linear 64->32, ReLU, Linear 32->10 (2410 parameters, 9640
    bytes: one DDP bucket), plain SGD. ddp-powersgd at rank 2 from step 2: after the third step the hook
    keeps the error feedback, the bucket's size (9640 bytes), and P and Q for the two weights it
    compresses (32x64: (32 + 64) x 2 x 2 = 384 < 2048 elements; 10x32: 168 < 320; the biases are
    all-reduced as they are): P = (32 + 10) x 2, Q = (64 + 32) x 2 floats, 1104 bytes. localsgd with
    period 2: torch's averager all-reduces a flat copy of the parameters (9640 bytes) and makes each
    parameter a view of it; autograd's saved views of the weights stay parameters (the same activation
    bytes as ddp's), and evaluation's average is undone after it."""
    from decoupled.bench.knobs import Knobs
    from decoupled.bench.strategies import STRATEGIES, Comm
    from decoupled.device import StepTimer

    def wrapped(row: str, knobs: Knobs):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        w = STRATEGIES[row].wrap(net, CPU, knobs, Comm(StepTimer(CPU), StepTimer(CPU)))
        return net, w, w.optimizer(torch.optim.SGD(net.parameters(), lr=0.01))

    params = 4 * (64 * 32 + 32 + 32 * 10 + 10)
    reports = {}
    for row, knobs in (("ddp", Knobs()), ("ddp-powersgd", Knobs(powersgd_rank=2)),
                       ("localsgd", Knobs(localsgd_period=2))):
        net, w, opt = wrapped(row, knobs)
        with ExactMemory(list(net.parameters()), CPU, comm_state=w.state) as m:
            _steps(w.model, opt, 3)
        reports[row] = m.report()["exact_mem"]
        assert reports[row]["params_bytes"] == reports[row]["grads_bytes"] == params, row
    ddp, powersgd, localsgd = reports["ddp"], reports["ddp-powersgd"], reports["localsgd"]
    assert "comm_state_bytes" not in ddp and "allreduce_bytes" not in ddp
    assert powersgd["comm_state_bytes"] == params + 4 * ((32 + 10) * 2 + (64 + 32) * 2) == 9640 + 1104
    assert powersgd["total_bytes"] == ddp["total_bytes"] + powersgd["comm_state_bytes"]
    assert localsgd["allreduce_bytes"] == params and "comm_state_bytes" not in localsgd
    assert localsgd["activations_bytes"] == ddp["activations_bytes"]  # the rebound weights' views are no activations
    assert len({p.untyped_storage().data_ptr() for p in net.parameters()}) == 1  # views of the averaged copy
    own = [p.data for p in net.parameters()]
    with w.evaluating():
        assert all(p.data is not o for p, o in zip(net.parameters(), own))
    assert all(p.data.data_ptr() == o.data_ptr() for p, o in zip(net.parameters(), own))
