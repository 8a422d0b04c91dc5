"""Exact training memory of one process: the bytes its tensors hold, counted, not read off the heap.

On CPU the process peak (metrics.PeakMemory, VmHWM) is mostly glibc's heap, not the blocks. This
counts what training holds, per component, while a training loop runs inside `ExactMemory`:

  params_bytes       every parameter given (each storage once; FSDP: the local shard)
  grads_bytes        the gradients of every parameter an optimizer steps, read right after each
                     step (each storage once: DDP's bucket views count their bucket), summed over
                     the process's optimizers, peak over steps
  optimizer_bytes    every tensor in the optimizers' state after each step (momentum, Adam's moments),
                     summed over optimizers, peak over steps
  activations_bytes  what autograd saves for backward (`saved_tensors_hooks`): parameters excluded,
                     each storage once, counted from the moment it is saved until the graph that
                     holds it is freed: the peak of the live total over the whole loop
  held_bytes         the storages of the tensors the caller's `held` callable returns (a rank's
                     transport and replay buffers), sampled after every optimizer step and wherever
                     the caller samples (`sample_held`: a decoupled rank at every message, so its
                     evaluation batches and the forwards of a rank whose budget is made count too),
                     peak over samples. A storage held at the last sample is not counted again when
                     autograd saves it (an async rank's drawn batch, which stays in the replay buffer
                     and which its first layer saves): it is held, once
  allreduce_bytes    the flat copy an all-reduce sends: a replica's gradients (stepping.AllReduce: every
                     gradient, the float buffers, a flag per parameter and the sample count), alive
                     through the optimizer step after it (`count_comm`), or the bench's localsgd
                     row's parameters, alive beside them while torch's model averager all-reduces
                     them (`rebound`); peak over steps; only where such an all-reduce ran
  comm_state_bytes   the communication state the caller's `comm_state` callable returns, kept across
                     steps (the bench's ddp-powersgd row: PowerSGD's error feedback, a gradient's
                     size, and its P and Q matrices), each storage once, sampled after every
                     optimizer step, peak; only where there is some
  total_bytes        the sum of these peaks (an upper bound of their joint peak: the components
                     peak at different moments of a step)

On CUDA also `cuda_max_allocated_bytes`: the allocator's peak of the training phases above what was
allocated when training started, read once at the end from the process meter (`allocator_peak`:
metrics.PeakMemory restarts the peak where evaluation and training meet and keeps training's apart,
so no step pays for a `memory_stats` read). Evaluation under no_grad saves nothing
and steps no optimizer, so the other figures are the training steps' alone; held_bytes is sampled at
evaluation batches too (a rank's queued and in-flight evaluation batches are held).

FSDP (bench/dataparallel.py): parameters, gradients and optimizer state are the local shards; the
unsharded parameters FSDP all-gathers around each block and the unsharded gradients it reduce-scatters
are not counted (the gathered parameters are parameters, which the activation count leaves out), so an
FSDP row's total is a lower bound (bench.md marks it "≥").

Note [checkpointed activations]: torch.utils.checkpoint (non-reentrant) saves each checkpointed
block's inputs through the hooks outside it, so they are counted, and installs its own hooks inside
the block, which win: what the forward would have saved there is not kept (rightly not counted).
What it does not show any hook is the recomputation in backward: while one block's backward runs,
its recomputed activations are alive. For e2e-checkpoint activations_bytes is what is kept across
the step (the blocks' inputs, the head and the loss), a lower bound of the true peak by at most one
block's activations (the largest block's; the e2e row's activations_bytes bounds their sum). Measured
on a 3-block VGG on digits (batch 64): 134 KB kept with checkpointing, 1283 KB saved without.
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from .device import accel


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(key, bytes) of a tensor's storage: views of one storage share a key."""
    s = _local(t).untyped_storage()
    return s.data_ptr(), s.nbytes()


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            k, n = _storage(t)
            seen[k] = n
    return sum(seen.values())


class _Saved:
    """What autograd keeps instead of a saved tensor; freed with the graph, it releases its count."""
    __slots__ = ("owner", "key", "tensor")

    def __init__(self, owner: "ExactMemory", key: int, tensor: torch.Tensor):
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self):
        self.owner._release(self.key)


_OPEN: list["ExactMemory"] = []  # the ExactMemory contexts open in this process (sample_held, count_comm)


def sample_held() -> None:
    """Sample every open ExactMemory's held tensors now (a decoupled rank calls it at every message:
    engine/ranks/pipeline.py), so held_bytes is a peak over evaluation batches and frozen forwards too,
    not only over optimizer steps."""
    for m in _OPEN:
        m.sample_held()


def rebound(params: list[torch.Tensor]) -> None:
    """torch's model averaging (model_averaging.utils.average_parameters) all-reduced one flat copy of
    `params` and made each of them a view of it: every open ExactMemory counts that copy, which was alive
    beside the old parameters (allreduce_bytes, peak), and re-reads the parameters' storages, so that
    autograd saving a parameter's view is still no activation."""
    for m in _OPEN:
        m.allreduce_bytes = max(m.allreduce_bytes, storage_bytes(params))
        m.params = {_storage(p)[0] for p in m.all_params}


def count_comm(t: torch.Tensor) -> None:
    """`t` is a communication buffer alive through the optimizer step that follows (stepping.AllReduce's
    flat copy): every open ExactMemory counts its bytes (allreduce_bytes, peak)."""
    if _OPEN:
        n = _storage(t)[1]
        for m in _OPEN:
            m.allreduce_bytes = max(m.allreduce_bytes, n)


class ExactMemory:
    def __init__(self, params, device: torch.device, held: Callable[[], Iterable[torch.Tensor]] | None = None,
                 allocator_peak: Callable[[], int | None] | None = None,
                 comm_state: Callable[[], Iterable[torch.Tensor]] | None = None):
        """`held`: the tensors held outside the stages now (pipeline_held); each storage counts once.
        `comm_state`: the communication state kept across steps now (a data-parallel row's comm hook).
        `allocator_peak`: on CUDA, the training phases' allocator peak (metrics.PeakMemory.peak_bytes,
        which restarts around evaluations and keeps training's apart), read once at report: nothing
        on the step's hot path."""
        self.all_params, self.device, self.held, self.comm_state = list(params), device, held, comm_state
        self.allocator_peak = allocator_peak if accel(device).allocator else None
        self.params_bytes = self.grads_bytes = self.optimizer_bytes = 0
        self.activations_bytes = self.held_bytes = self.allreduce_bytes = self.comm_state_bytes = 0
        # storage -> a weak reference to a tensor on it, as held at the last sample: autograd saving
        # one of them does not count it again (weak: a storage freed since cannot lend its address
        # to an activation that would then go uncounted, and the count keeps nothing alive)
        self.held_now: dict[int, weakref.ref] = {}
        self.live = 0  # saved bytes alive now
        self.refs: dict[int, list[int]] = {}  # storage -> [holders, bytes]
        self.per_opt: dict[int, tuple[int, int]] = {}  # id(optimizer) -> (grads, state) after its last step

    # ------------------------------------------------------------------ autograd's saved tensors
    def _pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter):
            return t
        key, n = _storage(t)
        if key in self.params:
            return t
        held = self.held_now.get(key)
        if held is not None and held() is not None:  # counted in held_bytes
            return t
        ref = self.refs.get(key)
        if ref is None:
            self.refs[key] = [1, n]
            self.live += n
            self.activations_bytes = max(self.activations_bytes, self.live)
        else:
            ref[0] += 1
        return _Saved(self, key, t)

    @staticmethod
    def _unpack(p):
        return p.tensor if isinstance(p, _Saved) else p

    def _release(self, key: int) -> None:
        ref = self.refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            del self.refs[key]
            self.live -= ref[1]

    # ------------------------------------------------------------------ after every optimizer step
    def _after_step(self, opt, args, kwargs) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        grads = storage_bytes(p.grad for p in params if p.grad is not None)
        state = storage_bytes(v for s in opt.state.values() for v in s.values())
        self.per_opt[id(opt)] = (grads, state)
        self.grads_bytes = max(self.grads_bytes, sum(g for g, _ in self.per_opt.values()))
        self.optimizer_bytes = max(self.optimizer_bytes, sum(s for _, s in self.per_opt.values()))
        if self.comm_state is not None:
            self.comm_state_bytes = max(self.comm_state_bytes, storage_bytes(self.comm_state()))
        self.sample_held()

    def sample_held(self) -> None:
        """held_bytes: the distinct storages of the held tensors now, peak over samples; they are
        remembered (weakly) so that autograd saving one of them does not count it twice."""
        if self.held is None:
            return
        now: dict[int, tuple[int, torch.Tensor]] = {}
        for t in self.held():
            if isinstance(t, torch.Tensor):
                k, n = _storage(t)
                now[k] = (n, t)
        self.held_bytes = max(self.held_bytes, sum(n for n, _ in now.values()))
        self.held_now = {k: weakref.ref(t) for k, (_, t) in now.items()}

    # ------------------------------------------------------------------ the context
    def __enter__(self) -> "ExactMemory":
        self.params = {_storage(p)[0] for p in self.all_params}
        self.params_bytes = storage_bytes(self.all_params)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self._step_hook = register_optimizer_step_post_hook(self._after_step)
        _OPEN.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._step_hook.remove()
        _OPEN.remove(self)
        self.held_now = {}

    def report(self) -> dict:
        """summary.json's per-rank `exact_mem` (bytes) and `exact_train_mem_bytes` (its total)."""
        parts = {"params_bytes": self.params_bytes, "grads_bytes": self.grads_bytes,
                 "optimizer_bytes": self.optimizer_bytes, "activations_bytes": self.activations_bytes,
                 "held_bytes": self.held_bytes}
        if self.allreduce_bytes:  # replicas (as rank_metrics' allreduce_s) and local SGD only
            parts["allreduce_bytes"] = self.allreduce_bytes
        if self.comm_state_bytes:
            parts["comm_state_bytes"] = self.comm_state_bytes
        total = sum(parts.values())
        cuda = self.allocator_peak() if self.allocator_peak is not None else None
        if cuda is not None:
            parts["cuda_max_allocated_bytes"] = int(cuda)
        return {"exact_mem": {**parts, "total_bytes": total}, "exact_train_mem_bytes": total}


def pipeline_held(pipe) -> Callable[[], list]:
    """What a decoupled rank holds outside its stages (engine/ranks/pipeline.py's Pipeline): the replay
    buffer's batches (AsyncFeed), the messages queued in its feed (SyncFeed's inboxes, AsyncFeed's
    control queue with its evaluation batches: every feed's `queued()`), posted receive buffers, and the
    tensors of sends still in flight; ExactMemory counts their storages (each once). Sampled by the
    pipeline at every message (`sample_held`) and after every optimizer step. Duck-typed on the
    pipeline, so memory.py imports nothing of the engine."""
    def held() -> list:
        ts: list = []
        if pipe.buffer is not None:
            ts += [t for e in list(pipe.buffer.entries) for t in (e.x, e.y, e.ids)]
        ts += [t for m in pipe.feed.queued() for t in (m.x, m.y, m.ids, m.aux)]
        ts += [link.posted[1] for link in pipe.recv_links if link.posted is not None]
        ts += [t for link in pipe.send_links for _, keep in list(link.inflight) for t in keep]
        return ts
    return held
