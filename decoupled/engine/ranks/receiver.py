"""The receiving end of a rank's upstream links (one per replica of the upstream stage group): a
thread per link that reads messages ahead of training.

sync:  messages go into a FIFO of depth dist.max_inflight, consumed in order; upstream waits only
       when this rank is that far behind.
async: train batches go into the replay buffer (replay.py), every other message into the control
       queue, handled in order; an end-of-epoch is ready once every batch of that epoch has been
       trained on or dropped.

Note [paced frozen stream]. Under replay.budget="steps" an upstream rank that has made its budget
streams on through its frozen blocks until every rank is done, only so that a slow rank trains on
fresh batches. Unpaced, it sent as fast as it could forward: on 2 cores the straggler's receiver took
in 3350 batches to evict 2715 of them, on the cores it needed for its own steps. Such batches are
marked `frozen`, and the receiver holds one back while the buffer has two batches never trained on:
the frozen stream then runs at the pace the rank trains, still fresh, and upstream (with nothing
left to train) waits on its sends instead. A rank's own training is never paced: that would make
upstream wait on a slow downstream, which async exists to prevent.

Several upstream replicas (groups.py): batch b comes from replica b mod R of the upstream group,
so sync reads its links in the order that implies (the merged stream equals one upstream rank's);
a marker is handed on once, when every link has delivered it; async puts every link's batches in
the one replay buffer and merges the markers the same way.

A link's process group is used by its thread alone (the sender side of a link is another
group), so no process group is ever driven from two threads at once. A failure on the thread is
kept and raised on the training thread by `check`.
"""
from __future__ import annotations

import collections
import queue
import sys
import threading
import time
from typing import Callable, Iterator

import torch

from ...config import JobConfig
from .groups import next_index
from .replay import Entry, ReplayBuffer
from .transport import Kind, Link, Message, PeerAbort, PeerError, handover


def _nbytes(m: Message) -> int:
    return sum(t.numel() * t.element_size() for t in (m.x, m.y, m.ids, m.aux) if t is not None)


def _use_device(device: torch.device) -> None:
    """Make the link's device this thread's current device. A new thread starts on cuda:0, and leaving
    a `torch.cuda.stream` context restores that device's stream through cudaSetDevice, which since
    CUDA 12 creates a context (hundreds of MB) on GPU 0 for every receiver thread of every rank."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


class Receiver:
    def __init__(self, links: list[Link], rank: int, cfg: JobConfig, share: tuple[int, int] = (0, 1),
                 source_steps: int = 1, tap: Callable[[Message], None] | None = None):
        self.links, self.rank = links, rank
        self.share, self.source_steps = share, source_steps  # (replica, replicas) of this rank's group
        self.timeout = cfg.dist.timeout_s
        self.is_async = cfg.train.mode == "async"
        self.tap = tap  # sees every data message first, on the receiver thread (the cascade hand-off cache)
        r = cfg.replay
        self.buffer = (ReplayBuffer(r.capacity, r.policy, r.max_reuse, seed=cfg.train.seed * 1000 + rank)
                       if self.is_async else None)
        self.inboxes = [queue.Queue(maxsize=cfg.dist.max_inflight) for _ in links]  # sync, one per link
        # async: non-train messages in order, with at most replay.eval_buffer_mb of evaluation batches
        # among them: those carry activations, and a slow rank must not hold an unbounded test set's
        # (beyond it, back-pressure: the thread stops reading, upstream's isends wait). Within it, a
        # slow rank evaluates while upstream trains on (a smaller bound made upstream block through
        # every evaluation). Markers carry nothing and never block: an end-of-epoch waits for its
        # epoch's batches, and holding the thread on it would stop the arrivals that evict them.
        self.control: collections.deque = collections.deque()
        self.eval_bytes = 0  # held evaluation batches' bytes
        self.max_eval_bytes = int(r.eval_buffer_mb * 2**20)
        self.marks: collections.Counter = collections.Counter()  # async: marker key -> links that sent it
        self.newest: dict = {}  # async: marker key -> the newest epoch it came with
        self.ready = threading.Condition()  # async: notified on every arrival and every hand-out
        self.error: BaseException | None = None
        self.idle_s = 0.0  # the training thread's time waiting for input
        self.last_recv = time.perf_counter()

    def start(self) -> None:
        if self.is_async:
            # The receiver needs the GIL for a moment after every transfer; with the default 5 ms
            # switch interval a training thread that never waits would make upstream's sends stall.
            sys.setswitchinterval(0.0005)
        for i, link in enumerate(self.links):
            threading.Thread(target=self._receive, args=(i,), name=f"recv-from-{link.peer}", daemon=True).start()

    def _receive(self, i: int) -> None:
        try:
            _use_device(self.links[i].device)
            while True:
                m = self.links[i].recv()
                self.last_recv = time.perf_counter()
                if m.kind == Kind.ABORT:
                    raise PeerAbort(m.step, self.rank)
                if self.tap is not None and m.kind in (Kind.TRAIN, Kind.EVAL):
                    self._tap(m)
                self._deliver(i, m)
                if m.kind == Kind.STOP:
                    return
        except BaseException as e:  # noqa: BLE001 - surfaced on the training thread by check()
            self.error = e
            self._deliver(i, None)

    def _tap(self, m: Message) -> None:
        """The tap reads the message on this thread's current stream (the device's default stream,
        which training uses too): hand the tensors over to it first. Without that it could read them
        before the transfer lands, and the caching allocator, which knows only the link's side stream,
        could give their block to the next irecv while the tap's copies are still queued."""
        handover(m.ready, m.x, m.y, m.ids, m.aux)
        self.tap(m)

    def _deliver(self, i: int, m: Message | None) -> None:
        if not self.is_async:
            self.inboxes[i].put(m)
            return
        if m is not None and m.kind == Kind.TRAIN:
            if m.frozen:  # note [paced frozen stream]
                with self.ready:
                    self.ready.wait_for(lambda: self.buffer.unused() < 2)
            self.buffer.put(Entry(m.x, m.y, m.ids, m.epoch, m.step, ready=m.ready))
        else:
            with self.ready:
                if m is not None and m.kind == Kind.EVAL:
                    size = _nbytes(m)
                    self.ready.wait_for(lambda: self.eval_bytes == 0 or self.eval_bytes + size <= self.max_eval_bytes)
                    self.eval_bytes += size
                    self.control.append(m)
                elif m is None or self._merged(m):
                    self.control.append(m)
        with self.ready:
            self.ready.notify_all()

    def picked(self) -> None:
        """The training thread drew a batch (a paced frozen stream waits for that)."""
        with self.ready:
            self.ready.notify_all()

    def _merged(self, m: Message) -> bool:
        """async: whether marker `m` has now come from every link (it is handed on once, then, tagged
        with the newest epoch any link gave it). End-of-epoch markers count per epoch; the last
        evaluation's and the stop per kind: replicated sources streaming on for a steps budget stop
        when the board says so, each in whatever epoch it has reached."""
        key = (m.kind, m.epoch) if m.kind == Kind.END_EPOCH else (m.kind,)
        self.marks[key] += 1
        self.newest[key] = max(self.newest.get(key, m.epoch), m.epoch)
        if self.marks[key] < len(self.links):
            return False
        m.epoch = self.newest.pop(key)
        del self.marks[key]
        return True

    def check(self) -> None:
        """Raise what went wrong on a receiver thread, if anything."""
        if isinstance(self.error, PeerError):
            raise self.error
        if self.error is not None:
            raise PeerError(str(self.error)) from self.error

    def _silent(self, who: str) -> PeerError:
        return PeerError(f"rank {self.rank}: nothing from {who} for {self.timeout:.0f}s "
                         "(dist.timeout_s); it is hung or dead")

    # ------------------------------------------------------------------ sync
    def _get(self, i: int) -> Message:
        """Link i's next message. Waits in short slices: a failure on another link's thread is raised
        at once rather than after this link's silence reaches dist.timeout_s."""
        t0 = time.perf_counter()
        while True:
            try:
                m = self.inboxes[i].get(timeout=min(1.0, self.timeout))
                break
            except queue.Empty:
                self.check()
                if time.perf_counter() - t0 > self.timeout:
                    raise self._silent(f"rank {self.links[i].peer}") from None
        self.idle_s += time.perf_counter() - t0
        if m is None:
            self.check()
        return m

    def messages(self) -> Iterator[Message]:
        """Every message in source order, until STOP: batch b of a phase (an epoch's training, an
        evaluation) from the link of upstream replica b mod R; a marker once every link has sent it."""
        replica, replicas = self.share
        cursor = 0  # the next batch index of the current phase this rank may take
        while True:
            index = next_index(cursor, replica, replicas)
            i = index % len(self.links)
            m = self._get(i)
            if m.kind in (Kind.TRAIN, Kind.EVAL):
                cursor = (m.step % self.source_steps if m.kind == Kind.TRAIN else m.step) + 1
                yield m
                continue
            for j in range(len(self.links)):  # that link's phase is over: so is every other's
                if j != i:
                    other = self._get(j)
                    if (other.kind, other.epoch) != (m.kind, m.epoch):
                        raise PeerError(f"rank {self.rank}: upstream replicas out of step: {m.kind.name} of epoch "
                                        f"{m.epoch} from rank {self.links[i].peer}, {other.kind.name} of epoch "
                                        f"{other.epoch} from rank {self.links[j].peer}")
            cursor = 0
            yield m
            if m.kind == Kind.STOP:
                return

    # ------------------------------------------------------------------ async
    def next_control(self) -> Message | None:
        """The oldest control message, once it may be handled (an end-of-epoch waits for its epoch's
        batches); else None."""
        with self.ready:
            if not self.control:
                return None
            m = self.control[0]
            if m is None:
                return None  # a thread died; check() raises next round
            if m.kind == Kind.END_EPOCH and not self.buffer.epoch_done(m.epoch):
                return None
            self.ready.notify_all()  # room in the control queue: the threads may read on
            if m.kind == Kind.EVAL:
                self.eval_bytes -= _nbytes(m)
            return self.control.popleft()

    def wait(self, poll_s: float = 1.0) -> None:
        """Nothing to train on: wait for an arrival (idle time, not communication). Raises when
        upstream has been silent for dist.timeout_s."""
        t0 = time.perf_counter()
        with self.ready:
            self.ready.wait_for(lambda: self.buffer.entries or self.control, timeout=poll_s)
        self.idle_s += time.perf_counter() - t0
        if not (self.buffer.entries or self.control) and time.perf_counter() - self.last_recv > self.timeout:
            raise self._silent(" or ".join(f"rank {link.peer}" for link in self.links))
