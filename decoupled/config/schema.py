"""The schema: every knob of a job as a dataclass field, with its rule on the field.

A fixed set of values is a `Literal[...]` type with a comment per value; a name that picks a
plug-in (dataset, model, objective, head) names the registry that owns the valid names (one source
of truth); a numeric range is the field's metadata (`knob(64, ge=1)`). parse.py checks all of them
generically; rules.py holds only what ties several fields together.
"""
from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """Bad configuration; the message names the field and how to fix it."""


# Registries that own the valid names of a field: module, attribute (a dict keyed by name).
REGISTRIES = {"dataset": ("decoupled.data", "LOADERS"), "model": ("decoupled.models", "MODELS"),
              "objective": ("decoupled.objectives", "OBJECTIVES"), "head": ("decoupled.heads", "HEADS")}


def registry_names(kind: str) -> tuple[str, ...]:
    module, attr = REGISTRIES[kind]
    return tuple(getattr(importlib.import_module(module), attr))


def knob(default, *, ge=None, gt=None, lt=None, le=None, registry: str | None = None, empty_ok: bool = False,
         auto_ok: bool = False, from_bool: tuple[str, str] | None = None):
    """A field with its rule: numeric bounds (for lists: every element), or a registry of names
    (empty_ok: "" is allowed too, meaning "the default one"). from_bool: a choice field that was a
    bool once takes TOML false / true as these two choices, so old configs keep working. auto_ok:
    the string "auto" is allowed too (chosen by measurement)."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, lt=lt, le=le, registry=registry,
                                  from_bool=from_bool).items() if v is not None}
    meta["empty_ok"] = empty_ok
    meta["auto_ok"] = auto_ok
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# a trainer each (decoupled/trainers/; what each can do and reads: decoupled/modes.py)
Mode = Literal["e2e", "sequential", "simultaneous", "quicknet", "sync", "async"]
Fallback = Literal["confident", "last"]
FALLBACKS = typing.get_args(Fallback)


@dataclass
class DataConfig:
    name: str = knob("digits", registry="dataset")
    root: str = ""  # folder holding the dataset (torchvision layout); unused by digits/synthetic
    batch_size: int = knob(64, ge=1)
    eval_batch_size: int = knob(512, ge=1)
    limit_train: int = knob(0, ge=0)  # 0 = all; else a fixed seeded subset of this size
    limit_test: int = knob(0, ge=0)
    # a seeded, class-stratified hold-out of the training set (after limit_train; seeded by train.seed):
    # this fraction of every class is removed from training and becomes the validation split. Early
    # stopping and plateau LR decay (train.patience / plateau_factor) then watch the validation loss
    # instead of the training loss, and summary.json layers[] gain val_acc (single-process modes).
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
    synthetic_classes: int = knob(10, ge=1)
    synthetic_train: int = knob(1024, ge=1)
    synthetic_test: int = knob(256, ge=1)


@dataclass
class ModelConfig:
    name: str = knob("mlp", registry="model")
    widths: list[int] = knob([150, 150, 150], ge=1)  # mlp hidden widths
    hierarchy: list[int] = knob([1, 1, 2, 2], ge=1)  # vgg/resnet/simcnn stages
    channels: list[int] = knob([], ge=1, empty_ok=True)  # vgg: explicit channels per stage (else from width)
    width: int = knob(64, ge=1)  # base channels (vgg/resnet stage 0, simcnn M, allcnn 96 in the paper)
    blocks: int = knob(0, ge=0)  # decoupled blocks; 0 = one per layer / residual unit
    block_sizes: list[int] = knob([], ge=1, empty_ok=True)  # explicit units per block
    # resnet unit: "basic" (two 3x3 convs) | "bottleneck" (1x1, 3x3, 1x1)
    residual: Literal["basic", "bottleneck"] = "basic"
    # BatchNorm after each conv (vgg/simcnn/allcnn) or Linear (mlp; Linear -> BN -> ReLU, as the
    # local-loss reference MLP); resnet always has it. "auto" = on for the conv models, off for mlp
    # (each model's long-standing default) | "on" | "off"; TOML true / false mean "on" / "off"
    batchnorm: Literal["auto", "on", "off"] = knob("auto", from_bool=("off", "on"))
    dropout: float = knob(0.0, ge=0.0, lt=1.0)  # dropout on each unit's output (every model)
    # where a block's last dropout sits relative to its local loss:
    # "after-loss": the loss (and head) see the block's features; dropout acts only on what goes on to
    #   the next block. The reference for predsim (Nokland & Eidnes' local-loss code: loss on h, then
    #   dropout(h) for the next layer), and right for every objective: a head is evaluated on clean
    #   features, and dropout is there to regularise the next layer's input, not the local classifier.
    # "in-block": dropout ends the block, so the local loss sees dropped-out features (runs before
    #   this field existed; kept to reproduce them). Only mlp, vgg and resnet have dropout.
    dropout_position: Literal["after-loss", "in-block"] = "after-loss"
    stem_downsample: bool = False  # simcnn: invertible downsampling of the input
    # the non-linearity of every model's layers (heads keep ReLU): "relu" | "leaky_relu" (negative
    # slope 0.01, Ma et al. 2020). Every unit is conv/linear -> BN -> non-linearity -> dropout.
    activation: Literal["relu", "leaky_relu"] = "relu"


@dataclass
class ObjectiveConfig:
    name: str = knob("khidden", registry="objective")
    # override the objective's head ("" = the objective's own): khidden | mlpsr | dense | predsim | mixedpool
    head: str = knob("", registry="head", empty_ok=True)
    k: int = knob(1, ge=1)  # k-hidden: k-1 auxiliary convs before average + linear
    aux_width: int = knob(128, ge=1)  # auxiliary conv / dense width
    head_batchnorm: bool = True
    # cascade: block j (0-based) trains cascade_initial_epochs + cascade_epoch_increment * j epochs.
    # Marquez 2018, Algorithm 1: layer l (1-based) trains `epochs + k * l`, so the paper's (epochs, k)
    # is cascade_initial_epochs = epochs + k, cascade_epoch_increment = k
    cascade_initial_epochs: int = knob(1, ge=1)
    cascade_epoch_increment: int = knob(1, ge=0)
    predsim_beta: float = knob(0.99, ge=0.0, le=1.0)  # predsim: weight of the similarity-matching term
    # quicknet: a sample is learned (and leaves the later blocks' data) when its exit's
    # normalised-entropy confidence >= this, its commitment logit > 0 and its prediction is right.
    # The paper gives no value; the exit curve sweeps the same rule at inference.
    quicknet_threshold: float = knob(0.95, ge=0.0, le=1.0)
    commit_hidden: int = knob(0, ge=0)  # quicknet commitment head hidden units; 0 = number of classes (the paper)
    # class weights of the draws (objectives/quicknet.py): "remaining" (the paper: a class loses weight
    # as it is learned) | "equal" (every class still present equally likely) | "none" (uniform)
    quicknet_balance: Literal["remaining", "equal", "none"] = "remaining"
    # early exit when no exit passes: "confident" = the most confident exit (the paper) | "last"
    exit_fallback: Fallback = "confident"


@dataclass
class TrainConfig:
    # "e2e": backprop baseline | "sequential": greedy, block after block | "simultaneous": every block
    # steps on each batch, one process (the reference) | "quicknet": QuickNets' Algorithm 1 |
    # "sync" / "async": the decoupled engine on torchrun ranks (README: modes)
    mode: Mode = "simultaneous"
    epochs: int = knob(5, ge=1)
    seed: int = 0
    # "auto" = cuda when available; "cpu" | "cuda" (cuda:LOCAL_RANK under torchrun)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # frozen blocks' outputs (pseudo-inputs): "memory" | "disk" (a .npy memmap) | "recompute" every
    # epoch | "auto" = memory unless data.augment (augmented inputs change every epoch)
    cache: Literal["auto", "memory", "disk", "recompute"] = "auto"
    probe_epochs: int = knob(1, ge=0)  # e2e: epochs to fit each intermediate head on frozen features
    log_every: int = knob(50, ge=1)  # steps between metrics.jsonl lines
    eval_every: int = knob(1, ge=0)  # epochs between test evaluations (0 = only at the end)
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
    plateau_factor: float = knob(1.0, gt=0.0, le=1.0)
    plateau_patience: int = knob(1, ge=0)
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
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = knob(0.05, gt=0.0)
    momentum: float = knob(0.9, ge=0.0)
    weight_decay: float = knob(0.0, ge=0.0)
    nesterov: bool = False
    # per block, stepped on the block's own epochs: "constant" | "step" (x gamma every step_epochs)
    # | "cosine" (to 0 over the block's budget) | "milestones" (x gamma at each of optim.milestones)
    schedule: Literal["constant", "step", "cosine", "milestones"] = "constant"
    step_epochs: int = knob(15, ge=1)  # step schedule: decay every step_epochs epochs of a block
    # step / milestones factor (Belilovsky 2019: 0.2 every 15 epochs; Ma 2020: 0.25 at the milestones)
    gamma: float = knob(0.2, gt=0.0)
    # milestones schedule: fractions of the block's epoch budget at which the LR is multiplied by
    # gamma (epoch round(f * budget)); Ma 2020: 50, 75, 89 and 94 % of training
    milestones: list[float] = knob([0.5, 0.75, 0.89, 0.94], gt=0.0, lt=1.0)
    block_lr_decay: float = knob(1.0, gt=0.0)  # block j uses lr * block_lr_decay**j


@dataclass
class DistConfig:
    # "auto" = nccl with cuda:LOCAL_RANK when CUDA is available, else gloo; "gloo" | "nccl"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = knob(300.0, gt=0.0)  # collective and point-to-point timeout
    # blocks per stage group, contiguous: [] = an even split (earlier groups take the remainder) |
    # [2, 1, 1] | "auto" = the split whose slowest group is fastest, from every block's training step
    # timed at start-up on the real input shape and device (engine/ranks/placement.py); plan printed
    placement: list[int] = knob([], ge=1, empty_ok=True, auto_ok=True)
    # ranks per stage group (engine/ranks/groups.py): [] = one rank per group | [2, 1, 1] (sum = world
    # size): a group's replicas train the same blocks on different batches (batch b of an epoch goes
    # to replica b mod R) and average their gradients every step, so a slow stage can be held by
    # several ranks | "auto" = chosen with the split from the measured block times (needs
    # dist.placement "auto" or a list). In train.mode="simultaneous" a block of a group with R
    # replicas accumulates R batches per optimizer step: the reference sync with replicas equals
    replicas: list[int] = knob([], ge=1, empty_ok=True, auto_ok=True)
    # replicas: BatchNorm over the union of the replicas' batches (torch SyncBatchNorm; CUDA only).
    # false = each replica normalises its own batch and the running statistics are averaged over
    # the group after every step, so every replica holds the same buffers too
    sync_bn: bool = False
    # dist.placement="auto": a rank's blocks may need at most this many MiB (parameters, gradients,
    # optimizer state and the activations a step saves, as measured); 0 = no cap
    max_stage_mem_mb: float = knob(0.0, ge=0.0)
    max_inflight: int = knob(2, ge=1)  # isends a rank may have outstanding (2 = double buffering)
    debug_delay_ms: float = knob(0.0, ge=0.0)  # chaos testing: sleep U(0, this) ms before every step
    # dtype of the activations between blocks (on the wire between ranks, and at the block boundaries
    # of the single-process modes, so that sync equals simultaneous): "float32" | "bfloat16" |
    # "float16" (half the bytes); cast back to float32 where the next block reads them
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def replicated(d: "DistConfig") -> bool:
    """Whether some stage group may be held by more than one rank (dist.replicas)."""
    return d.replicas == "auto" or any(r > 1 for r in d.replicas)


@dataclass
class ReplayConfig:
    capacity: int = knob(4, ge=1)  # async: batches a rank keeps from its upstream
    # which buffered batch a rank trains on next (engine/ranks/replay.py): "fifo" (oldest of the
    # least used) | "random" | "priority-lifo" (newest of the least used: DGL's buffer)
    policy: Literal["fifo", "random", "priority-lifo"] = "fifo"
    max_reuse: int = knob(4, ge=0)  # a batch is trained on at most this many times; 0 = unlimited (DGL's code)
    # what an async rank's "epoch" is (README: async budgets):
    # "steps" (DGL, Belilovsky et al. 2020): every block makes its full budget of optimizer steps
    #   (epochs x batches per epoch, cascade budgets included) and steps its LR schedule on its own
    #   epochs; a slow block finishes later, and upstream keeps streaming fresh data (frozen blocks
    #   forward) until every rank is done; test accuracy is measured once, at the end
    # "upstream": a rank trains while its upstream streams; what it is too slow to take is dropped,
    #   its epochs follow upstream's: a slowdown costs updates, not time
    budget: Literal["steps", "upstream"] = "steps"
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


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    log: LogConfig = field(default_factory=LogConfig)
