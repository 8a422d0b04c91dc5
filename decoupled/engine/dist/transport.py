"""Point-to-point messages between neighbouring ranks.

A message is a fixed 12-int64 header, followed for data messages by the labels and sample ids (one
int64 tensor of 2n), the activations (dist.wire_dtype) and optionally an auxiliary float tensor
(the running head ensemble during evaluation). The header says what follows, so shapes may change
from message to message (last batch, sample subsets) and every rank knows when an epoch ends. Every
transfer has exactly the size of its content: bytes on the wire are the data's, not padding's (an
earlier format carried labels in a header padded to the largest batch: 8 KiB per message).

Each link (rank j-1 -> rank j) has its own two-rank process group: the sender uses it only from
its main thread and the receiver only from its receiver thread, so no process group is ever driven
from two threads at once. The same code runs over gloo (CPU) and NCCL (CUDA).
"""
from __future__ import annotations

import contextlib
import enum
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

HEADER_LEN = 12
MAX_DIMS = 5
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class Kind(enum.IntEnum):
    TRAIN = 1
    EVAL = 2
    END_EPOCH = 3  # every message of the epoch has been sent
    END_EVAL = 4  # every eval message of this evaluation has been sent
    STOP = 5  # training is over; nothing follows
    ABORT = 6  # a rank failed (header step = the failing rank); every rank downstream stops too


class PeerError(RuntimeError):
    """A neighbouring rank failed, went silent, or sent something we cannot read."""


class PeerAbort(PeerError):
    def __init__(self, origin: int, me: int):
        super().__init__(f"rank {me}: stopping because rank {origin} failed (its log has the reason)")
        self.origin = origin


@dataclass
class Message:
    kind: Kind
    epoch: int = 0
    step: int = 0  # the producer's step counter (staleness = consumer's view of it minus this)
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    aux: torch.Tensor | None = None
    ready: object = None  # CUDA: event recorded on the receiver's stream once the tensors have landed

    @property
    def count(self) -> int:
        return 0 if self.x is None else len(self.x)


def header_meta(m: Message, max_count: int) -> list[int]:
    """The fixed fields of a header: kind, epoch, step, count, ndim, dims[5], dtype, aux width."""
    if m.count > max_count:
        raise ValueError(f"a message of {m.count} samples exceeds the wire limit of {max_count}")
    meta = [int(m.kind), m.epoch, m.step, m.count] + [0] * (HEADER_LEN - 4)
    if m.x is not None:
        dims = list(m.x.shape[1:])
        if len(dims) > MAX_DIMS:
            raise ValueError(f"activations with {len(dims)} feature dims; the wire format carries {MAX_DIMS}")
        meta[4], meta[5:5 + len(dims)] = len(dims), dims
        meta[10] = DTYPES.index(m.x.dtype)
        meta[11] = 0 if m.aux is None else m.aux.shape[1]
    return meta


def encode_header(m: Message, max_count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The header on `device`, built without a host sync: the fixed fields go up from (pinned) host
    memory asynchronously. Returns the header and the host tensor it was copied from (kept alive
    until the send completes)."""
    meta = torch.tensor(header_meta(m, max_count), dtype=torch.int64)
    if device.type == "cuda":
        meta = meta.pin_memory()
    return meta.to(device, non_blocking=True), meta


def handover(ready, *tensors) -> None:
    """Make tensors the receiver thread produced on its side stream safe to use on the current
    (training) stream: that stream waits for the side stream's event `ready` (the host does not),
    and the caching allocator learns that it uses them. A no-op on CPU (ready is None)."""
    if ready is None:
        return
    stream = torch.cuda.current_stream()
    stream.wait_event(ready)
    for t in tensors:
        if t is not None:
            t.record_stream(stream)


class Link:
    """One direction of one edge of the pipeline, seen from one end."""

    def __init__(self, group, peer: int, device: torch.device, timeout_s: float, max_count: int,
                 max_inflight: int = 2):
        self.group, self.peer, self.device = group, peer, device
        self.max_count = max_count  # most samples one message may carry
        self.timeout = timedelta(seconds=timeout_s)
        self.max_inflight = max_inflight
        self.inflight: list[tuple[list, list[torch.Tensor]]] = []  # (works, tensors kept alive)
        self.bytes = 0
        self.samples = 0  # samples carried by data messages (routing makes this shrink downstream)
        self.blocked_s = 0.0  # time spent waiting on this link
        self.stream = None  # CUDA: the receiver thread's stream (made on first receive, on that thread)
        self.header_host = None

    # ------------------------------------------------------------------ sending (main thread)
    def send(self, m: Message) -> None:
        # On NCCL the isend runs on NCCL's stream, which first waits for the current (training)
        # stream: the activations are complete when they go, and training never waits for the send.
        header, meta = encode_header(m, self.max_count, self.device)
        tensors = [header]
        if m.x is not None:
            tensors.append(torch.cat([m.y.to(torch.int64), m.ids.to(torch.int64)]))  # on the device: no sync
            tensors.append(m.x.contiguous())
            if m.aux is not None:
                tensors.append(m.aux.float().contiguous())
        # Never touch (or free) a tensor before its isend completes: keep them until wait().
        works = [dist.isend(t, group=self.group, group_dst=self.peer_in_group()) for t in tensors]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        tensors.append(meta)
        self.samples += m.count
        self.inflight.append((works, tensors))
        while len(self.inflight) > self.max_inflight:
            self._wait_oldest()

    def flush(self) -> None:
        while self.inflight:
            self._wait_oldest()

    def abort(self, origin: int) -> None:
        """Best effort: tell downstream that rank `origin` failed, without waiting long for it."""
        try:
            self.timeout = timedelta(seconds=min(5.0, self.timeout.total_seconds()))
            self.inflight.clear()  # what was in flight no longer matters
            self.send(Message(Kind.ABORT, step=origin))
            self.flush()
        except Exception:  # noqa: BLE001 - the link may be the thing that broke
            pass

    def _wait_oldest(self) -> None:
        works, _ = self.inflight.pop(0)
        t0 = time.perf_counter()
        for w in works:
            self._wait(w, "send to")
        self.blocked_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ receiving (receiver thread)
    def recv(self) -> Message:
        """The next message. On CUDA every NCCL call of the receiver runs on its own stream, so
        waiting on a receive never makes the training stream wait (Work.wait makes the *current*
        stream wait for NCCL's event); the message's tensors are handed over by an event (handover)."""
        with self._on_stream():
            m = self._recv_message()
            if self.stream is not None:
                m.ready = torch.cuda.Event()
                m.ready.record(self.stream)
        return m

    def _on_stream(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
            self.header_host = torch.empty(HEADER_LEN, dtype=torch.int64).pin_memory()
        return torch.cuda.stream(self.stream)

    def _read_header(self, raw: torch.Tensor) -> list[int]:
        if self.stream is None:
            return raw[:HEADER_LEN].tolist()
        # into pinned memory, then wait for the receiver's stream only (not the device)
        self.header_host.copy_(raw[:HEADER_LEN], non_blocking=True)
        self.stream.synchronize()
        return self.header_host.tolist()

    def _recv_message(self) -> Message:
        header = self._read_header(self._recv(torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)))
        kind = Kind(int(header[0]))
        m = Message(kind, epoch=int(header[1]), step=int(header[2]))
        if kind in (Kind.TRAIN, Kind.EVAL):
            n, ndim = int(header[3]), int(header[4])
            dims = [int(d) for d in header[5:5 + ndim]]
            labels = self._recv(torch.empty(2 * n, dtype=torch.int64, device=self.device))
            m.y, m.ids = labels[:n], labels[n:]
            m.x = self._recv(torch.empty((n, *dims), dtype=DTYPES[int(header[10])], device=self.device))
            self.samples += n
            if int(header[11]):
                m.aux = self._recv(torch.empty((n, int(header[11])), dtype=torch.float32, device=self.device))
        return m

    def _recv(self, t: torch.Tensor) -> torch.Tensor:
        self._wait(dist.irecv(t, group=self.group, group_src=self.peer_in_group()), "receive from")
        self.bytes += t.numel() * t.element_size()
        return t

    # ------------------------------------------------------------------ helpers
    def peer_in_group(self) -> int:
        # two-rank groups hold (lower, higher) global ranks as group ranks 0 and 1
        return 0 if self.peer < dist.get_rank() else 1

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except RuntimeError as e:
            raise PeerError(f"rank {dist.get_rank()}: {what} rank {self.peer} failed or timed out after "
                            f"{self.timeout.total_seconds():.0f}s (dist.timeout_s): {e}") from e
        if ok is False:
            raise PeerError(f"rank {dist.get_rank()}: {what} rank {self.peer} timed out after "
                            f"{self.timeout.total_seconds():.0f}s (dist.timeout_s)")
