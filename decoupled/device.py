"""The device layer: everything that differs between CPU and CUDA, in one place (note [one code path]).

Note [one code path]. The engine, the transport and the bench workers never branch on the device.
They call one `Accel` (`accel(device)`), whose control flow is written once, here, in terms of a few
primitives: events, streams, pinned host memory, synchronize, allocator statistics, the device's RNG.
- `CudaAccel` implements the primitives with straight `torch.cuda` calls and no control flow of its
  own (tests/test_device.py checks it against a recording fake of `torch.cuda`).
- `HostAccel` (CPU) implements them as trivial objects: an event that is recorded, waited on and
  queried exactly where a CUDA one is, stamps the host clock and is always complete. The hot path
  pays a few attribute lookups per message, and a gloo wait still blocks on gloo's condition variable.
- `CheckedHostAccel` (tests; `DECOUPLED_CHECK_DEVICE=1`) is an adversarial host: it makes the CPU
  suite fail where the CUDA caching allocator and streams would corrupt a GPU run (note [checked host]).

Note [checked host]. With DECOUPLED_CHECK_DEVICE=1 every CPU `Accel` is a `CheckedHostAccel`:
- a received buffer holds poison (0xFF bytes: NaN floats, labels -1) from the moment its receive
  completes until an event recorded after it, on the stream that received it, has been waited on by
  the stream that reads it (`hand_over`); only reads on the receiving stream itself (`download`, the
  header) see the bytes before that. A path that passes tensors across threads without their event
  (the tap, the replay buffer, the pipeline) trains on poison, and the bit-for-bit tests fail.
- a send's buffer must stay alive and unchanged until the send completes: its bytes at issue are
  kept, and the wait fails (CheckError) if the buffer was written or freed in between. (Taking the
  bytes only at the wait, as a lazy device could, deadlocks: a rank may enter a collective with a
  send still unwaited, and gloo, like NCCL, completes a send without its sender's wait.)
- waits poll `is_completed()` as CUDA's do (note [waiting on NCCL]), so the suite walks that loop.
- the allocator statistics are the process's resident-set marks, so `PeakMemory` takes the allocator
  path it takes on CUDA; the device RNG is a host generator of its own.
- the invariant of note [NCCL communicators] is asserted: each process group is driven by one thread
  only, and no device-wide synchronize happens while a receive is posted.

CUDA kernels run asynchronously: a host clock read right after launching them measures the launch,
not the work. `synchronize` makes a wall-clock reading honest at the end of a timed region; the hot
loops never call it.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref

import torch

from .config import ConfigError

cuda = torch.cuda  # the one name CudaAccel calls through (tests replace it with a recorder)

CHECK_ENV = "DECOUPLED_CHECK_DEVICE"  # note [checked host]


def local_cuda_index() -> int:
    """This process's GPU: LOCAL_RANK modulo the visible devices, so one GPU per process made visible
    with CUDA_VISIBLE_DEVICES (every rank then sees a single device 0) works as well as all visible."""
    local, visible = int(os.environ.get("LOCAL_RANK", 0)), cuda.device_count()
    return local % visible if visible else local


def cuda_available() -> bool:
    return cuda.is_available()


def gpu_names() -> list[str]:
    """The visible GPUs' names (none on a host without CUDA)."""
    return [cuda.get_device_name(i) for i in range(cuda.device_count())]


def resolve_device(name: str) -> torch.device:
    """"auto" = cuda when available; under torchrun cuda:(LOCAL_RANK mod visible devices)."""
    if name == "auto":
        name = "cuda" if cuda_available() else "cpu"
    if name == "cuda":
        if not cuda_available():
            raise ConfigError("train.device='cuda' but no CUDA device is visible; use train.device='cpu' or 'auto'")
        return torch.device("cuda", local_cuda_index())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- host
class HostEvent:
    """A CUDA event's stand-in: recorded where one is, always complete."""

    __slots__ = ("t",)

    def __init__(self):
        self.t = 0.0

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait(self, stream) -> None:
        """Make `stream` wait for this event (the host has nothing to order)."""

    def seconds_to(self, later: "HostEvent") -> float:
        return later.t - self.t


class HostStream:
    __slots__ = ("name",)

    def __init__(self, name: str = "default"):
        self.name = name

    def synchronize(self) -> None:
        pass


class Accel:
    """The device's primitives (subclasses) and the control flow over them (here, written once)."""

    host_clock = True  # whether host clocks time this device's work (CUDA: they time kernel launches)
    pinned = False  # whether host buffers are pinned (CUDA: an asynchronous copy needs it)
    allocator = False  # whether allocator statistics exist (metrics.PeakMemory reads them)
    memory_method = None  # PeakMemory's `mem_method` when it reads them
    check_every = 1  # train.check_every's default: steps between finiteness checks (each a host sync on CUDA)
    blocking_wait = True  # gloo: a wait blocks on a condition variable; else poll (note [waiting on NCCL])

    def __init__(self, device: torch.device):
        self.device = device

    # ------------------------------------------------------------------ control flow (one path)
    def hand_over(self, ready, *tensors) -> None:
        """Make tensors produced on another stream (a receiver's) safe to use on this thread's current
        stream: it waits for their event `ready` (the host does not), and the caching allocator learns
        that it uses them. `ready` None: made on this stream. No tensors (a marker) is fine."""
        if ready is None:
            return
        stream = self.current_stream()
        ready.wait(stream)
        for t in tensors:
            if t is not None:
                self.record_stream(t, stream)

    def upload(self, *tensors) -> list[torch.Tensor]:
        """Host tensors to the device: from pinned memory, so the copy is asynchronous (non_blocking from
        pageable memory is a synchronous copy); a tensor already on the device is left as it is."""
        return [self.pin(t).to(self.device, non_blocking=True) if t.device.type == "cpu" else t for t in tensors]

    def wait(self, work, timeout_s: float) -> None:
        """Until `work` is done, or `timeout_s` (RuntimeError). gloo: its own blocking wait. Else
        (note [waiting on NCCL]): poll `is_completed()` with a short backoff and our own deadline,
        then `wait()` without a timeout, which only orders the current stream after the work."""
        if self.blocking_wait:
            work.wait(_timedelta(timeout_s))
            return
        deadline, pause = time.monotonic() + timeout_s, 2e-5
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise RuntimeError("no completion")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        work.wait()

    def isend(self, buf: torch.Tensor, group, dst: int):
        with self.issue(group):
            return _dist().isend(buf, group=group, group_dst=dst)

    def irecv(self, buf: torch.Tensor, group, src: int):
        with self.issue(group):
            return _dist().irecv(buf, group=group, group_src=src)

    def all_reduce(self, t: torch.Tensor, group) -> None:
        with self.issue(group):
            _dist().all_reduce(t, group=group)

    def warm(self, op, t: torch.Tensor, group, peer: int | None):
        """A group's first call (note [NCCL communicators], R3), on the main thread before any other
        thread drives the group; returns its work. op: dist.isend, dist.irecv or dist.all_reduce."""
        with self.issue_first(group):
            if peer is None:
                return op(t, group=group, async_op=True)
            if op.__name__ == "isend":
                return op(t, group=group, group_dst=peer)
            return op(t, group=group, group_src=peer)

    def issue_first(self, group):
        """Context for a group's warm-up call (the checked host records the group as warm)."""
        return self.issue(group)

    def download(self, dst: torch.Tensor, src: torch.Tensor, stream) -> list[int]:
        """`src` (on `stream`, the current one) to the host buffer `dst` and its values, waiting for that
        stream only, never the device (a device-wide wait could stall on a posted receive)."""
        dst.copy_(src, non_blocking=True)
        stream.synchronize()
        return dst.tolist()

    # ------------------------------------------------------------------ primitives (host versions)
    def bind(self) -> None:
        """Make this device the calling thread's current device."""

    def synchronize(self) -> None:
        """Wait for every queued kernel of the device (ends of timed regions only)."""

    def event(self, timing: bool = False):
        return HostEvent()

    def current_stream(self):
        return _HOST_STREAM

    def side_stream(self):
        """A stream of the calling thread's own (a receiver's): its waits never stall training's."""
        return HostStream("side")

    def on(self, stream):
        """Context: `stream` is the current stream."""
        return contextlib.nullcontext()

    def record_stream(self, t: torch.Tensor, stream) -> None:
        pass

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def host_buffer(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(n, dtype=dtype)

    def issue(self, group):
        """Context for enqueuing a collective or point-to-point call (note [NCCL issue lock])."""
        return contextlib.nullcontext()

    def rng_devices(self) -> list:
        """torch.random.fork_rng's `devices`."""
        return []

    def get_rng_state(self) -> torch.Tensor | None:
        return None

    def set_rng_state(self, state: torch.Tensor) -> None:
        pass

    def fused_optimizer(self) -> bool:
        return False

    def process_group_device(self) -> torch.device | None:
        """init_process_group's `device_id` (eager NCCL initialisation on this device)."""
        return None

    # allocator statistics (allocator = True only)
    def memory_allocated(self) -> int:
        raise NotImplementedError

    def max_memory_allocated(self) -> int:
        raise NotImplementedError

    def max_memory_reserved(self) -> int:
        raise NotImplementedError

    def reset_peak_memory_stats(self) -> None:
        raise NotImplementedError


_HOST_STREAM = HostStream()


class HostAccel(Accel):
    pass


def _dist():
    import torch.distributed as dist  # imported on use: config-only tools need no c10d
    return dist


def _timedelta(s: float):
    from datetime import timedelta
    return timedelta(seconds=s)


# ---------------------------------------------------------------------------------------------- CUDA
class CudaAccel(Accel):
    """Straight torch.cuda calls, no control flow (note [one code path])."""

    host_clock = False
    pinned = True
    allocator = True
    memory_method = "cuda"
    check_every = 100
    blocking_wait = False

    def bind(self) -> None:
        cuda.set_device(self.device)

    def synchronize(self) -> None:
        cuda.synchronize(self.device)

    def event(self, timing: bool = False):
        return _CudaEvent(cuda.Event(enable_timing=timing))

    def current_stream(self):
        return cuda.current_stream(self.device)

    def side_stream(self):
        return cuda.Stream(self.device)

    def on(self, stream):
        return cuda.stream(stream)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        t.record_stream(stream)

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory()

    def host_buffer(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(n, dtype=dtype).pin_memory()

    def issue(self, group):
        return _ISSUE_LOCK

    def rng_devices(self) -> list:
        return [self.device]

    def get_rng_state(self) -> torch.Tensor:
        return cuda.get_rng_state(self.device)

    def set_rng_state(self, state: torch.Tensor) -> None:
        cuda.set_rng_state(state, self.device)

    def fused_optimizer(self) -> bool:
        return True

    def process_group_device(self) -> torch.device:
        return self.device

    def memory_allocated(self) -> int:
        return cuda.memory_allocated(self.device)

    def max_memory_allocated(self) -> int:
        return cuda.max_memory_allocated(self.device)

    def max_memory_reserved(self) -> int:
        return cuda.max_memory_reserved(self.device)

    def reset_peak_memory_stats(self) -> None:
        cuda.reset_peak_memory_stats(self.device)


class _CudaEvent:
    """torch.cuda.Event with the host event's names."""

    __slots__ = ("ev",)

    def __init__(self, ev):
        self.ev = ev

    def record(self, stream=None) -> None:
        self.ev.record(stream)

    def query(self) -> bool:
        return self.ev.query()

    def synchronize(self) -> None:
        self.ev.synchronize()

    def wait(self, stream) -> None:
        stream.wait_event(self.ev)

    def seconds_to(self, later: "_CudaEvent") -> float:
        return self.ev.elapsed_time(later.ev) / 1000


_ISSUE_LOCK = threading.Lock()  # note [NCCL issue lock] (engine/ranks/transport.py)


# ---------------------------------------------------------------------------------------------- checked host
POISON = 0xFF


class CheckError(AssertionError):
    """A hazard the checked host caught (note [checked host])."""


class _CheckedEvent(HostEvent):
    __slots__ = ("owner", "covers", "recorded")

    def __init__(self, owner: "CheckedHostAccel"):
        super().__init__()
        self.owner, self.covers, self.recorded = owner, (), False

    def record(self, stream=None) -> None:
        super().record(stream)
        self.recorded = True
        self.covers = self.owner._pending_on(stream or self.owner.current_stream())

    def query(self) -> bool:
        if not self.recorded:
            raise CheckError("an event was queried before it was recorded")
        return True

    def wait(self, stream) -> None:
        if not self.recorded:
            raise CheckError("a stream waited on an event that was never recorded")
        self.owner._reveal(self.covers)


class _Completion:
    """A gloo work as a device's work: `is_completed()` turns true when it has completed, whoever waits.
    (Gloo's point-to-point works complete only inside `wait()`, so a thread waits for it.)"""

    def __init__(self, work):
        self.work, self.error, self.finished = work, None, threading.Event()
        threading.Thread(target=self._wait, daemon=True, name="checked-work").start()

    def _wait(self):
        try:
            self.work.wait()
        except BaseException as e:  # noqa: BLE001 - raised by wait()
            self.error = e
        self.finished.set()

    def is_completed(self) -> bool:
        return self.finished.is_set()

    def wait(self, timeout=None):
        if not self.finished.wait(None if timeout is None else timeout.total_seconds()):
            raise RuntimeError("no completion")
        if self.error is not None:
            raise self.error
        self.completed()
        return True

    def completed(self) -> None:
        pass


class _CheckedSend(_Completion):
    """A send whose buffer must stay alive and unchanged until it completes (note [checked host]): the
    bytes at issue are kept, and the wait compares the buffer with them."""

    def __init__(self, work, buf: torch.Tensor):
        self.ref, self.sent, self.done = weakref.ref(buf), buf.clone(), False
        super().__init__(work)

    def completed(self) -> None:
        if not self.done:
            self.done = True
            buf = self.ref()
            if buf is None:
                raise CheckError("a send buffer was freed before its send completed")
            if not torch.equal(buf, self.sent):
                raise CheckError("a send buffer was written while its send was in flight")


class _CheckedRecv(_Completion):
    def __init__(self, owner: "CheckedHostAccel", work, buf: torch.Tensor):
        self.owner, self.buf, self.done = owner, buf, False
        super().__init__(work)

    def completed(self) -> None:
        if not self.done:
            self.done = True
            self.owner._landed(self.buf)


class CheckedHostAccel(HostAccel):
    """Note [checked host]. Per process and device, shared by every thread (a stream is per thread)."""

    allocator = True
    memory_method = "checked-host"  # the resident-set marks, read through the allocator's path
    blocking_wait = False

    def __init__(self, device: torch.device):
        self.lock = threading.Lock()
        self.local = threading.local()
        self.pending: dict[int, tuple[object, torch.Tensor, torch.Tensor]] = {}  # storage -> (stream, buf, truth)
        self.drivers: dict[int, int] = {}  # id(process group) -> the one thread that issues its calls
        self.warmed: set[int] = set()  # groups warmed up (World.warm_up)
        self.posted = 0  # receives issued and not yet completed
        self.rng = torch.Generator().manual_seed(0)
        super().__init__(device)

    def current_stream(self):
        s = getattr(self.local, "stream", None)
        if s is None:
            s = self.local.stream = HostStream(f"default-{threading.get_ident()}")
        return s

    def side_stream(self):
        return HostStream(f"side-{threading.get_ident()}")

    @contextlib.contextmanager
    def on(self, stream):
        before = self.current_stream()
        self.local.stream = stream
        try:
            yield
        finally:
            self.local.stream = before

    def event(self, timing: bool = False):
        return _CheckedEvent(self)

    def issue(self, group):
        me, key = threading.get_ident(), id(group)
        with self.lock:
            warm = key in self.warmed
            owner = self.drivers.setdefault(key, me)
        if not warm:  # note [NCCL communicators], R3
            raise CheckError(f"process group {key} used before its warm-up (World.warm_up)")
        if owner != me:  # R1: one thread per communicator
            raise CheckError(f"process group {key} driven from two threads ({owner} and {me})")
        return contextlib.nullcontext()

    def warm(self, op, t, group, peer):
        return _Completion(Accel.warm(self, op, t, group, peer))

    def issue_first(self, group):
        """The warm-up: on the main thread, before any thread drives the group (its driver is
        registered by the first call after it)."""
        with self.lock:
            self.warmed.add(id(group))
        return contextlib.nullcontext()

    def isend(self, buf, group, dst):
        return _CheckedSend(Accel.isend(self, buf, group, dst), buf)

    def irecv(self, buf, group, src):
        work = Accel.irecv(self, buf, group, src)
        with self.lock:
            self.posted += 1
        return _CheckedRecv(self, work, buf)

    def _landed(self, buf: torch.Tensor) -> None:
        """A receive completed on the current stream: its bytes are poison to every other stream."""
        truth = buf.clone()
        buf.fill_(POISON)
        with self.lock:
            self.posted -= 1
            self.pending[buf.untyped_storage().data_ptr()] = (self.current_stream(), buf, truth)

    def _pending_on(self, stream) -> tuple:
        with self.lock:
            return tuple(k for k, (s, _, _) in self.pending.items() if s is stream)

    def _reveal(self, keys) -> None:
        with self.lock:
            for k in keys:
                entry = self.pending.pop(k, None)
                if entry is not None:
                    entry[1].copy_(entry[2])

    def download(self, dst, src, stream):
        with self.lock:  # a read on the receiving stream is ordered after the receive: it sees the bytes
            entry = self.pending.get(src.untyped_storage().data_ptr())
        if entry is not None and entry[0] is stream:
            at = src.storage_offset() * src.element_size() - entry[1].storage_offset()
            src = entry[2][at:at + src.numel() * src.element_size()].view(src.dtype).view(src.shape)
        return super().download(dst, src, stream)

    def synchronize(self) -> None:
        if self.posted:  # note [NCCL communicators]: a device-wide wait would wait on the peer too
            raise CheckError(f"device-wide synchronize while {self.posted} receive(s) are posted")

    def rng_devices(self) -> list:
        return []

    def get_rng_state(self) -> torch.Tensor:
        return self.rng.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.rng.set_state(state)

    # the process's resident-set marks stand in for the allocator's statistics (Linux /proc; 0 elsewhere)
    def memory_allocated(self) -> int:
        return _status_bytes("VmRSS")

    def max_memory_allocated(self) -> int:
        return _status_bytes("VmHWM")

    def max_memory_reserved(self) -> int:
        return self.max_memory_allocated()

    def reset_peak_memory_stats(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak RSS restarts from the current RSS
        except OSError:
            pass


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------- the one accessor
_ACCELS: dict[torch.device, Accel] = {}
_ACCELS_LOCK = threading.Lock()


def accel(device: torch.device) -> Accel:
    """The layer for `device`, one per process and device (the checked host's state is shared)."""
    a = _ACCELS.get(device)
    if a is None:
        with _ACCELS_LOCK:
            a = _ACCELS.get(device)
            if a is None:
                if device.type == "cuda":
                    a = CudaAccel(device)
                elif os.environ.get(CHECK_ENV, "") not in ("", "0"):
                    a = CheckedHostAccel(device)
                else:
                    a = HostAccel(device)
                _ACCELS[device] = a
    return a


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    accel(device).synchronize()


class StepTimer:
    """Seconds spent in timed regions of work: a pair of events around each region, read back lazily
    (when `seconds` is asked for, at epoch ends), so timing adds no host sync to the hot loop and, on
    CUDA, measures the kernels, not their launch. The host's events stamp the wall clock."""

    def __init__(self, device: torch.device):
        self.accel = accel(device)
        self.total = 0.0
        self.pending: list = []

    def start(self):
        ev = self.accel.event(timing=True)
        ev.record()
        return ev

    def stop(self, t0) -> None:
        ev = self.accel.event(timing=True)
        ev.record()
        self.pending.append((t0, ev))
        if len(self.pending) > 256:  # fold in what has finished, without waiting
            while self.pending and self.pending[0][1].query():
                a, b = self.pending.pop(0)
                self.total += a.seconds_to(b)

    @property
    def seconds(self) -> float:
        for a, b in self.pending:
            b.synchronize()
            self.total += a.seconds_to(b)
        self.pending.clear()
        return self.total
