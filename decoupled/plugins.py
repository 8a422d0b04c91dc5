"""Plug-ins from user code: a model, an objective or a dataset named by where its code lives.

A plug-in name is either an import path ``"package.module:attr"`` (the module must be importable: on
sys.path, or on PYTHONPATH for torchrun's workers), or a bare name an installed distribution registers
as an entry point in one of GROUPS (``pip install my-plugin`` makes ``model.name = "mynet"`` valid).
Built-in names are looked up first, so a plug-in never shadows one.

Note [plug-ins validated at load]: the config check resolves every plug-in name (import, attribute,
signature) while the config is loaded, so a bad name fails before any rank starts, with the key and
the import or signature problem in the message; every rank loads the config itself, so every rank
imports the same module, and the run's summary records which file and its hash (`fingerprint`;
decoupled/job.py: plugin_code).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
from pathlib import Path
from typing import Any

from .config import ConfigError

# kind -> (config key, entry-point group)
KINDS = {"model": ("model.name", "decoupled.models"), "objective": ("objective.name", "decoupled.objectives"),
         "dataset": ("data.name", "decoupled.datasets")}


class PluginError(ConfigError):
    """A plug-in name that does not resolve to usable code; the message names the key and the problem."""


def is_import_path(name: str) -> bool:
    return ":" in name


def entry_points(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    """The installed distributions' entry points of `group`, by name (tests monkeypatch this table)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def _import(key: str, name: str) -> Any:
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise PluginError(f"{key}={name!r} is not an import path; write it as \"package.module:attr\"")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported, with its type
        raise PluginError(f"{key}={name!r}: cannot import module {module!r} ({type(e).__name__}: {e}); put the "
                          "folder that holds it on PYTHONPATH (every rank imports it) or install it") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = getattr(obj, "__file__", None) or getattr(obj, "__name__", repr(obj))
            raise PluginError(f"{key}={name!r}: {where} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _entry_point(key: str, group: str, name: str) -> Any | None:
    ep = entry_points(group).get(name)
    if ep is None:
        return None
    try:
        return ep.load()
    except Exception as e:  # noqa: BLE001 - a broken installed plug-in: say which entry point and why
        raise PluginError(f"{key}={name!r}: the entry point {ep.value!r} (group {group!r}) fails to load "
                          f"({type(e).__name__}: {e})") from None


def resolve(kind: str, name: str) -> Any | None:
    """The object a plug-in name points to; None when `name` is neither an import path nor a registered
    entry point (the caller then reports it as unknown, with the valid names)."""
    key, group = KINDS[kind]
    return _import(key, name) if is_import_path(name) else _entry_point(key, group, name)


def check_callable(kind: str, name: str, fn: Any, call: str, nargs: int) -> None:
    """`fn` can be called with `nargs` positional arguments, as the engine calls it (`call`)."""
    key = KINDS[kind][0]
    if not callable(fn):
        raise PluginError(f"{key}={name!r} is {type(fn).__name__} {fn!r}, not a function; it must be {call}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: it is called and fails there if wrong
        return
    try:
        sig.bind(*range(nargs))
    except TypeError as e:
        raise PluginError(f"{key}={name!r}: {getattr(fn, '__qualname__', fn)}{sig} cannot be called as {call} "
                          f"({e})") from None


def fingerprint(obj: Any) -> dict:
    """Which code a plug-in is: its module, source file and the file's SHA-256 (summary.json)."""
    module = inspect.getmodule(obj)
    path = getattr(module, "__file__", None)
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None
    return {"module": getattr(module, "__name__", None), "file": path, "sha256": sha}


def check_same_code(per_rank: list[dict]) -> None:
    """Every rank imported the same plug-in code (Note [plug-ins validated at load]); else a ConfigError
    naming the key and the ranks' files, raised alike on every rank."""
    for key, mine in per_rank[0].items():
        other = next((r for r, c in enumerate(per_rank) if c.get(key) != mine), None)
        if other is not None:
            raise PluginError(f"{key}: rank 0 imports {mine} but rank {other} imports {per_rank[other].get(key)}; "
                              "give every rank the same plug-in code (the same PYTHONPATH or installed version)")
