"""A recording stand-in for `torch.cuda` (decoupled/device.py calls CUDA through its module name
`cuda`): every call is logged as (name, args), and what it returns is a recording object too, so
the device layer's CUDA class can be checked on a CPU, call by call."""
from __future__ import annotations

import torch

from decoupled import device as device_mod


class Obj:
    """A stream, an event or a tensor stand-in: its method calls are logged with its name."""

    def __init__(self, log: list, name: str):
        self._log, self._name = log, name

    def __getattr__(self, attr):
        def call(*args, **kw):
            self._log.append((f"{self._name}.{attr}", args))
            return Obj(self._log, f"{self._name}.{attr}()")
        return call

    def __repr__(self):
        return self._name

    def __truediv__(self, other):  # event.elapsed_time(...) / 1000
        return 0.0


class FakeCuda:
    def __init__(self, devices: int = 4):
        self.log: list = []
        self.devices = devices
        self.current: torch.device | None = None

    def _rec(self, name, *args):
        self.log.append((name, args))

    def is_available(self):
        return True

    def device_count(self):
        return self.devices

    def set_device(self, d):
        self._rec("set_device", torch.device(d))
        self.current = torch.device(d)

    def synchronize(self, d=None):
        self._rec("synchronize", d)

    def Event(self, enable_timing=False):  # noqa: N802 - torch's name
        self._rec("Event", enable_timing)
        return Obj(self.log, "event")

    def current_stream(self, d=None):
        self._rec("current_stream", d)
        return Obj(self.log, "current")

    def Stream(self, d=None):  # noqa: N802
        self._rec("Stream", d)
        return Obj(self.log, "side")

    def stream(self, s):
        self._rec("stream", s)
        import contextlib
        return contextlib.nullcontext()

    def get_rng_state(self, d=None):
        self._rec("get_rng_state", d)
        return torch.zeros(8, dtype=torch.uint8)

    def set_rng_state(self, state, d=None):
        self._rec("set_rng_state", d)

    def memory_allocated(self, d=None):
        self._rec("memory_allocated", d)
        return 1000

    def max_memory_allocated(self, d=None):
        self._rec("max_memory_allocated", d)
        return 5000

    def max_memory_reserved(self, d=None):
        self._rec("max_memory_reserved", d)
        return 8192

    def reset_peak_memory_stats(self, d=None):
        self._rec("reset_peak_memory_stats", d)

    def names(self) -> list[str]:
        return [n for n, _ in self.log]


def install(monkeypatch) -> FakeCuda:
    """The fake as the device layer's `cuda`, with no Accel cached from before."""
    fake = FakeCuda()
    monkeypatch.setattr(device_mod, "cuda", fake)
    monkeypatch.setattr(device_mod, "_ACCELS", {})
    return fake
