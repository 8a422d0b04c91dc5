"""Atomic checkpoints: write to a temp file in the same folder, fsync, rename.

A crash mid-write, a full disk or a permission error leaves the previous checkpoint intact.

Checkpoints hold plain data only: tensors, numbers, strings, bools, None and lists, tuples and dicts
of them (RNG states are uint8 tensors, counters ints). `save` refuses anything else and `load` reads
with torch.load(weights_only=True), so a run directory on a shared filesystem cannot make the ranks
that resume from it run code: a file holding a pickled Python object is refused, naming the file.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from .config.schema import ConfigError


class CheckpointError(RuntimeError):
    pass


class UnsafeCheckpointError(CheckpointError, ConfigError):
    """A checkpoint file holds more than plain data (a pickled Python object): refused unread. Not a
    damaged file to skip (writes are atomic, and an older epoch of the same folder deserves no more
    trust): resuming stops, and the CLI reports it as a config error (the run directory is the input)."""


_SCALARS = (int, float, bool, str, type(None))
_TENSORS = (torch.Tensor, torch.nn.Parameter)


def check_plain(obj, where: str = "state") -> None:
    """Raise TypeError naming the first value of `obj` (at `where`) that is not plain checkpoint data:
    a tensor, number, string, bool, None, or a list, tuple or dict (keys: str / int) of them."""
    kind = type(obj)
    if kind in _SCALARS or kind in _TENSORS:
        return
    if kind in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    if kind in (dict, OrderedDict):  # OrderedDict: what nn.Module.state_dict returns
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"checkpoint state {where} has a key of type {type(k).__name__} ({k!r}); "
                                "keys must be strings or ints")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"checkpoint state {where} is a {kind.__module__}.{kind.__qualname__}; a checkpoint holds "
                    "only tensors, numbers, strings, bools, None and lists/tuples/dicts of them (convert it "
                    "in its state_dict: RNG states to tensors, counters to ints, a config to its TOML text)")


def save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    check_plain(obj)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {e}; the previous checkpoint is intact") from e


def load(path: str | os.PathLike, map_location=None):
    """The checkpoint's state, read as plain data only (torch.load weights_only=True). A file that asks
    for any other Python object is refused without building it: UnsafeCheckpointError names the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # refused for naming a Python object (a GLOBAL) or building one; any other refusal ("Unsupported
        # operand": a zero-filled or garbage file) is damage, reported and skipped by try_load
        if not any(m in str(e) for m in ("GLOBAL", "Can only build", "Can only create new object")):
            raise
        asks = re.search(r"GLOBAL (\S+)", str(e))  # torch's own advice (allowlist it) is not ours
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds a pickled Python object, not only tensors and plain values, and was "
            f"refused without loading it{f' (it asks for {asks[1]})' if asks else ''}. It was not written by this "
            "version of decoupled (whose checkpoints are plain data): do not resume from or evaluate a "
            "run directory you do not trust; delete the file or start the run afresh") from None


def path(run_dir: str | os.PathLike, rank: int, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"rank{rank}-epoch{epoch}.pt"


def epochs(run_dir: str | os.PathLike, rank: int) -> list[int]:
    """Epochs (0-based) for which `rank` has a complete checkpoint, ascending."""
    folder = Path(run_dir) / "checkpoints"
    prefix = f"rank{rank}-epoch"
    found = [int(p.name[len(prefix):-3]) for p in folder.glob(f"{prefix}*.pt")] if folder.is_dir() else []
    return sorted(found)


def prune(run_dir: str | os.PathLike, rank: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints of a rank (0 = keep all): enough for ranks of an async run
    to find an epoch they all completed."""
    if keep:
        for e in epochs(run_dir, rank)[:-keep]:
            path(run_dir, rank, e).unlink(missing_ok=True)


class Checkpointer:
    """One rank's checkpoints in a run directory. It owns the policy: `save` decides whether to write
    (train.checkpoint on and a run directory to write to) and prunes to the newest `keep`; the
    training loops just call it at every epoch end."""

    def __init__(self, run_dir: Path | None, rank: int, enabled: bool, keep: int):
        self.run_dir, self.rank, self.enabled, self.keep = run_dir, rank, enabled, keep

    def save(self, epoch: int, state) -> None:
        """`state`: the object to write, or a callable that makes it (only called when saving)."""
        if not self.enabled or self.run_dir is None:
            return
        save(state() if callable(state) else state, path(self.run_dir, self.rank, epoch))
        prune(self.run_dir, self.rank, keep=self.keep)

    def epochs(self) -> list[int]:
        return epochs(self.run_dir, self.rank) if self.run_dir is not None else []

    def load(self, epoch: int, map_location=None):
        return load(path(self.run_dir, self.rank, epoch), map_location=map_location)

    def usable_for(self, epoch: int, frozen_after: int) -> int | None:
        """The checkpoint that resumes this rank after `epoch`: that epoch's, or, once every block
        of the rank is frozen (its budgets end with epoch `frozen_after`), any later one up to
        `epoch`, since a frozen rank's state no longer changes. That is what lets an async
        cascade resume although its early ranks stopped (and pruned) long before the last."""
        done = self.epochs()
        if epoch in done:
            return epoch
        frozen = [c for c in done if frozen_after <= c <= epoch]
        return max(frozen) if frozen else None

    def try_load(self, epoch: int, map_location=None):
        """(state, None), or (None, why) when the file does not load (truncated, damaged). A file that
        holds a pickled object (UnsafeCheckpointError) is not skipped: it raises, naming the file."""
        p = path(self.run_dir, self.rank, epoch)
        try:
            return load(p, map_location=map_location), None
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported and skipped
            return None, f"checkpoint {p} does not load ({type(e).__name__}: {e})"
