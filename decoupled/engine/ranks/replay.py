"""The bounded replay buffer of Decoupled Greedy Learning (Belilovsky et al. 2020), one per rank.

Batches from upstream go in as they arrive; the rank trains by sampling it, so a fast rank keeps
stepping (re-using batches up to `max_reuse` times) instead of idling, and a slow rank never blocks
its upstream (when full, the oldest batch is evicted; unused evictions count as dropped).

Policies pick among entries that may still be used:
- fifo: the oldest of the least-used entries (fresh data in arrival order, then replays in order);
- random: uniformly at random among the least-used entries (seeded): fresh batches before replays,
  as the other policies, so a paced frozen stream (note [paced frozen stream]), which holds its next
  batch back while two are unused, is never starved by draws that miss the unused ones;
- priority-lifo: the newest of the least-used entries (freshest activations first), as in DGL's
  reference buffer (eugenium/DGL, buffer_experiments/cifar_buffer.py), with two documented
  differences: there, ties among the least used are broken by ring-buffer slot, which after the
  buffer wraps is not arrival order (here: always the newest), and its use counter starts at 1
  (a fresh batch has count 1; here 0 = never trained on).
max_reuse = 0 means unlimited reuse (the reference's default); a batch then leaves the buffer only
when a newer one evicts it.

Note [replay bound]. The buffer is bounded either by a count of batches (replay.capacity) or, with
replay.capacity_mb > 0, by bytes instead (replay.capacity may then not be set: modes.Async.check): it
holds as many of the newest batches as fit in capacity_mb MiB. A batch's bytes are the storages its
entry keeps alive (memory.storage_bytes: a received message's whole buffer, its activations in the
wire form of dist.wire_dtype), so an int8 wire holds about 4x the float32 wire's batches. A bound
below one training batch is refused at setup with the key named (engine/ranks/setup.py): the buffer
could hold nothing. A batch whose storage alone exceeds the bound anyway (the first one after an
evaluation arrives padded to the evaluation batch's transfer: note [one transfer per message]) is
held alone, evicting the rest, rather than failing a run that is already training.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ...memory import storage_bytes


@dataclass(eq=False)  # identity semantics: entries hold tensors, and list.remove must not compare them
class Entry:
    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor
    epoch: int  # upstream's epoch tag
    step: int  # upstream's step when it produced the batch
    seq: int = 0  # arrival order
    uses: int = 0
    ready: object = None  # the receiver stream's event (device.Accel.hand_over), until first used

    @property
    def nbytes(self) -> int:
        return storage_bytes((self.x, self.y, self.ids))  # note [replay bound]


@dataclass
class ReplayStats:
    received: int = 0
    dropped: int = 0  # evicted before ever being trained on
    evicted: int = 0
    samples: int = 0  # draws
    fresh_draws: int = 0  # draws of a batch never trained on before
    reuse_hist: dict = field(default_factory=dict)  # uses at eviction -> count
    occupancy_sum: int = 0
    occupancy_max: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0

    def as_dict(self) -> dict:
        n = max(self.samples, 1)
        return {"received": self.received, "dropped": self.dropped, "evicted": self.evicted,
                "draws": self.samples, "fresh_draws": self.fresh_draws,
                "replayed_draws": self.samples - self.fresh_draws,
                "reuse_at_eviction": {str(k): v for k, v in sorted(self.reuse_hist.items())},
                "occupancy_mean": self.occupancy_sum / n, "occupancy_max": self.occupancy_max,
                "staleness_mean": self.staleness_sum / n, "staleness_max": self.staleness_max}


class ReplayBuffer:
    """Thread-safe: the receiver thread puts, the training loop samples. It holds only the batches
    it replays; control messages and waiting belong to the async feed (feed.py)."""

    def __init__(self, capacity: int, policy: str, max_reuse: int, seed: int, capacity_mb: float = 0.0):
        self.capacity, self.policy, self.max_reuse = capacity, policy, max_reuse
        self.capacity_mb = capacity_mb
        self.max_bytes = int(capacity_mb * 2**20)  # 0: bounded by `capacity` batches (note [replay bound])
        self.bytes = 0  # the entries' bytes
        self.entries: list[Entry] = []
        self.g = torch.Generator().manual_seed(seed)
        self.lock = threading.Lock()
        self.stats = ReplayStats()
        self.latest_step = 0  # newest upstream step seen
        self.pending_by_epoch: dict[int, int] = {}  # entries of each epoch not yet used or dropped
        self._seq = 0

    def __len__(self) -> int:
        return len(self.entries)

    def _full(self, size: int) -> bool:
        """Whether a batch of `size` bytes must evict the oldest entry first."""
        if self.max_bytes:
            return self.bytes + size > self.max_bytes
        return len(self.entries) >= self.capacity

    def put(self, e: Entry) -> None:
        size = e.nbytes
        with self.lock:
            e.seq = self._seq
            self._seq += 1
            while self.entries and self._full(size):
                self._evict(min(self.entries, key=lambda x: x.seq))
            self.entries.append(e)
            self.bytes += size
            self.stats.received += 1
            self.latest_step = max(self.latest_step, e.step)
            self.pending_by_epoch[e.epoch] = self.pending_by_epoch.get(e.epoch, 0) + 1
            self.stats.occupancy_max = max(self.stats.occupancy_max, len(self.entries))

    def _evict(self, e: Entry) -> None:
        self.entries.remove(e)
        self.bytes -= e.nbytes
        self.stats.evicted += 1
        self.stats.reuse_hist[e.uses] = self.stats.reuse_hist.get(e.uses, 0) + 1
        if e.uses == 0:
            self.stats.dropped += 1
            self.pending_by_epoch[e.epoch] -= 1

    def pick(self) -> Entry | None:
        """Choose an entry by policy and count the draw; None when nothing may be used."""
        with self.lock:
            if not self.entries:
                return None
            least = min(e.uses for e in self.entries)
            cands = [e for e in self.entries if e.uses == least]
            if self.policy == "fifo":
                e = min(cands, key=lambda x: x.seq)
            elif self.policy == "priority-lifo":
                e = max(cands, key=lambda x: x.seq)
            else:
                e = cands[int(torch.randint(len(cands), (1,), generator=self.g))]
            if e.uses == 0:
                self.pending_by_epoch[e.epoch] -= 1
                self.stats.fresh_draws += 1
            e.uses += 1
            st = self.stats
            st.samples += 1
            st.occupancy_sum += len(self.entries)
            stale = self.latest_step - e.step
            st.staleness_sum += stale
            st.staleness_max = max(st.staleness_max, stale)
            if self.max_reuse and e.uses >= self.max_reuse:
                self._evict(e)
            return e

    def unused(self) -> int:
        """Entries never trained on yet."""
        with self.lock:
            return sum(e.uses == 0 for e in self.entries)

    def epoch_done(self, epoch: int) -> bool:
        """Every batch of `epoch` (and earlier) has been trained on at least once or dropped."""
        with self.lock:
            return all(n == 0 for ep, n in self.pending_by_epoch.items() if ep <= epoch)

    def clear(self) -> None:
        """Forget every entry (the cascade hand-off: upstream has stopped, the cache takes over)."""
        with self.lock:
            self.entries.clear()
            self.pending_by_epoch.clear()
            self.bytes = 0
