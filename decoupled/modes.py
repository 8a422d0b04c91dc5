"""What each train.mode is, known before anything is built: its capabilities, the mode-dependent
keys it reads, and its rules on the job (`check`). The trainers (decoupled/trainers/) are these
classes with their loops added; MODES maps train.mode to the declaration, TRAINERS to the trainer.

The job's validation asks MODES, not TRAINERS: the trainers import the engine, which imports the
job's config, so the job cannot import them back (no cycle).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, ClassVar

from .config import ConfigError
from .config.applies import set_keys
from .config.schema import DistConfig, ReplayConfig, replicated, split_layout_check

E2E_KEYS = frozenset({"train.probe_epochs", "train.e2e_loss", "train.activation_checkpointing"})
CACHE = frozenset({"train.cache"})  # frozen upstream outputs kept (or recomputed)
# activations' dtype between blocks: on the wire, and at the block boundaries of the single-process
# modes (so that sync equals simultaneous); end-to-end backprop has no boundary
BOUNDARY = frozenset({"dist.wire_dtype"})
REPLICAS = frozenset({"dist.replicas"})  # stage groups: the two engines and their reference


class Mode:
    mode: ClassVar[str]  # its train.mode
    distributed: ClassVar[bool] = False  # torchrun ranks (engine/ranks/); else one process
    resumable: ClassVar[bool] = False  # --resume continues from its checkpoints
    replicas: ClassVar[bool] = False  # dist.replicas: stage groups of several ranks (or their reference)
    plateau: ClassVar[bool] = False  # train.plateau_factor: LR decay on a plateau of the monitored loss
    early_stopping: ClassVar[bool] = False  # train.patience: a block (or the e2e network) stops early
    end_to_end: ClassVar[bool] = False  # one network, one loss: no block boundary (flops.train_flops)
    # train.eval_every_steps: its loop scores the network between the batches of an epoch (Note
    # [mid-epoch evaluation] in engine/evaluate.py); the greedy modes train block after block, so a
    # source step is no point in the network's training
    mid_epoch_eval: ClassVar[bool] = False
    # the mode-dependent keys it reads: set under another mode they are noted, not refused (users
    # flip train.mode on one config)
    keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def reads(cls, cfg) -> frozenset[str]:
        """The mode-dependent keys that act on this job."""
        return cls.keys

    @classmethod
    def check(cls, cfg) -> None:
        """This mode's rules on the job: a clear error before any rank trains, notices for keys it ignores."""
        t = cfg.train
        if t.patience and not cls.early_stopping:
            raise ConfigError(f"train.patience={t.patience} (early stopping) applies to train.mode in "
                              f"{modes(lambda m: m.early_stopping)}, not {t.mode!r}: the other modes train every "
                              "block to its epoch budget; leave it at 0")
        if t.plateau_factor < 1.0 and not cls.plateau:
            raise ConfigError(f"train.plateau_factor={t.plateau_factor} (LR decay on a plateau of each block's "
                              f"monitored loss) applies to train.mode in {modes(lambda m: m.plateau)}, not "
                              f"{t.mode!r}: across ranks a block's validation loss needs an extra pass through the "
                              "pipeline, which the engine does not make; use train.mode='simultaneous' (sync "
                              "equals it) or leave it at 1.0")
        if t.eval_every_steps and not cls.mid_epoch_eval:
            raise ConfigError(f"train.eval_every_steps={t.eval_every_steps} (test evaluations inside an epoch) applies "
                              f"to train.mode in {modes(lambda m: m.mid_epoch_eval)}, not {t.mode!r}: it trains block "
                              "after block, so a source step is no point of the network's training; leave it at 0")
        if cfg.dist.sync_bn and not (cls.distributed and replicated(cfg.dist)):
            raise ConfigError(f"dist.sync_bn={cfg.dist.sync_bn!r} does nothing here: it applies to train.mode in "
                              f"{modes(lambda m: m.distributed)} with dist.replicas (a group of more than one "
                              "rank); remove it (or choose what it applies to)")
        if cls.replicas and replicated(cfg.dist):
            cls.check_replicas(cfg)
        cls.note_ignored(cfg)

    @classmethod
    def check_replicas(cls, cfg) -> None:
        """Stage groups (dist.replicas): what can be checked before the world size is known."""
        d = cfg.dist
        if d.replicas == "auto" and not d.placement:
            raise ConfigError("dist.replicas='auto' chooses replica counts from measured block times for a split: "
                              "set dist.placement='auto' (or a list of blocks per group)")
        if isinstance(d.placement, list) and d.placement and isinstance(d.replicas, list) \
                and len(d.placement) != len(d.replicas):
            raise ConfigError(f"dist.placement={d.placement} and dist.replicas={d.replicas} must have one entry "
                              "per stage group each (blocks per group, ranks per group)")
        if d.replica_batch == "split" and isinstance(d.replicas, list):
            split_layout_check(d.replicas)  # routing objectives: refused with any replicas (job.py)

    @classmethod
    def note_ignored(cls, cfg) -> None:
        """A set mode-dependent key this mode does not read: one line on stderr naming who reads it."""
        acts = cls.reads(cfg)
        for key in set_keys(cfg):
            if key in MODE_KEYS and key not in acts:
                users = modes(lambda m: key in m.keys)
                what = f"train.mode={users[0]!r}" if len(users) == 1 else f"train.mode in {users}"
                section, name = key.split(".")
                print(f"notice: {key}={getattr(getattr(cfg, section), name)!r} applies to {what}; ignored with "
                      f"train.mode={cfg.train.mode!r}", file=sys.stderr)


class E2E(Mode):
    mode = "e2e"
    plateau = early_stopping = end_to_end = mid_epoch_eval = True
    keys = E2E_KEYS


class Sequential(Mode):
    mode = "sequential"
    plateau = True
    keys = CACHE | BOUNDARY

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.objective.name == "quicknet":
            raise ConfigError("objective.name='quicknet' with train.mode='sequential' would train every block on "
                              "all samples and never its commitment head; use train.mode='quicknet'")
        super().check(cfg)


class Simultaneous(Mode):
    mode = "simultaneous"
    plateau = resumable = replicas = mid_epoch_eval = True
    keys = BOUNDARY | REPLICAS | {"dist.placement"}

    @classmethod
    def reads(cls, cfg) -> frozenset[str]:
        """dist.placement only with dist.replicas: the blocks-to-groups split its replicas accumulate over."""
        return cls.keys if replicated(cfg.dist) else cls.keys - {"dist.placement"}

    @classmethod
    def check_replicas(cls, cfg) -> None:
        super().check_replicas(cfg)
        d = cfg.dist
        if "auto" in (d.replicas, d.placement):
            raise ConfigError(f"train.mode='simultaneous' with dist.replicas={d.replicas!r} and dist.placement="
                              f"{d.placement!r}: the reference needs the groups spelled out; give dist.replicas and "
                              "dist.placement as lists (the plan a sync run printed)")


class QuickNet(Mode):
    mode = "quicknet"
    plateau = early_stopping = True
    keys = CACHE | BOUNDARY

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.objective.name != "quicknet":
            raise ConfigError(f"train.mode='quicknet' needs objective.name='quicknet' (got {cfg.objective.name!r}): "
                              "it trains exit and commitment heads")
        super().check(cfg)


# the engine across ranks reads every [dist] key but those refused where they do nothing (check,
# config/applies.py: dist.max_stage_mem_mb acts with dist.placement="auto", dist.sync_bn,
# dist.replica_batch and dist.allreduce_bucket_mb with replicas)
ACROSS_RANKS = frozenset(f"dist.{f.name}" for f in dataclasses.fields(DistConfig)
                         if f.name not in ("max_stage_mem_mb", "link_mbps", "sync_bn", "replica_batch",
                                           "allreduce_bucket_mb"))


class Sync(Mode):
    mode = "sync"
    distributed = resumable = replicas = mid_epoch_eval = True
    keys = ACROSS_RANKS


class Async(Sync):
    mode = "async"
    keys = ACROSS_RANKS | CACHE | {f"replay.{f.name}" for f in dataclasses.fields(ReplayConfig)}

    @classmethod
    def check(cls, cfg) -> None:
        r = cfg.replay
        if r.capacity_mb and r.capacity != ReplayConfig().capacity:  # note [replay bound] (engine/ranks/replay.py)
            raise ConfigError(f"replay.capacity={r.capacity} with replay.capacity_mb={r.capacity_mb:g}: the buffer is "
                              "bounded by a count of batches or, with replay.capacity_mb > 0, by bytes instead; set "
                              "one of them (replay.capacity_mb=0 for the count)")
        super().check(cfg)

    @classmethod
    def check_replicas(cls, cfg) -> None:
        if cfg.dist.replica_batch == "split":
            raise ConfigError("dist.replica_batch='split' with train.mode='async': a replica would have to wait for "
                              "its share of every batch from each upstream replica, which async never does; async "
                              "replicas take alternate batches (dist.replica_batch='alternate'); use train.mode="
                              "'sync' to split batches")
        if cfg.replay.budget != "steps":
            raise ConfigError(f"dist.replicas={cfg.dist.replicas} with replay.budget={cfg.replay.budget!r}: replicas "
                              "average their gradients every step, so they must make the same number of steps, which "
                              "only replay.budget='steps' guarantees; use replay.budget='steps' (the default)")
        super().check_replicas(cfg)


MODES: dict[str, type[Mode]] = {m.mode: m for m in (E2E, Sequential, Simultaneous, QuickNet, Sync, Async)}
MODE_KEYS = frozenset().union(*(m.keys for m in MODES.values()))


def modes(has: Callable[[type[Mode]], bool]) -> tuple[str, ...]:
    """The train.mode names whose declaration has a capability, e.g. modes(lambda m: m.resumable)."""
    return tuple(m for m, cls in MODES.items() if has(cls))
