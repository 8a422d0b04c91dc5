"""The data-parallel rows of `decoupled bench`, each built from torch's own implementation; dataparallel.py
trains them all the same way (the e2e network, every rank drawing the same global batches and taking its
part: Note [global batch] there):

  ddp           DistributedDataParallel: each bucket of gradients all-reduced (mean) during backward
  ddp-bf16      DDP with torch's bf16_compress_hook: each bucket cast to bfloat16, all-reduced, cast back
  ddp-powersgd  DDP with torch's powerSGD_hook (Vogels et al. 2019): each gradient matrix it compresses
                is all-reduced as rank-R factors P and Q, with error feedback and warm start
  localsgd      post-local SGD (Lin et al. 2020): DDP with post_localSGD_hook (gradients all-reduced for
                the first W steps, then each rank's own) and PostLocalSGDOptimizer with a
                PeriodicModelAverager, which averages the ranks' models every P steps
  fsdp          FSDP2: fully_shard per block, then the root

A Strategy wraps the network (localsgd: the optimizer too), names the bench flags it reads (knobs.py),
says whether its communication can be timed apart from compute, and how its training differs from the
e2e row's (`declared`: bench/worker.run_fields).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from ..config import ConfigError
from ..device import StepTimer, accel
from ..memory import rebound
from .knobs import Knobs


class Payload:
    """Bytes this rank hands to all-reduces that span ranks while `on` (its training steps). torch's comm
    hooks and model averagers call `dist.all_reduce` through the module, so the one wrapped here, for
    the context's life, sees every one of them: the bucket, its bfloat16 copy, PowerSGD's uncompressed
    tensors and its P and Q, an averager's flat parameters. A subgroup of one rank moves nothing."""

    def __init__(self):
        self.bytes, self.on = 0, False

    def __enter__(self) -> "Payload":
        self.real = real = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            group = kwargs["group"] if "group" in kwargs else (args[1] if len(args) > 1 else None)
            if self.on and dist.get_world_size(group) > 1:
                self.bytes += tensor.numel() * tensor.element_size()
            return real(tensor, *args, **kwargs)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self.real


@dataclass
class Comm:
    """A data-parallel rank's communication clocks and byte count. `hooked`: DDP's comm hook, from a
    bucket's issue to its future's completion, overlapping backward (compute + comm can exceed the wall
    time); `inline`: communication inside the optimizer step, in series with it (localsgd's averaging),
    which compute_s leaves out."""
    hooked: StepTimer
    inline: StepTimer
    payload: Payload = field(default_factory=Payload)


@dataclass
class Wrapped:
    model: nn.Module
    optimizer: Callable = lambda opt: opt  # the optimizer that steps, around the one built
    state: Callable[[], list] = list  # communication state kept across steps (memory.ExactMemory comm_state)
    evaluating: Callable[[], ContextManager] = nullcontext  # the network evaluations score


def timed(hook: Callable, timer: StepTimer) -> Callable:
    """A DDP comm hook with each bucket's issue-to-completion time added to `timer`: started where the
    hook is called, stopped in the future's callback, which runs after the collectives (gloo) or on a
    stream ordered after their kernels (CUDA). DDP waits for the callback's future before backward
    returns, so every region is closed at the epoch's end."""
    def run(state, bucket):
        t0 = timer.start()

        def done(fut):
            timer.stop(t0)
            return fut.value()
        return hook(state, bucket).then(done)
    return run


# Note [PowerSGD on gloo]: with more than one bucket, torch's powerSGD_hook aborted on gloo
# ("op.preamble.length <= op.nbytes. 8192 vs 3072. Received data size doesn't match expected size"). The
# hook issues a bucket's first all-reduce (its uncompressed tensors) itself and the next two (P, then Q)
# from future callbacks. Gloo matches collectives by a tag each process group hands out in issue order,
# and a gloo future completes when its work has run, so those callbacks run on gloo's worker thread
# whenever the work ends, while DDP's autograd thread goes on to issue the next bucket's all-reduce:
# the two ranks interleave bucket k's P / Q with bucket k+1's collectives differently, and one tag joins
# tensors of different sizes (logged on 2 ranks, one bucket per parameter: at the 6th all-reduce rank
# 0's autograd thread issued bucket k+1's 256 uncompressed elements where rank 1's gloo thread issued
# bucket k's P of 20, "256 vs 20", in 2 runs of 3). One bucket per step hides it (DDP waits for the
# step's futures before the next step); NCCL never shows it (its futures complete at enqueue, so the
# callbacks run inline, in issue order). `in_order` starts each bucket's hook only once the previous
# bucket's future is done: every collective of a step is issued in bucket order on every rank, whatever
# the bucket size. The cost is the overlap of one bucket's compression with the next bucket's backward;
# a bucket's own issue-to-completion time is still comm_s (the wait is not, it shows in compute_s as the
# all-reduces' exposed part does for ddp).


def in_order(hook: Callable) -> Callable:
    """Note [PowerSGD on gloo]: each call of `hook` waits for the future the previous call returned."""
    last: list = []

    def run(state, bucket):
        if last:
            last.pop().wait()
        fut = hook(state, bucket)
        last.append(fut)
        return fut
    return run


class TimedAverager(PeriodicModelAverager):
    """torch's PeriodicModelAverager with its calls timed on `timer` (Comm.inline, in series with the
    step), and memory.rebound told when an averaging moved the parameters: torch's average_parameters
    all-reduces one flat copy of them and makes each parameter a view of it."""

    def __init__(self, period: int, warmup_steps: int, timer: StepTimer):
        super().__init__(period, warmup_steps)
        self.timer = timer

    def average_parameters(self, params) -> None:
        params = list(params)  # the optimizer's param groups (PostLocalSGDOptimizer passes them)
        first = params[0]["params"][0]
        before = first.untyped_storage().data_ptr()
        t0 = self.timer.start()
        super().average_parameters(params)
        self.timer.stop(t0)
        if first.untyped_storage().data_ptr() != before:
            rebound([p for g in params for p in g["params"]])


@contextmanager
def averaged(params: list[nn.Parameter]):
    """Local SGD's network is the ranks' average: evaluation scores it without changing training, the
    average made by torch's average_parameters (each parameter then a view of one all-reduced flat copy),
    every rank's own parameters put back after."""
    from torch.distributed.algorithms.model_averaging.utils import average_parameters
    own = [p.data for p in params]
    average_parameters(iter(params), None)
    try:
        yield
    finally:
        for p, d in zip(params, own):
            p.data = d


def _ddp(net: nn.Module, device: torch.device, knobs: Knobs) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP
    d = accel(device).process_group_device()  # the GPU (device_ids) or None (the host: no device_ids)
    # gradient_as_bucket_view: the gradients are the buckets, counted once (memory.py)
    return DDP(net, device_ids=[d.index] if d is not None else None, gradient_as_bucket_view=True,
               bucket_cap_mb=knobs.bucket_mb)


def ddp(net, device, knobs: Knobs, comm: Comm) -> Wrapped:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    model = _ddp(net, device, knobs)
    model.register_comm_hook(None, timed(allreduce_hook, comm.hooked))  # DDP's own all-reduce (mean), timed
    return Wrapped(model)


def ddp_bf16(net, device, knobs: Knobs, comm: Comm) -> Wrapped:
    # pytorch/pytorch#111131 reports that gloo cannot all-reduce bfloat16; torch 2.14.1's gloo can
    # (tests/test_slow_link_rows.py runs this hook on 2 gloo ranks)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
    model = _ddp(net, device, knobs)
    model.register_comm_hook(None, timed(bf16_compress_hook, comm.hooked))
    return Wrapped(model)


def ddp_powersgd(net, device, knobs: Knobs, comm: Comm) -> Wrapped:
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
    model = _ddp(net, device, knobs)
    # min_compression_rate: torch's 2 (a tensor is compressed where that saves half its elements);
    # random_seed: torch's 0, the same on every rank (the first Q of each bucket)
    state = PowerSGDState(process_group=None, matrix_approximation_rank=knobs.powersgd_rank,
                          start_powerSGD_iter=knobs.powersgd_start, use_error_feedback=True, warm_start=True)
    model.register_comm_hook(state, in_order(timed(powerSGD_hook, comm.hooked)))
    # kept across steps, per bucket: the error (the bucket's size) and the P and Q memories
    return Wrapped(model, state=lambda: [*state.error_dict.values(), *state.p_memory_dict.values(),
                                         *state.q_memory_dict.values()])


def localsgd(net, device, knobs: Knobs, comm: Comm) -> Wrapped:
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
    from torch.distributed.optim import PostLocalSGDOptimizer
    model = _ddp(net, device, knobs)
    # after the warm-up a rank's gradients are its own: a subgroup of one rank. subgroup=None would make
    # one of the machine's accelerators (dist.new_subgroups: torch.accelerator.device_count()), refused
    # without one, and on one machine it would be every rank, i.e. ddp
    subgroup, _ = dist.new_subgroups(group_size=1)
    state = PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=knobs.localsgd_warmup)
    model.register_comm_hook(state, timed(post_localSGD_hook, comm.hooked))
    params = list(net.parameters())
    return Wrapped(model, lambda opt: PostLocalSGDOptimizer(opt, TimedAverager(knobs.localsgd_period,
                                                                                knobs.localsgd_warmup, comm.inline)),
                   evaluating=lambda: averaged(params))


def fsdp(net, device, knobs: Knobs, comm: Comm) -> Wrapped:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in net.blocks:
        fully_shard(block, mesh=mesh)
    return Wrapped(fully_shard(net, mesh=mesh))


def _no_fp16(cfg) -> None:
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision='fp16': the localsgd baseline of `decoupled bench` cannot scale its loss: "
                          "between averagings each rank's GradScaler sees only its own gradients, so the ranks would "
                          "skip different steps and their averagings (counted in steps) would stop meeting; set "
                          "train.precision='bf16' or 'fp32'")


def _buckets(knobs: Knobs) -> str:
    return f"buckets {knobs.bucket_mb:g} MiB" if knobs.bucket_mb is not None else ""


def _label(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class Strategy:
    wrap: Callable[[nn.Module, torch.device, Knobs, Comm], Wrapped]
    what: str  # the row's first note: what trains
    knobs: tuple[str, ...] = ()  # the Knobs fields it reads (rows.py passes them, --tune sweeps them)
    comm_timed: bool = True  # False: comm_s unavailable (FSDP's collectives run inside its module hooks)
    sharded: bool = False  # each rank holds a shard of the gradients: fp16's scaler is ShardedGradScaler
    refuse: Callable = lambda cfg: None  # a setting it does not honour: ConfigError (worker.refuse's rule)
    # how its training differs from the e2e row's, by construction (run_fields' declared_differences)
    declared: Callable[[Knobs, int], list[str]] = lambda knobs, world: []
    label: Callable[[Knobs, int], str] = lambda knobs, world: ""  # bench.md's words beside the row's name
    notes: tuple[str, ...] = ()


STRATEGIES: dict[str, Strategy] = {
    "ddp": Strategy(ddp, "DDP", ("bucket_mb",), label=lambda k, w: _buckets(k)),
    "ddp-bf16": Strategy(
        ddp_bf16, "DDP with torch's bf16_compress_hook", ("bucket_mb",),
        declared=lambda k, w: [f"ddp-bf16: gradients are all-reduced in bfloat16 (torch's bf16_compress_hook: each "
                               f"bucket cast to bfloat16 and divided by {w} before the sum, cast back after)"],
        label=lambda k, w: _buckets(k)),
    "ddp-powersgd": Strategy(
        ddp_powersgd, "DDP with torch's powerSGD_hook (error feedback, warm start)",
        ("bucket_mb", "powersgd_rank", "powersgd_start"),
        declared=lambda k, w: [f"ddp-powersgd: from optimizer step {k.powersgd_start} on, every gradient matrix that "
                               f"rank {k.powersgd_rank} compresses at least 2x is all-reduced as its rank-"
                               f"{k.powersgd_rank} PowerSGD approximation with error feedback (torch's "
                               "powerSGD_hook, warm start); biases and smaller matrices exactly"],
        label=lambda k, w: _label(f"rank {k.powersgd_rank} from step {k.powersgd_start}", _buckets(k)),
        notes=("comm_s includes PowerSGD's compression arithmetic, which runs in the hook's future callbacks; each "
               "bucket's hook starts once the previous bucket's collectives are done (Note [PowerSGD on gloo] in "
               "bench/strategies.py)",)),
    "localsgd": Strategy(
        localsgd, "post-local SGD: DDP with torch's post_localSGD_hook, PostLocalSGDOptimizer and "
                  "PeriodicModelAverager", ("bucket_mb", "localsgd_period", "localsgd_warmup"),
        refuse=_no_fp16,
        declared=lambda k, w: [f"localsgd: each rank steps its own copy of the network on its part of every global "
                               f"batch (1/{w}, torch.tensor_split)" +
                               (f" after {k.localsgd_warmup} steps on all-reduced gradients" if k.localsgd_warmup
                                else "") +
                               f"; the copies are averaged every {k.localsgd_period} optimizer steps "
                               "(PeriodicModelAverager), and evaluated as their average"],
        label=lambda k, w: _label(f"each rank steps on its 1/{w} of a batch, averaged every {k.localsgd_period} "
                                  "steps" + (f" after {k.localsgd_warmup}" if k.localsgd_warmup else ""), _buckets(k)),
        notes=("comm_s: the warm-up's gradient all-reduces and the averagings, which run inside the optimizer "
               "step and are left out of compute_s; evaluation scores the ranks' average (computed outside the "
               "timed window, each rank's own parameters put back)",)),
    "fsdp": Strategy(fsdp, "FSDP2 fully_shard per block, then the root", comm_timed=False, sharded=True,
                     notes=("comm_s unavailable: FSDP2's all-gathers and reduce-scatters run inside its module hooks "
                            "on its own streams, not separable from compute (compute_s includes their exposed part)",)),
}
