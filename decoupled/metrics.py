"""Honest numbers per process: peak memory, time, and a metrics.jsonl stream.

Peak memory is measured, never estimated, and says how (`mem_method`): on CUDA the allocator's peak
since a reset at start ("cuda"); on CPU the growth of the resident-set high-water mark over the
baseline taken after initialisation: Linux's VmHWM, reset through /proc/self/clear_refs where the
kernel allows it ("proc-vmhwm"); without /proc (macOS, BSD) getrusage's ru_maxrss, which cannot be
reset, so the growth of the mark over its value at start ("resource-maxrss": exact once training's
peak exceeds the setup's, which is the usual case, else a lower bound); without either (Windows)
psutil's RSS sampled every few ms ("psutil-sampled": misses spikes shorter than that). If nothing
can measure it the peak is None (unknown), never 0.

Training and evaluation peak apart (`enter(phase)`, `evaluating()`): the mark restarts when an
evaluation begins and when training resumes, so `peak_mem_bytes` is the peak of training alone and
`eval_peak_mem_bytes` that of the evaluations (where the mark can restart: "cuda", "psutil-sampled",
and "proc-vmhwm" where the kernel allows the reset; elsewhere one peak of both, and
`eval_peak_mem_bytes` is None). On CPU the heap is trimmed first (glibc's malloc_trim,
`trim_heap`): glibc keeps freed heap pages resident, so without it the mark would restart at
whatever the phase before left behind (measured: 154 MiB freed in 80 KB tensors stayed resident
until a trim gave it back), and an evaluation would read as high as training, or training after it
as high as the evaluation.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .device import accel

PROC_STATUS = "/proc/self/status"  # module constants, so tests can take /proc away
CLEAR_REFS = "/proc/self/clear_refs"


def _proc_status_kib(field: str) -> int | None:
    try:
        with open(PROC_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _libc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on musl, macOS and Windows
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_trim()


def trim_heap() -> None:
    """Give the heap's free pages back to the kernel, so the resident set is what is live."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _maxrss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


class _RssSampler:
    """The process's RSS polled by a daemon thread; `peak` is the largest value seen since `restart`.

    A sample is read and folded under one lock, and `restart` takes it too: else a sample read before a
    restart (an evaluation's RSS) could be folded after it, into the next phase's peak (seen in CI:
    training's peak read as the evaluation's 94 MiB)."""

    def __init__(self, every_s: float = 0.005):
        import psutil
        self.proc, self.every_s = psutil.Process(), every_s
        self._lock = threading.Lock()
        self.peak = self.proc.memory_info().rss
        threading.Thread(target=self._run, daemon=True, name="rss-sampler").start()

    def sample(self) -> int:
        """Fold the RSS of this moment into the peak; return the peak."""
        with self._lock:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            return self.peak

    def restart(self) -> int:
        """The peak restarts at the RSS of this moment; return it."""
        with self._lock:
            self.peak = self.proc.memory_info().rss
            return self.peak

    def _run(self) -> None:
        while True:
            self.sample()
            time.sleep(self.every_s)


def _cpu_method() -> str | None:
    if _proc_status_kib("VmHWM") is not None:
        return "proc-vmhwm"
    if _maxrss_bytes() is not None:
        return "resource-maxrss"
    try:
        import psutil  # noqa: F401
    except ImportError:
        return None
    return "psutil-sampled"


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.dev = accel(device)
        # the allocator's statistics where the device has them (CUDA; the checked host's stand-in)
        self.method = self.dev.memory_method if self.dev.allocator else _cpu_method()
        self._sampler: _RssSampler | None = None
        self.reset()

    def reset(self) -> None:
        """Call after model and data are built: what follows is what training costs."""
        self.hwm_reset = False
        self.phase = "train"  # what the mark measures now: "train" or "eval" (enter())
        self.train_peak = 0  # training's peak before the mark last restarted
        self.eval_peak: int | None = None  # the evaluations' peak before it last restarted; None: none apart
        self.reserved_peak = 0  # CUDA: the caching allocator's reserved bytes, training's peak
        if self.dev.allocator:  # no synchronize: see reset_peak
            self.dev.reset_peak_memory_stats()
            self.baseline = self.dev.memory_allocated()
        elif self.method == "proc-vmhwm":
            trim_heap()  # the baseline is what is live, not what setup freed (and reset_peak trims alike)
            try:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
                with open(CLEAR_REFS, "w") as f:
                    f.write("5")
                self.hwm_reset = True
            except OSError:
                pass
            self.baseline = (_proc_status_kib("VmRSS") or 0) * 1024
        elif self.method == "resource-maxrss":
            self.baseline = _maxrss_bytes()
        elif self.method == "psutil-sampled":
            self._sampler = self._sampler or _RssSampler()
            self.baseline = self._sampler.restart()
        else:
            self.baseline = None

    @property
    def restarts(self) -> bool:
        """Whether the mark can restart (reset_peak), so evaluation's peak can be told from training's."""
        return self.dev.allocator or self.method == "psutil-sampled" or (self.method == "proc-vmhwm" and self.hwm_reset)

    def enter(self, phase: str) -> None:
        """From now on the mark measures `phase` ("train" or "eval"). Only a change of phase restarts it
        (a heap trim and a /proc write on CPU), so a rank that calls this at every evaluation batch
        pays for it once per evaluation, not once per batch. A torchrun rank (Pipeline.handle) enters
        "eval" at an evaluation's first batch and "train" after its END_EVAL, and never at a training
        batch: an async rank's training draws between evaluation batches count in the evaluation."""
        if phase == self.phase:
            return
        if self.restarts:
            self._fold()
            self.reset_peak()
        self.phase = phase

    @contextmanager
    def evaluating(self):
        """An evaluation: its peak goes to eval_peak, and training's peak_bytes() leaves it out."""
        before = self.phase
        self.enter("eval")
        try:
            yield
        finally:
            self.enter(before)

    def _fold(self) -> None:
        """The mark's peak since its last restart, into the phase it measured."""
        now = self._since_restart() or 0
        if self.phase == "eval":
            self.eval_peak = max(self.eval_peak or 0, now)
        else:
            self.train_peak = max(self.train_peak, now)
            if self.dev.allocator:
                self.reserved_peak = max(self.reserved_peak, self.dev.max_memory_reserved())

    def reset_peak(self) -> None:
        """Restart the high-water mark from now, keeping the baseline. resource-maxrss cannot restart:
        its peak stays the one since the baseline. On CUDA the allocator counts at allocation time on
        the host, so no synchronize: one here could wait on a receiver's posted NCCL recv."""
        if self.dev.allocator:
            self.dev.reset_peak_memory_stats()
        elif self.method == "proc-vmhwm" and self.hwm_reset:
            trim_heap()  # else the mark restarts at the freed heap the phase before left resident
            with open(CLEAR_REFS, "w") as f:
                f.write("5")
        elif self.method == "psutil-sampled":
            trim_heap()
            self._sampler.restart()

    def peak_bytes(self) -> int | None:
        """Training's peak bytes above the baseline, evaluations apart (enter()); None when nothing
        can measure it."""
        now = self._since_restart()
        if now is None:
            return None
        return self.train_peak if self.phase == "eval" and self.restarts else max(self.train_peak, now)

    def eval_peak_bytes(self) -> int | None:
        """The evaluations' peak above the baseline; None when none was measured apart from training."""
        if self.phase == "eval" and self.restarts:
            return max(self.eval_peak or 0, self._since_restart() or 0)
        return self.eval_peak

    def _since_restart(self) -> int | None:
        """Peak bytes above the baseline since the mark last restarted."""
        if self.dev.allocator:
            return self.dev.max_memory_allocated() - self.baseline
        if self.method == "proc-vmhwm":
            return max(0, (_proc_status_kib("VmHWM") or 0) * 1024 - self.baseline)
        if self.method == "resource-maxrss":
            return max(0, _maxrss_bytes() - self.baseline)
        if self.method == "psutil-sampled":  # the samples, and this moment (a sampler may not have run yet)
            return max(0, self._sampler.sample() - self.baseline)
        return None

    def report(self) -> dict:
        peak = self.peak_bytes()
        out = {"peak_mem_bytes": None if peak is None else int(peak), "mem_method": self.method,
               "mem_baseline_bytes": None if self.baseline is None else int(self.baseline),
               "eval_peak_mem_bytes": self.eval_peak_bytes()}
        if self.dev.allocator:  # training's, as peak_mem_bytes (the allocator's peak restarts around evaluations)
            if self.phase == "train":
                self.reserved_peak = max(self.reserved_peak, self.dev.max_memory_reserved())
            out["peak_reserved_bytes"] = int(self.reserved_peak)
            out["peak_allocated_bytes"] = int(peak + self.baseline)
        else:
            out["hwm_reset"] = self.hwm_reset
        return out


def mib_text(peak: int | None) -> str:
    """A peak for people: MiB, or "unknown" when nothing could measure it (None)."""
    return "unknown" if peak is None else f"{peak / 2**20:.1f} MiB"


class Recorder:
    """Appends one JSON object per line to metrics.jsonl (flushed, so a crash keeps what was logged)."""

    def __init__(self, path: Path | None):
        self.f = open(path, "a", buffering=1) if path else None
        self.t0 = time.perf_counter()

    def log(self, **record) -> None:
        if self.f:
            record = {"time_s": round(time.perf_counter() - self.t0, 4), **record}
            self.f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None


def interactive() -> bool:
    """Progress bars only on a terminal, never in CI logs."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress(total: int, desc: str, postfix=None):
    """A tqdm bar on a terminal (disabled elsewhere). `postfix`: a callable giving the text after the
    counts, called at every redraw, so the bar always shows the values of that moment."""
    from tqdm import tqdm

    class Bar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            if postfix is not None and not self.disable:
                d["postfix"] = postfix() or d.get("postfix")
            return d

    return Bar(total=total, desc=desc, disable=not interactive(), leave=False, dynamic_ncols=True)
