"""The sections config/ owns (data, train, dist, replay, log), the field helper `knob` and the base
of a plug-in's settings (`Choice`).

Every knob of a job is a dataclass field with its rule on the field: a fixed set of values is a
`Literal[...]` type with a comment per value; a name that picks a plug-in names the registry that
owns the valid names (a label: decoupled/job.py gives config/ the names, config/ imports nothing
else from the package); a numeric range is the field's metadata (`knob(64, ge=1)`). The plug-in
sections ([model], [objective], [optim]) are the plug-ins' own Config dataclasses, chosen by the
table's `name` (Schema.choices). parse.py checks all of it generically; rules.py holds only what
ties several fields together. The comments above and after a field are its documentation:
reference.py writes them into docs/configuration.md.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Callable, Collection, Literal


class ConfigError(ValueError):
    """Bad configuration; the message names the field and how to fix it."""


# Where a plug-in key acts: (predicate on the whole job, what it applies to); applies.py
Acts = tuple[Callable[[typing.Any], bool], str]


def knob(default, *, ge=None, gt=None, lt=None, le=None, registry: str | None = None, empty_ok: bool = False,
         from_bool: tuple[str, str] | None = None, acts: Acts | None = None):
    """A field with its rule: numeric bounds (for lists: every element), or a registry of names
    (empty_ok: "" is allowed too, meaning "the default one"). from_bool: a choice field that was a
    bool once takes TOML false / true as these two choices, so old configs keep working. acts: the
    field acts only on some jobs (applies.py); set elsewhere it is refused."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, lt=lt, le=le, registry=registry,
                                  from_bool=from_bool, acts=acts).items() if v is not None}
    meta["empty_ok"] = empty_ok
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Choice:
    """The base of a plug-in's settings: the table's `name` picks the Config subclass (Schema.choices),
    so a key the chosen plug-in does not have is an error. Subclasses add their keys as fields."""
    name: str = ""

    def check(self) -> None:
        """The rules that tie this plug-in's own keys together: raise ConfigError naming the key."""


@dataclass(frozen=True)
class Schema:
    """What decoupled/job.py tells config/ about a job: its dataclass, the Config type of every name
    of each plug-in section, and the valid names of every registry label (`knob(registry=...)`)."""
    job: type
    choices: dict[str, Mapping[str, type[Choice]]]  # read when used: a plug-in registered later counts
    registries: dict[str, Collection[str]]


Mode = Literal["e2e", "sequential", "simultaneous", "quicknet", "sync", "async"]
Fallback = Literal["confident", "last"]
FALLBACKS = typing.get_args(Fallback)


@dataclass
class DataConfig:
    name: str = knob("digits", registry="dataset")  # the dataset (data.py: LOADERS)
    root: str = ""  # folder holding the dataset (torchvision layout); unused by digits/synthetic
    batch_size: int = knob(64, ge=1)  # training batch
    eval_batch_size: int = knob(512, ge=1)  # evaluation batch (no gradients: larger)
    limit_train: int = knob(0, ge=0)  # 0 = all; else a fixed seeded subset of this size
    limit_test: int = knob(0, ge=0)  # the same for the test set
    # a seeded, class-stratified hold-out of the training set (after limit_train; seeded by train.seed):
    # this fraction of every class is removed from training and becomes the validation split. Early
    # stopping and plateau LR decay (train.patience / plateau_factor) then watch the validation loss
    # instead of the training loss, and summary.json layers[] gain val_acc (sync / async: scored once,
    # after the last test evaluation).
    # 0 = no validation split. The test set is never used for any decision.
    val_fraction: float = knob(0.0, ge=0.0, lt=1.0)
    # training-batch augmentation of (C,H,W) images (data.py: AUGMENT_AUTO), before any flattening:
    # "none" | "crop" (zero-padded random crop: pad 4 on natural images, 2 on digits) | "crop-flip"
    # (crop + random horizontal flip: only for classes that survive mirroring) | "auto" (the
    # dataset's own: crop-flip pad 4 for cifar10/cifar100/imagefolder, crop pad 2 otherwise).
    # TOML false / true still mean "none" / "auto".
    augment: Literal["none", "crop", "crop-flip", "auto"] = knob("none", from_bool=("none", "auto"))
    download: bool = False  # torchvision datasets only download when asked
    # synthetic generator: class-dependent Gaussian blobs of this shape
    synthetic_shape: list[int] = knob([1, 8, 8], ge=1)
    synthetic_classes: int = knob(10, ge=1)  # synthetic: number of classes
    synthetic_train: int = knob(1024, ge=1)  # synthetic: training samples
    synthetic_test: int = knob(256, ge=1)  # synthetic: test samples
    # free-form table a dataset plug-in (data.name = "package.module:load") reads from cfg.args:
    # [data.args] in TOML, --set data.args.KEY=VALUE (docs/plugins.md)
    args: dict = knob({})


@dataclass
class TrainConfig:
    # "e2e": backprop baseline | "sequential": greedy, block after block | "simultaneous": every block
    # steps on each batch, one process (the reference) | "quicknet": QuickNets' Algorithm 1 |
    # "sync" / "async": the decoupled engine on torchrun ranks (README: modes)
    mode: Mode = "simultaneous"
    epochs: int = knob(5, ge=1)  # epochs per block (cascade: objective.cascade_* instead)
    seed: int = 0  # every random draw of the job derives from it (decoupled/rng.py)
    # "auto" = cuda when available; "cpu" | "cuda" (cuda:LOCAL_RANK under torchrun)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # frozen blocks' outputs (pseudo-inputs): "memory" | "disk" (a .npy memmap) | "recompute" every
    # epoch | "auto" = memory unless data.augment (augmented inputs change every epoch)
    cache: Literal["auto", "memory", "disk", "recompute"] = "auto"
    probe_epochs: int = knob(1, ge=0)  # e2e: epochs to fit each intermediate head on frozen features
    log_every: int = knob(50, ge=1)  # steps between metrics.jsonl lines
    eval_every: int = knob(1, ge=0)  # epochs between test evaluations (0 = only at the end)
    # source steps (the data loader's batches, counted across epochs: rank 0's) between test evaluations
    # inside an epoch as well, outside the timed window (0 = off): after every N-th batch that does not
    # end an epoch, the network as it is then is scored on train.eval_subset (engine/evaluate.py, Note
    # [mid-epoch evaluation]). The bench's --eval-every-steps: time to target under a tenth of an epoch
    eval_every_steps: int = knob(0, ge=0)
    # the test samples a mid-epoch evaluation scores: the first N of the test set, fixed across runs and
    # seeds (0 = all of it); an accuracy p on it has standard error sqrt(p (1 - p) / N). End-of-epoch
    # evaluations always score the whole test set. Needs train.eval_every_steps
    eval_subset: int = knob(0, ge=0)
    checkpoint: bool = True  # per-rank checkpoint at every epoch end
    keep_checkpoints: int = knob(3, ge=0)  # newest epochs kept per rank (0 = all)
    # The monitored loss, once per epoch per block: the validation cross-entropy of the block's head
    # when data.val_fraction > 0, else the epoch-mean training loss. patience (train.mode e2e and
    # quicknet; QuickNets appendix): a block (or the e2e network) stops after `patience` epochs without
    # a new minimum (0 = train all epochs). plateau_factor (e2e, quicknet, sequential, simultaneous;
    # not sync/async): the block's LR is multiplied by it after plateau_patience epochs without one
    # (torch ReduceLROnPlateau; 1 = off). QuickNets: 0.5 / 1; cascade (Marquez 2018, Algorithm 1:
    # "if validation error plateaus, lr <- lr/10"): 0.1 with data.val_fraction = 0.1 (45k/5k on CIFAR)
    patience: int = knob(0, ge=0)
    plateau_factor: float = knob(1.0, gt=0.0, le=1.0)  # LR x this on a plateau (see train.patience)
    plateau_patience: int = knob(1, ge=0)  # epochs without a new minimum that make a plateau
    # arithmetic of each stage's forward and backward (torch.autocast per stage): "fp32" | "bf16" |
    # "fp16" (with a GradScaler per stage; the optimizer state and weights stay fp32)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # steps between checks that a block's loss and activations are finite: the check is accumulated
    # on the device and read only every N steps (a read is a host sync on GPU) and at every epoch
    # end; 0 = auto: every step on CPU (a plain read), every 100 steps on CUDA
    check_every: int = knob(0, ge=0)
    # train.mode="e2e", the baseline (the papers' "global" column): "ce" = cross-entropy of the last
    # head's prediction (predsim: its `pred` branch; quicknet: its exit) backpropagated through the
    # network, whatever the local objective | "local" = the objective's own local loss end to end
    e2e_loss: Literal["ce", "local"] = "ce"
    # train.mode="e2e": recompute each block's activations in the backward pass (torch.utils.checkpoint
    # per block), trading compute for memory: the `e2e-checkpoint` row of `decoupled bench`. BatchNorm
    # running statistics are updated again by the recomputation (momentum acts twice per step)
    activation_checkpointing: bool = False
    # no per-epoch lines on stdout (decoupled/live.py): only the summary at the end
    quiet: bool = False


@dataclass
class DistConfig:
    # "auto" = nccl with cuda:LOCAL_RANK when CUDA is available, else gloo; "gloo" | "nccl"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = knob(300.0, gt=0.0)  # collective and point-to-point timeout
    # blocks per stage group, contiguous: [] = an even split (earlier groups take the remainder) |
    # [2, 1, 1] | "auto" = the split whose slowest group is fastest, from every block's training step
    # timed at start-up on the real input shape and device (engine/ranks/placement.py); plan printed
    placement: list[int] | Literal["auto"] = knob([], ge=1, empty_ok=True)
    # ranks per stage group (engine/ranks/groups.py): [] = one rank per group | [2, 1, 1] (sum = world
    # size): a group's replicas train the same blocks on different batches (batch b of an epoch goes
    # to replica b mod R) and average their gradients every step, so a slow stage can be held by
    # several ranks | "auto" = chosen with the split from the measured block times (needs
    # dist.placement "auto" or a list). In train.mode="simultaneous" a block of a group with R
    # replicas accumulates R batches per optimizer step: the reference that sync with replicas equals
    replicas: list[int] | Literal["auto"] = knob([], ge=1, empty_ok=True)
    # how a group's replicas share the batches (groups.py): "alternate" = batch b goes to replica
    # b mod R, one optimizer step per R batches (R x the global batch of one rank) | "split" = every
    # batch is split by rows into R nearly equal parts (torch.tensor_split, as DDP's ranks take theirs),
    # one step per batch: the global batch and steps per epoch of every unreplicated run. Split needs
    # neighbouring groups with equal replica counts or one of them a single rank, and train.mode sync
    # or simultaneous (its reference, splitting the same rows)
    replica_batch: Literal["alternate", "split"] = "alternate"
    # replicas: the gradient all-reduce goes in buckets of at most this many MiB of gradients
    # (engine/stepping.py AllReduce), so a replica holds one bucket's flat copy at a time (DDP's
    # bucket_cap_mb default)
    allreduce_bucket_mb: float = knob(25.0, gt=0.0)
    # replicas: BatchNorm over the union of the replicas' batches (torch SyncBatchNorm; CUDA only).
    # false = each replica normalises its own batch and the running statistics are averaged over
    # the group after every step, so every replica holds the same buffers too
    sync_bn: bool = False
    # dist.placement="auto": a rank's blocks may need at most this many MiB (parameters, gradients,
    # optimizer state and the activations a step saves, as measured); 0 = no cap
    max_stage_mem_mb: float = knob(0.0, ge=0.0)
    # dist.placement or dist.replicas "auto": the link between stage groups, in Mbit/s; each group's
    # time is then the slower of its compute and its send of the cut's messages (plan/model.py, Note
    # [link-aware stages]), so a slow link moves the cut to where the activations are smallest. 0 =
    # unknown: compute alone
    link_mbps: float = knob(0.0, ge=0.0)
    max_inflight: int = knob(2, ge=1)  # isends a rank may have outstanding (2 = double buffering)
    debug_delay_ms: float = knob(0.0, ge=0.0)  # chaos testing: sleep U(0, this) ms before every step
    # form of the activations between blocks (on the wire between ranks, in a rank's replay buffer,
    # and at the block boundaries of the single-process modes, so that sync equals simultaneous),
    # read back as float32 by the next block (engine/wire.py, note [row scales]): "float32" |
    # "bfloat16" | "float16" (half the bytes) | "int8" (a quarter, plus 4 bytes a sample: each sample
    # scaled by its own max |value| / 127) | "float8_e4m3fn" | "float8_e5m2" (as int8, scaled to the
    # float8 dtype's largest value)
    wire_dtype: Literal["float32", "bfloat16", "float16", "int8", "float8_e4m3fn", "float8_e5m2"] = "float32"


def replicated(d: "DistConfig") -> bool:
    """Whether some stage group may be held by more than one rank (dist.replicas)."""
    return d.replicas == "auto" or any(r > 1 for r in d.replicas)


def split_layout_check(replicas: list[int]) -> None:
    """dist.replica_batch='split' (engine/ranks/groups.py, Note [split replicas]): neighbouring groups hold
    equal replica counts or one of them is a single rank, so which upstream replicas a replica reads
    never depends on a batch's size."""
    for g, (a, b) in enumerate(zip(replicas, replicas[1:])):
        if a != b and 1 not in (a, b):
            raise ConfigError(f"dist.replicas={replicas} with dist.replica_batch='split': groups {g} and {g + 1} "
                              f"hold {a} and {b} replicas; neighbouring groups need equal counts or one of them a "
                              "single rank, e.g. [2, 2] or [1, 2]; or use dist.replica_batch='alternate'")


@dataclass
class ReplayConfig:
    capacity: int = knob(4, ge=1)  # async: batches a rank keeps from its upstream
    # async: MiB of batches a rank keeps from its upstream instead of a count (replay.capacity may then
    # not be set): the newest batches that fit, in the wire form (an int8 dist.wire_dtype keeps ~4x
    # float32's batches); a batch larger than this alone is refused; 0 = bounded by replay.capacity
    capacity_mb: float = knob(0.0, ge=0.0)
    # which buffered batch a rank trains on next (engine/ranks/replay.py): "fifo" (oldest of the
    # least used) | "random" | "priority-lifo" (newest of the least used: DGL's buffer)
    policy: Literal["fifo", "random", "priority-lifo"] = "fifo"
    max_reuse: int = knob(4, ge=0)  # a batch is trained on at most this many times; 0 = unlimited (DGL's code)
    # what an async rank's "epoch" is (README: async budgets):
    # "steps" (DGL, Belilovsky et al. 2020): every block makes its full budget of optimizer steps
    #   (epochs x batches per epoch, cascade budgets included) and steps its LR schedule on its own
    #   epochs; a slow block finishes later, and upstream keeps streaming fresh data (frozen blocks
    #   forward) until every rank is done; test accuracy after every train.eval_every epochs of the
    #   stream and once more at the end, when every block is final
    # "upstream": a rank trains while its upstream streams; what it is too slow to take is dropped,
    #   its epochs follow upstream's: a slowdown costs updates, not time
    # "fresh": "steps" counted in fresh batches (drawn for the first time): replays (at most
    #   max_reuse - 1 per batch) fill a fast rank's idle time without spending its budget, so no
    #   block finishes while the blocks feeding it still train (engine/ranks/budget.py, note [fresh budget])
    budget: Literal["steps", "upstream", "fresh"] = "steps"
    # MiB of evaluation batches a rank may hold from upstream before upstream waits: a slow rank then
    # evaluates while its upstream trains on, and only a test set larger than this (at that link's
    # activation size) makes upstream wait during an evaluation; 0 = one batch at a time
    eval_buffer_mb: float = knob(256.0, ge=0.0)


@dataclass
class LogConfig:
    # TensorBoard scalars into RUN/tb/rank{r}/ (per-block loss and test accuracy, samples/s,
    # compute/comm/idle, replay statistics, memory, learning rate): `tensorboard --logdir RUN/tb`.
    # Needs the optional extra: pip install -e '.[tb]'
    tensorboard: bool = False
