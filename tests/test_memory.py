"""Peak memory says how it was measured, and an unmeasurable peak is unknown (None), never 0."""
import pytest
import torch

from decoupled import metrics
from decoupled.console import format_summary


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
