"""Honest numbers per process: peak memory, time, and a metrics.jsonl stream.

Peak memory is measured, never estimated: on CUDA the allocator's peak since a reset at start; on
CPU the growth of the kernel's resident-set high-water mark (VmHWM) over the baseline taken after
initialisation, with the mark reset through /proc/self/clear_refs where the kernel allows it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Call after model and data are built: what follows is what training costs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.baseline = (_proc_status_kib("VmRSS") or 0) * 1024
        self._hwm0 = (_proc_status_kib("VmHWM") or 0) * 1024

    def peak_bytes(self) -> int:
        """Peak bytes above the baseline since the last reset."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        hwm = (_proc_status_kib("VmHWM") or 0) * 1024
        return max(0, hwm - self.baseline)

    def report(self) -> dict:
        out = {"peak_mem_bytes": int(self.peak_bytes()), "mem_baseline_bytes": int(self.baseline)}
        if self.device.type == "cuda":
            out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
            out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        else:
            out["hwm_reset"] = self.hwm_reset
        return out


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


def progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not interactive(), leave=False, dynamic_ncols=True)
