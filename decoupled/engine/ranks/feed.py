"""Where a downstream rank's messages come from, and in what order: the pipeline's feed
(pipeline.py), chosen once at setup (`setup_rank(..., feed=SyncFeed | AsyncFeed)`). The source
group reads the dataset instead (sources.py), in the order its feed class says.

SyncFeed: messages go into a FIFO of depth dist.max_inflight, consumed in source order; upstream
waits only when this rank is that far behind. Each batch is trained on once, in order, an epoch at
a time (`lockstep`), which together with per-block RNG streams (stage.py) and per-(seed, epoch)
batches (data.py) equals the single-process `simultaneous` trainer bit for bit.
AsyncFeed: train batches go into the replay buffer (replay.py), which the rank samples while the
thread fills it; every other message goes into the control queue, handled in order; an end-of-epoch
is ready once every batch of that epoch has been trained on or dropped.

Several upstream replicas (groups.py): batch b comes from replica b mod R of the upstream group,
so sync reads its links in the order that implies (the merged stream equals one upstream rank's);
a marker is handed on once, when every link has delivered it; async puts every link's batches in
the one replay buffer and merges the markers the same way.

Note [paced frozen stream]. Under replay.budget="steps" an upstream rank that has made its budget
streams on through its frozen blocks until every rank is done, only so that a slow rank trains on
fresh batches. Unpaced, it sent as fast as it could forward: on 2 cores the straggler's receiver took
in 3350 batches to evict 2715 of them, on the cores it needed for its own steps. Such batches are
marked `frozen`, and the receiver holds one back while the buffer has two batches never trained on:
the frozen stream then runs at the pace the rank trains, still fresh, and upstream (with nothing
left to train) waits on its sends instead. A rank's own training is never paced: that would make
upstream wait on a slow downstream, which async exists to prevent.
"""
from __future__ import annotations

import collections
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

from .budget import BUDGETS, OwnSteps, UpstreamEpochs
from .groups import join_tensors, next_index, split_sources
from .receiver import Receiver
from .replay import Entry, ReplayBuffer
from .transport import BATCHES, EVALUATIONS, Kind, Link, Message, PeerError

if TYPE_CHECKING:
    from ...config import DistConfig, ReplayConfig


def _nbytes(m: Message) -> int:
    return sum(t.numel() * t.element_size() for t in (m.x, m.y, m.ids, m.aux) if t is not None)


class SyncFeed(Receiver):
    # every batch once, in source order, an epoch at a time: a group's replicas close a fixed number of
    # rounds per epoch (padding the last) and checkpoint at the same step; no cascade hand-off (a cache
    # would not be bit for bit what the simultaneous trainer recomputes)
    lockstep = True

    def queued(self) -> list[Message]:
        """The received messages not yet handed to the pipeline (memory.pipeline_held counts them)."""
        return [m for q in self.inboxes for m in list(q.queue) if m is not None]

    @staticmethod
    def batch_index(step: int, source_steps: int) -> int:
        """What the replicas share a training batch by (groups.share): b of its source step epoch x S + b."""
        return step % source_steps

    @staticmethod
    def budget_for(replay: ReplayConfig) -> type[UpstreamEpochs] | type[OwnSteps]:
        return UpstreamEpochs  # each batch once, in order: a block's epoch is the stream's

    def __init__(self, links: list[Link], rank: int, dist: DistConfig, replay: ReplayConfig, seed: int,
                 share: tuple[int, int] = (0, 1), source_steps: int = 1, tap: Callable[[Message], None] | None = None):
        super().__init__(links, rank, dist, share, source_steps, tap)
        self.inboxes = [queue.Queue(maxsize=dist.max_inflight) for _ in links]  # one per link
        self.split = dist.replica_batch == "split"  # Note [split replicas]

    def _deliver(self, i: int, m: Message | None) -> None:
        self.inboxes[i].put(m)

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

    def __iter__(self) -> Iterator[Message]:
        """Every message in source order, until STOP: batch b of a phase (an epoch's training, an
        evaluation) from the link of upstream replica b mod R; a marker once every link has sent it."""
        self.start()
        replica, replicas = self.share
        cursor = 0  # the next batch index of the current phase this rank may take
        while True:
            index = next_index(cursor, replica, replicas)
            i = index % len(self.links)
            m = self._get(i)
            if m.kind == Kind.TRAIN and self.split:
                # every batch, from the same links (cursor stays 0: a phase's first link is the first of
                # split_sources, so a following evaluation is read from where its first batch comes)
                yield self._joined(i, m)
                continue
            if m.kind in BATCHES:
                cursor = (m.step % self.source_steps if m.kind == Kind.TRAIN else m.step) + 1
                yield m
                continue
            self._merge(i, m)
            # a phase ends: the next is an epoch's from its first batch, or after a mid-epoch evaluation
            # (END_EVAL's step: the source steps streamed) the rest of the epoch from where it stopped
            # (split replicas read every batch from the same links: no cursor)
            cursor = m.step % self.source_steps if m.kind == Kind.END_EVAL and not self.split else 0
            yield m
            if m.kind == Kind.STOP:
                return

    def _joined(self, i: int, m: Message) -> Message:
        """Note [split replicas]: this replica's rows of a training batch, joined in row order from the
        upstream replicas that hold them (link i's message `m` first)."""
        replica, replicas = self.share
        sources = split_sources(replica, len(self.links), replicas)
        assert sources[0] == i, (sources, i)
        pieces = [m] + [self._get(j) for j in sources[1:]]
        if len(pieces) == 1:
            return m
        for j, p in zip(sources, pieces):
            if (p.kind, p.step) != (Kind.TRAIN, m.step):
                raise PeerError(f"rank {self.rank}: upstream replicas out of step: training batch {m.step} from rank "
                                f"{self.links[i].peer}, {p.kind.name} {p.step} from rank {self.links[j].peer}")
            self.dev.hand_over(p.ready, p.x, p.y, p.ids)  # before the copy that joins them
            p.ready = None
        x, y, ids = join_tensors([(p.x, p.y, p.ids) for p in pieces])
        return Message(Kind.TRAIN, m.epoch, m.step, x, y, ids, frozen=m.frozen)

    def _merge(self, i: int, m: Message) -> None:
        """Link i's phase is over (marker `m`): so is every other link's; read their markers."""
        for j in range(len(self.links)):
            if j != i:
                other = self._get(j)
                if (other.kind, other.epoch) != (m.kind, m.epoch):
                    raise PeerError(f"rank {self.rank}: upstream replicas out of step: {m.kind.name} of epoch "
                                    f"{m.epoch} from rank {self.links[i].peer}, {other.kind.name} of epoch "
                                    f"{other.epoch} from rank {self.links[j].peer}")


class AsyncFeed(Receiver):
    lockstep = False  # replicas step together but end their epochs by their own buffers (replay.py)

    @staticmethod
    def batch_index(step: int, source_steps: int) -> int:
        """The global source step: replicas that step together then alternate across epoch ends (groups.py)."""
        return step

    @staticmethod
    def budget_for(replay: ReplayConfig) -> type[UpstreamEpochs] | type[OwnSteps]:
        return BUDGETS[replay.budget]

    def __init__(self, links: list[Link], rank: int, dist: DistConfig, replay: ReplayConfig, seed: int,
                 share: tuple[int, int] = (0, 1), source_steps: int = 1, tap: Callable[[Message], None] | None = None):
        super().__init__(links, rank, dist, share, source_steps, tap)
        r = replay
        self.buffer = ReplayBuffer(r.capacity, r.policy, r.max_reuse, seed=seed * 1000 + rank,
                                   capacity_mb=r.capacity_mb)
        # non-train messages in order, with at most replay.eval_buffer_mb of evaluation batches among
        # them: those carry activations, and a slow rank must not hold an unbounded test set's (beyond
        # it, back-pressure: the thread stops reading, upstream's isends wait). Within it, a slow rank
        # evaluates while upstream trains on (a smaller bound made upstream block through every
        # evaluation). Markers carry nothing and never block: an end-of-epoch waits for its epoch's
        # batches, and holding the thread on it would stop the arrivals that evict them.
        self.control: collections.deque = collections.deque()
        self.eval_bytes = 0  # held evaluation batches' bytes
        self.max_eval_bytes = int(r.eval_buffer_mb * 2**20)
        self.marks: collections.Counter = collections.Counter()  # marker key -> links that sent it
        self.newest: dict = {}  # marker key -> the newest epoch it came with
        self.ready = threading.Condition()  # notified on every arrival and every hand-out

    def queued(self) -> list[Message]:
        """The control messages (evaluation batches, markers) not yet handed to the pipeline; the
        replay buffer's batches are the pipeline's `buffer` (memory.pipeline_held counts both). Not the
        None a failed receiver thread leaves: check() raises its error at the next draw, and memory
        sampling in between must not hide it."""
        return [m for m in list(self.control) if m is not None]

    def start(self) -> None:
        # The receiver needs the GIL for a moment after every transfer; with the default 5 ms
        # switch interval a training thread that never waits would make upstream's sends stall.
        sys.setswitchinterval(0.0005)
        super().start()

    def __iter__(self) -> Iterator[Message]:
        """Control messages in order once they may be handled, else a batch drawn from the buffer
        (once handed over: a replay is not a transfer), else wait for an arrival."""
        self.start()
        while True:
            self.check()
            m = self.next_control()
            if m is not None:
                yield m
                continue
            e = self.buffer.pick()
            if e is not None:
                self.picked()  # a paced frozen stream may deliver its next batch
                self.dev.hand_over(e.ready, e.x, e.y, e.ids)
                e.ready = None
                yield Message(Kind.TRAIN, e.epoch, e.step, e.x, e.y, e.ids, fresh=e.uses == 1)
                continue
            self.wait()  # nothing to train on: idle until the receiver thread delivers

    def _deliver(self, i: int, m: Message | None) -> None:
        if m is not None and m.kind == Kind.TRAIN:
            if m.frozen:  # note [paced frozen stream]
                with self.ready:
                    self.ready.wait_for(lambda: self.buffer.unused() < 2)
            self.buffer.put(Entry(m.x, m.y, m.ids, m.epoch, m.step, ready=m.ready))
        else:
            with self.ready:
                if m is not None and m.kind in EVALUATIONS:
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
        """Whether marker `m` has now come from every link (it is handed on once, then, tagged with the
        newest epoch any link gave it). End-of-epoch markers count per epoch; a mid-epoch evaluation's
        per source step (its END_EVAL's step; 0 for the others); the last evaluation's and the stop per
        kind: replicated sources streaming on for a steps budget stop when the board says so, each in
        whatever epoch it has reached."""
        key = (m.kind, m.epoch) if m.kind == Kind.END_EPOCH else (m.kind, m.step)
        self.marks[key] += 1
        self.newest[key] = max(self.newest.get(key, m.epoch), m.epoch)
        if self.marks[key] < len(self.links):
            return False
        m.epoch = self.newest.pop(key)
        del self.marks[key]
        return True

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
            if m.kind in EVALUATIONS:
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
