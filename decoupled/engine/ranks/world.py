"""The world of a distributed run: process groups (one two-rank group per link between the ranks of
neighbouring stage groups, one group per replicated stage group for its all-reduces), and the
object collectives that start-up and the end-of-run report use.

Backend auto: NCCL with device cuda:(LOCAL_RANK mod visible GPUs) when CUDA is available, gloo on CPU. Object
collectives (metadata, errors, the summary) always go over a gloo group, so they work and time out
the same way whatever carries the activations.

Note [NCCL communicators]. Every process group is an NCCL communicator: one per link (two ranks) and
one per replicated stage group. A rank drives several at once: its receiver threads keep an irecv
posted on each upstream link while its training thread sends downstream and all-reduces with its
replicas. NCCL's guide warns that operations on several communicators can deadlock unless every rank
issues them in one order, "at different epochs with a locking mechanism" (Using multiple NCCL
communicators concurrently). Async has no global order across ranks by design, so what holds is an
order *per communicator*:
- NCCL pairs the calls of a communicator by their order alone ("Rank peer needs to call ncclRecv with
  the same datatype and the same count", nccl.h ncclSend). So each communicator's kernels pair up
  whatever the others do, provided:
  R1 each group is driven by one thread, for its whole life (a link: the sender's training thread and
     the receiver's thread for it; a replica group: the training threads);
  R2 both ends issue the same sequence of calls and sizes (note [one transfer per message]: markers,
     announcements and padding included; replicas: the same all-reduces, padded rounds in sync).
- Not batch_isend_irecv: it fuses the calls of one communicator, which nccl.h asks for when sends and
  receives must progress together (a pair sending both ways); every link here is one-way, and the
  calls that must progress together are on different communicators and threads. Not fewer
  communicators: torch runs a group's point-to-point calls on its one NCCL stream, so a posted irecv
  would hold back every later isend on it, and only a global order would avoid the wait.
NCCL adds three more kinds of wait, each kept out of a cycle:
- host: the first call on a communicator connects it and blocks until the peer makes its own (NCCL
  connects point-to-point peers "upon the first exchange", and NCCL_RUNTIME_CONNECT defers collective
  connections the same way), inside the issue lock. R3: `World.warm_up` makes every group's first
  call on the main thread, in one order on every rank, before any receiver thread starts. After it,
  host waits poll one work's completion (note [waiting on NCCL]) and synchronize one stream or event.
- stream: isend/irecv run on the group's NCCL stream after the issuing thread's current stream, and
  the all-reduce on the training stream: edges in each thread's own program order.
- device: a posted irecv occupies the GPU until upstream sends. Anything that waits for the whole
  device then waits for upstream too: torch.cuda.synchronize(), and the caching allocator's cudaFree
  (empty_cache, its retry after an out-of-memory, garbage_collection_threshold). R4: no device-wide
  wait while a receive may be posted; the engine synchronizes the device only at the end of training
  (STOP: nothing posted) and never empties the cache; leave memory headroom, since an allocation
  retry would hang rather than fail. CUDA promises no forward progress between streams (NVIDIA/nccl
  #574, #783): the design relies on a few small NCCL kernels being co-resident, which holds for one
  GPU per rank with a handful of communicators (R5: keep NCCL groups and side streams per device
  under torch's pool of 32 streams; never set CUDA_DEVICE_MAX_CONNECTIONS=1).
The checked host (note [checked host], device.py) asserts R1, R3 and R4 on the CPU suite: a group
used before its warm-up, a group driven from two threads, or a device-wide synchronize while a
receive is posted is an error. R2 is what every sync == simultaneous test exercises.
Sources: NCCL user guide, docs.nvidia.com/deeplearning/nccl/user-guide/docs/usage/communicators.html
and .../threadsafety.html; NVIDIA/nccl src/nccl.h.in (ncclSend, ncclGroupStart), src/group.cc
(ncclP2PPreconnectFunc), src/init.cc (NCCL_RUNTIME_CONNECT) at 5067397c; NVIDIA/nccl issues #195,
#574, #744, #781, #783, #1174; torch 2.14.1: c10d ProcessGroupNCCL.cpp (pointToPoint, collective,
WorkNCCL::wait), ProcessGroupNCCL.hpp (ncclStreams_), distributed_c10d.py (_new_process_group_helper,
eager_connect_single_device), c10/cuda/CUDAStream.cpp (kStreamsPerPool = 32),
c10/cuda/CUDACachingAllocator.cpp (release_cached_blocks); CUDA C++ Programming Guide, "Implicit
Synchronization".
"""
from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ...job import ConfigError, JobConfig
from ...device import accel, cuda_available, local_cuda_index
from .transport import PeerError


PATIENT_TIMEOUT = timedelta(days=365)


@dataclass
class World:
    rank: int
    size: int
    backend: str
    device: torch.device
    ctrl: object  # gloo group for object collectives
    patient: object = None  # gloo group for waits on a peer's work, not its liveness: no deadline (see init)
    board: "BudgetBoard | None" = None  # which ranks have spent their step budgets (replay.budget="steps")
    timeout: timedelta = timedelta(seconds=300)
    # after connect(): this rank's links by peer rank, in replica order, and its stage group's group
    recv_groups: dict = None
    send_groups: dict = None
    replica_group: object = None

    def connect(self, layout) -> None:
        """Every group the layout needs, created by every rank in the same order (torch requires it),
        then warmed in that order, before any receiver thread starts (note [NCCL communicators], R3)."""
        self.recv_groups, self.send_groups = {}, {}
        order = []  # (group, ranks, is a link): every rank's list, the same on every rank
        for g in range(1, len(layout.replicas)):
            for up in layout.ranks(g - 1):
                for down in layout.ranks(g):
                    group = dist.new_group([up, down], timeout=self.timeout)
                    order.append((group, [up, down], True))
                    if self.rank == down:
                        self.recv_groups[up] = group
                    if self.rank == up:
                        self.send_groups[down] = group
        for g, r in enumerate(layout.replicas):
            if r > 1:  # the backend of the job: NCCL all-reduces the gradients on GPU
                group = dist.new_group(layout.ranks(g), timeout=self.timeout)
                order.append((group, layout.ranks(g), False))
                if self.rank in layout.ranks(g):
                    self.replica_group = group
        self.warm_up(order)

    def warm_up(self, order: list) -> None:
        """Note [NCCL communicators], R3: the first call on an NCCL communicator connects it to its
        peers and blocks the host until they make theirs. Made here, one exchange per group, in one
        order on every rank (blocking pairs in a common order cannot wait in a cycle), on the main
        thread, before the receiver threads start; afterwards no first call can block inside the
        issue lock while another thread's call waits on a peer. A link: one small send and receive
        (both ends, so the link's own sequence stays the same at both ends); a replica group: one
        all-reduce."""
        dev = accel(self.device)
        for group, ranks, link in order:
            if self.rank not in ranks:
                continue
            t = torch.zeros(1, device=self.device)
            if link:
                up, down = ranks
                peer = 1 if self.rank == up else 0  # group ranks: (lower, higher) global ranks
                if self.rank == up:
                    dev.wait(dev.warm(dist.isend, t, group, peer), self.timeout.total_seconds())
                else:
                    dev.wait(dev.warm(dist.irecv, t, group, peer), self.timeout.total_seconds())
            else:
                dev.wait(dev.warm(dist.all_reduce, t, group, None), self.timeout.total_seconds())


class BudgetBoard:
    """replay.budget="steps": a source keeps streaming until every rank has made its budget of
    optimizer steps. Ranks count themselves in on the job's store (one key, atomic adds); the sources
    read the count, at most every `poll_s` (a store round trip, on the host)."""

    KEY = "budget-done"

    def __init__(self, store, size: int, poll_s: float = 0.05):
        self.store, self.size, self.poll_s = store, size, poll_s
        self.marked = False
        self._done, self._asked = False, -float("inf")

    def mark_done(self) -> None:
        if not self.marked:
            self.marked = True
            self.store.add(self.KEY, 1)

    def all_done(self) -> bool:
        now = time.monotonic()
        if not self._done and now - self._asked >= self.poll_s:
            self._asked = now
            self._done = self.store.add(self.KEY, 0) >= self.size
        return self._done


def resolve_backend(cfg: JobConfig) -> tuple[str, torch.device]:
    backend = cfg.dist.backend
    cuda = cuda_available() and cfg.train.device != "cpu"
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl":
        if not cuda_available():
            raise ConfigError("dist.backend='nccl' needs CUDA, which is not available; "
                              "use dist.backend='gloo' or 'auto'")
        if cfg.train.device == "cpu":
            raise ConfigError("dist.backend='nccl' cannot carry train.device='cpu' tensors; use dist.backend='gloo'")
        return backend, torch.device("cuda", local_cuda_index())
    if cfg.dist.sync_bn:
        raise ConfigError("dist.sync_bn=true needs CUDA (torch's SyncBatchNorm runs on GPU only); on CPU leave it "
                          "false: each replica normalises its own batch and the running statistics are averaged")
    if cfg.train.device == "cuda":
        if not cuda_available():
            raise ConfigError("train.device='cuda' but no CUDA device is visible; use 'cpu' or 'auto'")
        raise ConfigError("train.device='cuda' with dist.backend='gloo' is not supported; use dist.backend='nccl' "
                          "(or 'auto')")
    return backend, torch.device("cpu")


# What ProcessGroupNCCL reads when it is created, unless the user set it (nccl_env_defaults).
NCCL_ENV_DEFAULTS = {
    # a failed or timed-out collective tears the process down instead of hanging it
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # No flight-recorder dump signal on a timeout: the watchdog writes it (key "exception_dump") to the
    # store *beneath* our per-attempt prefix (ProcessGroupNCCL's globalStore_ unwraps PrefixStores),
    # torchrun keeps that store across restarts, and every later attempt's heartbeat monitor would
    # see the key, dump, wait TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC and abort: restarts after an NCCL
    # timeout would die minutes in. (Set it to 1 to get the dumps, with TORCH_NCCL_TRACE_BUFFER_SIZE.)
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
    # how long the watchdog waits for a dump before it aborts the process (torch: 15-60 s, by
    # version): our error is reported already, so a process that failed exits promptly
    "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "1000",
}


def nccl_env_defaults() -> None:
    """Our NCCL settings, each unless the environment has it; before the first NCCL process group."""
    for name, value in NCCL_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def start_process_group(cfg: JobConfig):
    """The one start-up of a torchrun worker (the engine's ranks and every bench worker): the backend
    and device (resolve_backend), our NCCL defaults before the first NCCL group, this thread bound to
    its device, and the default process group, created eagerly on that device (`device_id`: NCCL
    connects at once, not at the first collective). Returns (backend, device, store)."""
    backend, device = resolve_backend(cfg)
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    if backend == "nccl":
        nccl_env_defaults()
    dev = accel(device)
    dev.bind()
    if "WORLD_SIZE" in os.environ:  # launched by torchrun (env:// rendezvous)
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun shares one TCP store across restarts (--max-restarts): keys of the failed attempt
        # (e.g. the addresses of our per-link groups) would be read back by the new one and gloo
        # would connect to dead peers. A per-attempt prefix keeps attempts apart, so restarts work
        # without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
        store = dist.PrefixStore(f"decoupled/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout,
                                device_id=dev.process_group_device())
    else:  # plain `decoupled train` with mode sync/async: a world of one, no network
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    return backend, device, store


def init(cfg: JobConfig) -> World:
    backend, device, store = start_process_group(cfg)
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    rank, size = dist.get_rank(), dist.get_world_size()
    ctrl = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    # Waits on a peer's *work* rather than its liveness: rank 0 loading a large dataset, every rank
    # building and dry-running its blocks (start-up agreements), and the end-of-run report, where a
    # rank whose blocks froze early (async cascade) finishes hours before the last one. None of
    # these can have a deadline that fits every job. Liveness is not this group's job: a rank that
    # dies is seen by torchrun, which ends the whole job; once training runs, a dead or hung peer
    # fails its neighbours' links within dist.timeout_s.
    patient = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
    return World(rank, size, backend, device, ctrl, patient, BudgetBoard(store, size), timeout)


def broadcast_from_0(obj, world: World, group=None):
    """Rank 0's object (or the ConfigError it raised) on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group or world.ctrl)
    if isinstance(box[0], ConfigError):
        raise ConfigError(str(box[0]))
    return box[0]


def gather_to_0(obj, world: World, group=None) -> list | None:
    out = [None] * world.size if world.rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=group or world.ctrl)
    return out


def all_gather(obj, world: World) -> list:
    """Every rank's object: the start-up agreements, on the deadline-free group."""
    out = [None] * world.size
    dist.all_gather_object(out, obj, group=world.patient)
    return out


def shutdown() -> None:
    """Note [teardown]: a worker frees what holds the process group (a DDP reducer, FSDP's state, a
    pipeline stage: their in-flight works and futures keep tensors and Python callbacks) while the
    interpreter is alive, then destroys the group. Left to interpreter finalization, gloo's threads can
    drop a work that re-acquires the GIL, and the process aborts ("terminate called without an active
    exception", SIGABRT) after writing its results: seen once in CI on the bench's ddp worker. Callers
    let those objects go out of scope first (a function that returns only plain data); the collection
    here breaks their reference cycles."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


class Verdict:
    payload = None  # what this rank contributes when the phase succeeds
    all: list | None = None  # every rank's payload, after the phase


@contextmanager
def agreement(world: World, phase: str):
    """Run a start-up phase on every rank, then exchange verdicts: if any rank failed, every rank
    raises (the failing one its own error, the others an error naming it). Nobody is left waiting
    for a peer that died in set-up, and nobody starts training unless all can."""
    v, err = Verdict(), None
    try:
        yield v
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
        err = e
    statuses = all_gather((None if err is None else (type(err).__name__, str(err)), v.payload), world)
    v.all = [payload for _, payload in statuses]
    if err is not None:
        raise err
    bad = [(r, st) for r, (st, _) in enumerate(statuses) if st is not None]
    if bad:
        r, (kind, msg) = bad[0]
        cls = ConfigError if kind == "ConfigError" else PeerError
        raise cls(f"{phase} failed on rank {r}: {msg}")
