"""Every knob of a job, as dataclasses that a TOML file and `--set section.key=value` both fill.

A typo must never be silently ignored: unknown sections and keys are errors that list the
valid names, and `validate` checks every value before any process starts training.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """Bad configuration; the message names the field and how to fix it."""


DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
MODELS = ("mlp", "vgg", "resnet", "simcnn", "allcnn")
OBJECTIVES = ("khidden", "cascade", "quicknet", "predsim")
HEADS = ("", "khidden", "mlpsr", "dense", "predsim", "mixedpool")
MODES = ("e2e", "sequential", "simultaneous", "quicknet", "sync", "async")
DISTRIBUTED_MODES = ("sync", "async")
BACKENDS = ("auto", "gloo", "nccl")
POLICIES = ("fifo", "random", "priority-lifo")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")
CACHES = ("auto", "memory", "disk", "recompute")
BALANCES = ("remaining", "equal", "none")
FALLBACKS = ("confident", "last")
EARLY_STOP_MODES = ("e2e", "quicknet")


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = ""  # folder holding the dataset (torchvision layout); unused by digits/synthetic
    batch_size: int = 64
    eval_batch_size: int = 512
    limit_train: int = 0  # 0 = all; else a fixed seeded subset of this size
    limit_test: int = 0
    augment: bool = False  # CIFAR-style padded random crop + horizontal flip
    download: bool = False  # torchvision datasets only download when asked
    # synthetic generator: class-dependent Gaussian blobs of this shape
    synthetic_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    synthetic_classes: int = 10
    synthetic_train: int = 1024
    synthetic_test: int = 256


@dataclass
class ModelConfig:
    name: str = "mlp"
    widths: list[int] = field(default_factory=lambda: [150, 150, 150])  # mlp hidden widths
    hierarchy: list[int] = field(default_factory=lambda: [1, 1, 2, 2])  # vgg/resnet/simcnn stages
    channels: list[int] = field(default_factory=list)  # vgg: explicit channels per stage (else from width)
    width: int = 64  # base channels (vgg/resnet stage 0, simcnn M, allcnn 96 in the paper)
    blocks: int = 0  # decoupled blocks; 0 = one per layer / residual unit
    block_sizes: list[int] = field(default_factory=list)  # explicit units per block
    residual: str = "basic"  # resnet unit: basic | bottleneck
    batchnorm: bool = True
    dropout: float = 0.0
    stem_downsample: bool = False  # simcnn: invertible downsampling of the input


@dataclass
class ObjectiveConfig:
    name: str = "khidden"
    head: str = ""  # override the objective's head: khidden | mlpsr | dense | predsim
    k: int = 1  # k-hidden: k-1 auxiliary convs before average + linear
    aux_width: int = 128  # auxiliary conv / dense width
    head_batchnorm: bool = True
    cascade_initial_epochs: int = 1  # cascade: layer l trains initial + increment * l epochs
    cascade_epoch_increment: int = 1
    predsim_beta: float = 0.99  # predsim: weight of the similarity-matching term
    # quicknet: a sample is learned (and leaves the later blocks' data) when its exit's
    # normalised-entropy confidence >= this, its commitment logit > 0 and its prediction is right.
    # The paper gives no value; the exit curve sweeps the same rule at inference.
    quicknet_threshold: float = 0.95
    commit_hidden: int = 0  # quicknet commitment head hidden units; 0 = number of classes (the paper)
    quicknet_balance: str = "remaining"  # class weights of the draws: remaining | equal | none (objectives/quicknet.py)
    exit_fallback: str = "confident"  # early exit when no exit passes: most confident exit (paper) | last


@dataclass
class TrainConfig:
    mode: str = "simultaneous"
    epochs: int = 5
    seed: int = 0
    device: str = "auto"
    # sequential: frozen blocks' outputs (pseudo-inputs) are computed once and kept in memory or on
    # disk, or recomputed every epoch; auto = memory unless data.augment (augmented inputs change)
    cache: str = "auto"
    probe_epochs: int = 1  # e2e: epochs to fit each intermediate head on frozen features
    log_every: int = 50  # steps between metrics.jsonl lines
    eval_every: int = 1  # epochs between test evaluations (0 = only at the end)
    checkpoint: bool = True  # per-rank checkpoint at every epoch end
    keep_checkpoints: int = 3  # newest epochs kept per rank (0 = all)
    # e2e and quicknet (QuickNets appendix): the training loss is monitored per epoch; a block (or
    # the e2e network) stops after `patience` epochs without a new minimum (0 = train all epochs),
    # and its LR is multiplied by plateau_factor after plateau_patience epochs without one (1 = off)
    patience: int = 0
    plateau_factor: float = 1.0
    plateau_patience: int = 1


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: str = "constant"
    step_epochs: int = 15  # step schedule: decay every step_epochs epochs of a block
    gamma: float = 0.2  # step schedule factor (Belilovsky 2019: 0.2 every 15 epochs)
    block_lr_decay: float = 1.0  # block j uses lr * block_lr_decay**j


@dataclass
class DistConfig:
    backend: str = "auto"  # auto = nccl with cuda:LOCAL_RANK when CUDA is available, else gloo
    timeout_s: float = 300.0  # collective and point-to-point timeout
    placement: list[int] = field(default_factory=list)  # blocks per rank, contiguous; empty = even split
    max_inflight: int = 2  # isends a rank may have outstanding (2 = double buffering)
    debug_delay_ms: float = 0.0  # chaos testing: sleep U(0, this) ms before every step (seeded per rank)


@dataclass
class ReplayConfig:
    capacity: int = 4  # async: batches a rank keeps from its upstream
    policy: str = "fifo"  # fifo | random | priority-lifo
    max_reuse: int = 4  # a batch is trained on at most this many times


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)


# ---------------------------------------------------------------------------- parsing

def _sections() -> dict[str, type]:
    return typing.get_type_hints(JobConfig)


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(path: str, value, typ):
    """Check `value` against the dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list of {inner.__name__}, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, inner) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
        raise ConfigError(f"{path} must be {typ.__name__}, got {value!r}")
    return value


def _apply(cfg: JobConfig, section: str, key: str, value, where: str) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"unknown section [{section}] in {where}; valid sections: {', '.join(sections)}")
    types = _field_types(sections[section])
    if key not in types:
        raise ConfigError(f"unknown key {section}.{key} in {where}; valid keys of [{section}]: "
                          f"{', '.join(types)}")
    setattr(getattr(cfg, section), key, _coerce(f"{section}.{key}", value, types[key]))


def _parse_value(text: str):
    """`--set` values are TOML literals; a bare word is taken as a string (name=vgg)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return float(text)  # numbers TOML is stricter about, such as .001 or 1.
    except ValueError:
        return text


def load(path: str | os.PathLike | None = None, overrides: list[str] = (), base: JobConfig | None = None,
         validate_now: bool = True) -> JobConfig:
    """Defaults (or a copy of `base`), then the TOML file, then the `--set` overrides, then validation."""
    cfg = copy.deepcopy(base) if base is not None else JobConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            doc = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]; "
                                  f"valid sections: {', '.join(_sections())}")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    for item in overrides:
        name, eq, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not eq or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=3")
        _apply(cfg, section, key, _parse_value(text.strip()), "--set")
    if validate_now:
        validate(cfg)
    return cfg


# ---------------------------------------------------------------------------- validation

def _choice(path: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{path}={value!r} is not valid; choose one of: {', '.join(map(repr, choices))}")


def _positive(path: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: JobConfig) -> None:
    d, m, o, t, op = cfg.data, cfg.model, cfg.objective, cfg.train, cfg.optim
    _choice("data.name", d.name, DATASETS)
    _positive("data.batch_size", d.batch_size)
    _positive("data.eval_batch_size", d.eval_batch_size)
    _positive("data.limit_train", d.limit_train, allow_zero=True)
    _positive("data.limit_test", d.limit_test, allow_zero=True)
    if d.name not in ("digits", "synthetic"):
        if not d.root:
            raise ConfigError(f"data.root is empty but data.name={d.name!r} needs a dataset folder; "
                              f"set data.root (e.g. --set data.root=../shared/data)")
        if not Path(d.root).is_dir() and not d.download:
            raise ConfigError(f"data.root={d.root!r} does not exist; point data.root at the dataset "
                              f"folder or set data.download=true")
    if d.name == "synthetic":
        if len(d.synthetic_shape) not in (1, 3) or min(d.synthetic_shape) <= 0:
            raise ConfigError(f"data.synthetic_shape={d.synthetic_shape} must be [features] or [C,H,W] "
                              "with positive sizes")
        _positive("data.synthetic_classes", d.synthetic_classes)
        _positive("data.synthetic_train", d.synthetic_train)
        _positive("data.synthetic_test", d.synthetic_test)

    _choice("model.name", m.name, MODELS)
    if m.name == "mlp" and (not m.widths or min(m.widths) <= 0):
        raise ConfigError(f"model.widths={m.widths} must be a non-empty list of positive widths")
    if m.name in ("vgg", "resnet", "simcnn") and (not m.hierarchy or min(m.hierarchy) <= 0):
        raise ConfigError(f"model.hierarchy={m.hierarchy} must be a non-empty list of positive "
                          "layer counts, e.g. [1,1,2,2]")
    _positive("model.width", m.width)
    _positive("model.blocks", m.blocks, allow_zero=True)
    if m.block_sizes and min(m.block_sizes) <= 0:
        raise ConfigError(f"model.block_sizes={m.block_sizes} must hold positive unit counts")
    _choice("model.residual", m.residual, ("basic", "bottleneck"))
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")

    _choice("objective.name", o.name, OBJECTIVES)
    _choice("objective.head", o.head, HEADS)
    if not 0.0 <= o.quicknet_threshold <= 1.0:
        raise ConfigError(f"objective.quicknet_threshold={o.quicknet_threshold} must be in [0, 1] "
                          "(a normalised-entropy confidence)")
    _positive("objective.commit_hidden", o.commit_hidden, allow_zero=True)
    _choice("objective.quicknet_balance", o.quicknet_balance, BALANCES)
    _choice("objective.exit_fallback", o.exit_fallback, FALLBACKS)
    if t.mode == "quicknet" and o.name != "quicknet":
        raise ConfigError(f"train.mode='quicknet' needs objective.name='quicknet' (got {o.name!r}): it trains "
                          "exit and commitment heads")
    if o.name == "quicknet" and t.mode == "sequential":
        raise ConfigError("objective.name='quicknet' with train.mode='sequential' would train every block on "
                          "all samples and never its commitment head; use train.mode='quicknet'")
    if (o.name == "predsim") != (o.head == "predsim") and o.head:
        raise ConfigError(f"objective.head={o.head!r} does not fit objective.name={o.name!r}: only predsim "
                          "has (and needs) the similarity branch; leave objective.head empty")
    _positive("objective.k", o.k)
    _positive("objective.aux_width", o.aux_width)
    if (o.head or ("dense" if o.name == "cascade" else "")) == "dense" and o.aux_width < 2:
        raise ConfigError(f"objective.aux_width={o.aux_width} is too small for the dense output block "
                          "(n -> n/2 -> classes); use at least 2")
    _positive("objective.cascade_initial_epochs", o.cascade_initial_epochs)
    _positive("objective.cascade_epoch_increment", o.cascade_epoch_increment, allow_zero=True)
    if not 0.0 <= o.predsim_beta <= 1.0:
        raise ConfigError(f"objective.predsim_beta={o.predsim_beta} must be in [0, 1]")

    _choice("train.mode", t.mode, MODES)
    _positive("train.epochs", t.epochs)
    _choice("train.device", t.device, DEVICES)
    _choice("train.cache", t.cache, CACHES)
    _positive("train.probe_epochs", t.probe_epochs, allow_zero=True)
    _positive("train.log_every", t.log_every)
    _positive("train.eval_every", t.eval_every, allow_zero=True)
    _positive("train.keep_checkpoints", t.keep_checkpoints, allow_zero=True)
    _positive("train.patience", t.patience, allow_zero=True)
    _positive("train.plateau_factor", t.plateau_factor)
    _positive("train.plateau_patience", t.plateau_patience, allow_zero=True)
    if t.plateau_factor > 1.0:
        raise ConfigError(f"train.plateau_factor={t.plateau_factor} must be in (0, 1]; 1 = no plateau decay")
    if (t.patience or t.plateau_factor < 1.0) and t.mode not in EARLY_STOP_MODES:
        raise ConfigError(f"train.patience / train.plateau_factor (early stopping) apply to train.mode in "
                          f"{EARLY_STOP_MODES}, not {t.mode!r}; leave them at 0 / 1.0")
    if t.plateau_factor < 1.0 and op.schedule != "constant":
        raise ConfigError(f"train.plateau_factor={t.plateau_factor} decays the LR on plateau; it cannot be "
                          f"combined with optim.schedule={op.schedule!r}; use optim.schedule='constant'")
    if d.augment and t.cache in ("memory", "disk"):
        raise ConfigError(f"train.cache={t.cache!r} freezes one augmented view of the data; with "
                          "data.augment=true use train.cache='recompute' (or 'auto')")

    _choice("optim.name", op.name, OPTIMIZERS)
    _positive("optim.lr", op.lr)
    _positive("optim.momentum", op.momentum, allow_zero=True)
    _positive("optim.weight_decay", op.weight_decay, allow_zero=True)
    _choice("optim.schedule", op.schedule, SCHEDULES)
    _positive("optim.step_epochs", op.step_epochs)
    _positive("optim.gamma", op.gamma)
    _positive("optim.block_lr_decay", op.block_lr_decay)

    _choice("dist.backend", cfg.dist.backend, BACKENDS)
    _positive("dist.timeout_s", cfg.dist.timeout_s)
    if cfg.dist.placement and min(cfg.dist.placement) <= 0:
        raise ConfigError(f"dist.placement={cfg.dist.placement} must hold a positive block count per rank")
    _positive("dist.max_inflight", cfg.dist.max_inflight)
    _positive("dist.debug_delay_ms", cfg.dist.debug_delay_ms, allow_zero=True)
    _positive("replay.capacity", cfg.replay.capacity)
    _choice("replay.policy", cfg.replay.policy, POLICIES)
    _positive("replay.max_reuse", cfg.replay.max_reuse)


# ---------------------------------------------------------------------------- output

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: JobConfig) -> str:
    """The resolved config; `load` of this text gives back an equal JobConfig."""
    lines = []
    for section in _sections():
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def to_dict(cfg: JobConfig) -> dict:
    return dataclasses.asdict(cfg)
