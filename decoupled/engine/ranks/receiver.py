"""The receiving end of a rank's upstream links (one per replica of the upstream stage group): a
thread per link reads messages ahead of training and delivers each to the rank's feed, whose
protocol (feed.py: the sync FIFO, or the async replay buffer + control queue) says where it goes.

A link's process group is used by its thread alone (the sender side of a link is another
group), so no process group is ever driven from two threads at once. A failure on the thread is
kept and raised on the training thread by `check`.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable

from ...device import accel
from .transport import BATCHES, Kind, Link, Message, PeerAbort, PeerError

if TYPE_CHECKING:
    from ...config import DistConfig


class Receiver:
    """The reader threads; a subclass (a feed) delivers what they read (`_deliver`) and hands it to
    the training thread in its own order."""

    buffer = None  # the async feed's replay buffer

    def __init__(self, links: list[Link], rank: int, dist: DistConfig, share: tuple[int, int] = (0, 1),
                 source_steps: int = 1, tap: Callable[[Message], None] | None = None):
        self.links, self.rank = links, rank
        self.dev = accel(links[0].device)  # the links' device: one per rank
        self.share, self.source_steps = share, source_steps  # (replica, replicas) of this rank's group
        self.timeout = dist.timeout_s
        self.tap = tap  # sees every data message first, on the receiver thread (the cascade hand-off cache)
        self.error: BaseException | None = None
        self.idle_s = 0.0  # the training thread's time waiting for input
        self.last_recv = time.perf_counter()

    def start(self) -> None:
        for i, link in enumerate(self.links):
            threading.Thread(target=self._receive, args=(i,), name=f"recv-from-{link.peer}", daemon=True).start()

    def _receive(self, i: int) -> None:
        try:
            # the link's device is this thread's current device: a new thread starts on cuda:0, and
            # leaving a stream context restores that device's stream through cudaSetDevice, which since
            # CUDA 12 creates a context (hundreds of MB) on GPU 0 for every receiver thread of every rank
            self.dev.bind()
            while True:
                m = self.links[i].recv()
                self.last_recv = time.perf_counter()
                if m.kind == Kind.ABORT:
                    raise PeerAbort(m.step, self.rank)
                if self.tap is not None and m.kind in BATCHES:
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
        self.dev.hand_over(m.ready, m.x, m.y, m.ids, m.aux)
        self.tap(m)

    def _deliver(self, i: int, m: Message | None) -> None:
        """Link i's message (None: its thread failed, `check` says how), on that link's thread."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise what went wrong on a receiver thread, if anything."""
        if isinstance(self.error, PeerError):
            raise self.error
        if self.error is not None:
            raise PeerError(str(self.error)) from self.error

    def _silent(self, who: str) -> PeerError:
        return PeerError(f"rank {self.rank}: nothing from {who} for {self.timeout:.0f}s "
                         "(dist.timeout_s); it is hung or dead")
