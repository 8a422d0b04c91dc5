"""Point-to-point messages between neighbouring ranks.

Wire format (note [one transfer per message]). A message is one contiguous byte buffer: a fixed
14-int64 header, then for data messages the labels and sample ids (2n int64), the activations
(dist.wire_dtype's form: the dtype slot names its codec, and a scaled code's per-sample scales are
part of its rows, engine/wire.py note [row scales]) and optionally an auxiliary float32 tensor (the
running head ensemble during evaluation), each segment starting on an 8-byte boundary so the
receiver can view it in place.
Both ends of a link track the same number `expect`: the byte size of the link's previous data
message (a header's size at first). A message of at most `expect` bytes goes as one transfer of
exactly `expect` bytes (NCCL needs the sizes to match; the tail is padding); a larger one goes as a
header-sized announcement of `expect` bytes, then itself. In steady state (same batch shape) every
message is one transfer: a rendezvous on gloo costs ~100-150 µs on 2 cores, and three per message
(header, labels, activations) made a slow downstream block its upstream in async. Markers carry no
data and do not change `expect`, so a train batch after an end-of-epoch is one transfer when it is
no larger than the batch before the marker (after a smaller last batch, or an evaluation's batches,
the next full batch is announced: two transfers, once per epoch; tests/test_transport.py counts them).
The receiver posts the next irecv as soon as it has read a header (it knows the next size then), so
the transfer overlaps its handling of the current message.

Each link (rank j-1 -> rank j) has its own two-rank process group: the sender uses it only from its
main thread and the receiver only from its receiver thread, so no process group is ever driven from
two threads at once. The same code runs over gloo (CPU) and NCCL (CUDA), see note [NCCL issue lock]
and, for why several communicators driven at once cannot deadlock, note [NCCL communicators] (world.py).

Note [NCCL issue lock]. NCCL is not safe to drive from several threads at once, even on separate
communicators of one device (NCCL's thread-safety notes; torch warns about it), and a rank does:
its receiver threads post irecvs while its training thread posts isends and replica all-reduces.
Every NCCL call is therefore *issued* under one process-wide lock (`Accel.issue`), which is held only
while the call enqueues its kernel, never while waiting for one, so a blocked receive cannot stall
the sends. Issuing everything from one thread would serialise the waits too. On gloo the lock is
not taken (gloo's pairs are thread-safe and its calls block in its own threads).

Note [waiting on NCCL]. `WorkNCCL::wait(timeout)` polls completion with a 1 ms sleep, so a receive
waited that way costs at least 1 ms. Here a host that must know a transfer is done (the header it
reads, the back-pressure on sends) polls `Work.is_completed()` (an event query) with a short
backoff and its own deadline (dist.timeout_s), then calls `wait()` without a timeout, which only
makes the current stream wait for NCCL's (`Accel.wait`; the checked host walks the same loop). On
gloo `wait(timeout)` blocks on a condition variable.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...device import Accel, accel
from ..wire import CODECS

HEADER_LEN = 14
HEADER_BYTES = HEADER_LEN * 8
MAX_DIMS = 5
DTYPES = [c.dtype for c in CODECS.values()] + [torch.float64]  # the header's dtype slot: an index here

class Kind(enum.IntEnum):
    TRAIN = 1
    EVAL = 2
    END_EPOCH = 3  # every message of the epoch has been sent
    END_EVAL = 4  # every eval message of this evaluation has been sent
    STOP = 5  # training is over; nothing follows
    ABORT = 6  # a rank failed (header step = the failing rank); every rank downstream stops too
    VAL = 7  # an evaluation batch of the validation split (data.val_fraction), after the last test evaluation
    END_VAL = 8  # every batch of the validation evaluation has been sent


# the kinds that carry a batch (the rest are markers); evaluation batches of either split
BATCHES = (Kind.TRAIN, Kind.EVAL, Kind.VAL)
EVALUATIONS = (Kind.EVAL, Kind.VAL)


class PeerError(RuntimeError):
    """A neighbouring rank failed, went silent, or sent something we cannot read. `culprit`: that
    rank, when it is known (it is what the abort downstream names)."""

    def __init__(self, message: str, culprit: int | None = None):
        super().__init__(message)
        self.culprit = culprit


class PeerAbort(PeerError):
    def __init__(self, origin: int, me: int):
        super().__init__(f"rank {me}: stopping because rank {origin} failed or timed out (the log of the rank "
                         "that noticed has the reason)", origin)
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
    ready: object = None  # the receiver stream's event, recorded once the tensors have landed (device.Accel.hand_over)
    frozen: bool = False  # a batch through blocks that have made their budget (note [paced frozen stream])
    fresh: bool = True  # local, not on the wire: a replay buffer's draw of a batch trained on before is not

    @property
    def count(self) -> int:
        return 0 if self.x is None else len(self.x)


def _align(n: int) -> int:
    return -(-n // 8) * 8


def layout(count: int, dims: list[int], dtype: torch.dtype, aux_width: int) -> tuple[list[int], int]:
    """Byte offsets of labels+ids, activations and aux in a message, and its total size."""
    offsets, at = [], HEADER_BYTES
    for nbytes in (2 * count * 8, count * _numel(dims) * dtype.itemsize, count * aux_width * 4):
        offsets.append(at)
        at += _align(nbytes)
    return offsets, at


def message_bytes(count: int, row_bytes: int, aux_width: int = 0) -> int:
    """The size of a message of `count` samples whose activations take `row_bytes` each in the wire's
    form (wire.Codec.row_bytes), with `aux_width` float32 a sample (an evaluation's running ensemble):
    what one transfer carries in steady state (the cost model's per-cut bytes, plan/model.py; the
    bench's wire_bytes_per_sample adds the announcements)."""
    return layout(count, [row_bytes], torch.uint8, aux_width)[1]


def _numel(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def header_meta(m: Message, max_count: int) -> list[int]:
    """The header: kind, epoch, step, count, ndim, dims[5], dtype, aux width, message bytes, frozen."""
    if m.count > max_count:
        raise ValueError(f"a message of {m.count} samples exceeds the wire limit of {max_count}")
    meta = [int(m.kind), m.epoch, m.step, m.count] + [0] * (HEADER_LEN - 4)
    meta[12] = HEADER_BYTES
    meta[13] = int(m.frozen)
    if m.x is not None:
        dims = list(m.x.shape[1:])
        if len(dims) > MAX_DIMS:
            raise ValueError(f"activations with {len(dims)} feature dims; the wire format carries {MAX_DIMS}")
        meta[4], meta[5:5 + len(dims)] = len(dims), dims
        meta[10] = DTYPES.index(m.x.dtype)
        meta[11] = 0 if m.aux is None else m.aux.shape[1]
        meta[12] = layout(m.count, dims, m.x.dtype, meta[11])[1]
    return meta


def pack(m: Message, meta: list[int], size: int, dev: Accel) -> tuple[torch.Tensor, torch.Tensor]:
    """The message as one byte buffer of `size` >= its own size, in one concatenation (each op costs
    microseconds of dispatch, and small messages are all fixed cost) and without a host sync: the
    header goes up from (pinned) host memory asynchronously. Returns the buffer and the host header
    (kept alive until the send completes)."""
    host = dev.pin(torch.tensor(meta, dtype=torch.int64))
    parts = [dev.upload(host)[0].view(torch.uint8)]
    if m.x is not None:
        parts.append(torch.cat([m.y.to(torch.int64), m.ids.to(torch.int64)]).view(torch.uint8))
        parts += _segment(m.x)
        if m.aux is not None:
            parts += _segment(m.aux.float())
    used = sum(p.numel() for p in parts)
    if used < size:  # padding up to the transfer the receiver has posted; never read
        parts.append(torch.empty(size - used, dtype=torch.uint8, device=dev.device))
    return torch.cat(parts), host


def _segment(t: torch.Tensor) -> list[torch.Tensor]:
    """A tensor's bytes, padded so that the next segment starts 8-byte aligned (layout)."""
    raw = t.contiguous().view(-1).view(torch.uint8)
    tail = -len(raw) % 8
    return [raw] + ([torch.zeros(tail, dtype=torch.uint8, device=t.device)] if tail else [])


def unpack(buf: torch.Tensor, header: list[int]) -> Message:
    """The message a buffer holds, as views of it (no copy)."""
    kind = Kind(int(header[0]))
    m = Message(kind, epoch=int(header[1]), step=int(header[2]), frozen=bool(header[13]))
    if kind in BATCHES:
        n, ndim, aux_w = int(header[3]), int(header[4]), int(header[11])
        dims, dtype = [int(d) for d in header[5:5 + ndim]], DTYPES[int(header[10])]
        (lab, act, aux), _ = layout(n, dims, dtype, aux_w)
        ints = buf[lab:lab + 16 * n].view(torch.int64)
        m.y, m.ids = ints[:n], ints[n:]
        m.x = buf[act:act + n * _numel(dims) * dtype.itemsize].view(dtype).view(n, *dims)
        if aux_w:
            m.aux = buf[aux:aux + 4 * n * aux_w].view(torch.float32).view(n, aux_w)
    return m


class Link:
    """One direction of one edge of the pipeline, seen from one end."""

    def __init__(self, group, peer: int, device: torch.device, timeout_s: float, max_count: int,
                 max_inflight: int = 2):
        self.group, self.peer, self.device = group, peer, device
        self.dev = accel(device)  # every device difference (streams, events, pinned memory, waits)
        self.max_count = max_count  # most samples one message may carry
        self.timeout_s = timeout_s
        self.max_inflight = max_inflight
        self.inflight: list[tuple[list, list[torch.Tensor]]] = []  # (works, tensors kept alive)
        self.expect = HEADER_BYTES  # the size of the next transfer, as both ends know it
        self.bytes = 0  # bytes on the wire (padding and announcements included)
        self.transfers = 0  # point-to-point calls issued (isends, or irecvs posted)
        self.messages = 0
        self.samples = 0  # samples carried by data messages (routing makes this shrink downstream)
        # training messages alone, evaluations apart: what a training step costs the link (bytes: the
        # sender's), and the training samples carried (either end)
        self.train_bytes = self.train_samples = 0
        self.blocked_s = 0.0  # time spent waiting on this link
        self.stream = None  # the receiver thread's stream (made on first receive, on that thread)
        self.header_host = None
        self.posted = None  # receiving: the irecv already posted for the next transfer, and its buffer

    # ------------------------------------------------------------------ sending (main thread)
    def send(self, m: Message) -> None:
        # On NCCL the isend runs on NCCL's stream, which first waits for the current (training)
        # stream: the activations are complete when they go, and training never waits for the send.
        meta = header_meta(m, self.max_count)
        size = meta[12]
        if size <= self.expect:
            bufs, keep = zip(pack(m, meta, self.expect, self.dev))
        else:  # announce the size first, in the transfer the receiver has posted, then the message
            bufs, keep = zip(pack(Message(m.kind, m.epoch, m.step), meta, self.expect, self.dev),
                             pack(m, meta, size, self.dev))
        if m.x is not None:
            self.expect = size
        # Never touch (or free) a tensor before its isend completes: keep them until it has.
        works = [self.dev.isend(b, self.group, self.peer_in_group()) for b in bufs]
        self.transfers += len(works)
        self.bytes += sum(b.numel() for b in bufs)
        self.messages += 1
        if m.kind == Kind.TRAIN:
            self.train_bytes += sum(b.numel() for b in bufs)
            self.train_samples += m.count
        self.samples += m.count
        self.inflight.append((works, [*bufs, *keep]))
        while len(self.inflight) > self.max_inflight:
            self._wait_oldest()

    def flush(self) -> None:
        while self.inflight:
            self._wait_oldest()

    def abort(self, origin: int) -> None:
        """Best effort: tell downstream that rank `origin` failed, without waiting long for it."""
        try:
            self.timeout_s = min(5.0, self.timeout_s)
            self.inflight.clear()  # what was in flight no longer matters
            self.send(Message(Kind.ABORT, step=origin))
            self.flush()
        except Exception:  # noqa: BLE001 - the link may be the thing that broke
            pass

    def _wait_oldest(self) -> None:
        works, _ = self.inflight.pop(0)
        t0 = time.perf_counter()
        for w in works:
            self._await(w, "send to")
        self.blocked_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ receiving (receiver thread)
    def recv(self) -> Message:
        """The next message. Every call of the receiver runs on its own stream, so waiting on a receive
        never makes the training stream wait (Work.wait orders the *current* stream after NCCL's); the
        message's tensors are handed over by the event recorded here (Accel.hand_over)."""
        if self.stream is None:
            self.stream = self.dev.side_stream()
            self.header_host = self.dev.host_buffer(HEADER_LEN, torch.int64)
        with self.dev.on(self.stream):
            m = self._recv_message()
            m.ready = self.dev.event()
            m.ready.record(self.stream)
        return m

    def _post(self, size: int) -> None:
        buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        self.posted = (self.dev.irecv(buf, self.group, self.peer_in_group()), buf)
        self.transfers += 1

    def _take(self) -> tuple[torch.Tensor, list[int]]:
        if self.posted is None:
            self._post(self.expect)
        work, buf = self.posted
        self.posted = None
        self._await(work, "receive from")
        self.bytes += buf.numel()
        # into (pinned) host memory, waiting for the receiver's stream only, never the device
        return buf, self.dev.download(self.header_host, buf[:HEADER_BYTES].view(torch.int64), self.stream)

    def _recv_message(self) -> Message:
        buf, header = self._take()
        size = int(header[12])
        if size > len(buf):  # an announcement: the message follows, in a transfer of its size
            self._post(size)
            buf, header = self._take()
        kind = Kind(int(header[0]))
        if kind in BATCHES:
            self.expect = size
            self.samples += int(header[3])
            if kind == Kind.TRAIN:
                self.train_samples += int(header[3])
        self.messages += 1
        if kind not in (Kind.STOP, Kind.ABORT):  # more follows: let it land while we handle this one
            self._post(self.expect)
        return unpack(buf, header)

    # ------------------------------------------------------------------ helpers
    def peer_in_group(self) -> int:
        # two-rank groups hold (lower, higher) global ranks as group ranks 0 and 1
        return 0 if self.peer < dist.get_rank() else 1

    def _await(self, work, what: str) -> None:
        """Until `work` is done, or dist.timeout_s (Accel.wait, note [waiting on NCCL])."""
        try:
            self.dev.wait(work, self.timeout_s)
        except RuntimeError as e:
            raise PeerError(f"rank {dist.get_rank()}: {what} rank {self.peer} failed or timed out after "
                            f"{self.timeout_s:.0f}s (dist.timeout_s): {e}", self.peer) from e
