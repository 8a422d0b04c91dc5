"""The receiving end of a rank's upstream link: a thread that reads messages ahead of training.

sync:  messages go into a FIFO of depth dist.max_inflight, consumed in order; upstream waits only
       when this rank is that far behind.
async: train batches go into the replay buffer (replay.py), every other message into the control
       queue, handled in order; an end-of-epoch is ready once every batch of that epoch has been
       trained on or dropped.

The link's process group is used by this thread alone (the sender side of a link is another
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

from ...config import JobConfig
from .replay import Entry, ReplayBuffer
from .transport import Kind, Link, Message, PeerAbort, PeerError


class Receiver:
    def __init__(self, link: Link, rank: int, cfg: JobConfig, tap: Callable[[Message], None] | None = None):
        self.link, self.rank = link, rank
        self.timeout = cfg.dist.timeout_s
        self.is_async = cfg.train.mode == "async"
        self.tap = tap  # sees every data message first, on the receiver thread (the cascade hand-off cache)
        r = cfg.replay
        self.buffer = (ReplayBuffer(r.capacity, r.policy, r.max_reuse, seed=cfg.train.seed * 1000 + rank)
                       if self.is_async else None)
        self.inbox: queue.Queue = queue.Queue(maxsize=cfg.dist.max_inflight)  # sync
        # async: non-train messages in order, at most `max_control` evaluation batches among them:
        # those carry activations, and a slow rank must not hold the whole test set's (back-pressure
        # instead: the thread stops reading, upstream's isends wait, upstream blocks on
        # dist.max_inflight). Markers (end of epoch / evaluation, stop) carry nothing and never
        # block: an end-of-epoch waits for its epoch's batches, and holding the thread on it would
        # stop the arrivals that evict them, making upstream wait for a slow rank after all.
        self.control: collections.deque = collections.deque()
        self.max_control = cfg.dist.max_inflight
        self.ready = threading.Condition()  # async: notified on every arrival and every hand-out
        self.error: BaseException | None = None
        self.idle_s = 0.0  # the training thread's time waiting for input
        self.last_recv = time.perf_counter()

    def start(self) -> None:
        if self.is_async:
            # The receiver needs the GIL for a moment after every transfer; with the default 5 ms
            # switch interval a training thread that never waits would make upstream's sends stall.
            sys.setswitchinterval(0.0005)
        threading.Thread(target=self._receive, name=f"recv-from-{self.rank - 1}", daemon=True).start()

    def _receive(self) -> None:
        try:
            while True:
                m = self.link.recv()
                self.last_recv = time.perf_counter()
                if m.kind == Kind.ABORT:
                    raise PeerAbort(m.step, self.rank)
                if self.tap is not None and m.kind in (Kind.TRAIN, Kind.EVAL):
                    self.tap(m)
                self._deliver(m)
                if m.kind == Kind.STOP:
                    return
        except BaseException as e:  # noqa: BLE001 - surfaced on the training thread by check()
            self.error = e
            self._deliver(None)

    def _deliver(self, m: Message | None) -> None:
        if not self.is_async:
            self.inbox.put(m)
            return
        if m is not None and m.kind == Kind.TRAIN:
            self.buffer.put(Entry(m.x, m.y, m.ids, m.epoch, m.step, ready=m.ready))
        else:
            with self.ready:
                if m is not None and m.kind == Kind.EVAL:
                    self.ready.wait_for(lambda: sum(c is not None and c.kind == Kind.EVAL
                                                    for c in self.control) < self.max_control)
                self.control.append(m)
        with self.ready:
            self.ready.notify_all()

    def check(self) -> None:
        """Raise what went wrong on the receiver thread, if anything."""
        if isinstance(self.error, PeerError):
            raise self.error
        if self.error is not None:
            raise PeerError(str(self.error)) from self.error

    def _silent(self) -> PeerError:
        return PeerError(f"rank {self.rank}: nothing from rank {self.rank - 1} for {self.timeout:.0f}s "
                         "(dist.timeout_s); it is hung or dead")

    # ------------------------------------------------------------------ sync
    def messages(self) -> Iterator[Message]:
        """Every message in arrival order, until STOP."""
        while True:
            t0 = time.perf_counter()
            try:
                m = self.inbox.get(timeout=self.timeout)
            except queue.Empty:
                raise self._silent() from None
            self.idle_s += time.perf_counter() - t0
            if m is None:
                self.check()
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
                return None  # the thread died; check() raises next round
            if m.kind == Kind.END_EPOCH and not self.buffer.epoch_done(m.epoch):
                return None
            self.ready.notify_all()  # room in the control queue: the thread may read on
            return self.control.popleft()

    def wait(self, poll_s: float = 1.0) -> None:
        """Nothing to train on: wait for an arrival (idle time, not communication). Raises when
        upstream has been silent for dist.timeout_s."""
        t0 = time.perf_counter()
        with self.ready:
            self.ready.wait_for(lambda: self.buffer.entries or self.control, timeout=poll_s)
        self.idle_s += time.perf_counter() - t0
        if not (self.buffer.entries or self.control) and time.perf_counter() - self.last_recv > self.timeout:
            raise self._silent()
