"""The trainers, one class per train.mode, each declaring its capabilities as class attributes
(base.py). TRAINERS maps train.mode to its class: the one place a mode name is looked up."""
from typing import Callable

from .base import Trainer
from .decoupled import Async, Sync
from .e2e import E2E
from .quicknet import QuickNet
from .sequential import Sequential
from .simultaneous import Simultaneous

TRAINERS: dict[str, type[Trainer]] = {t.mode: t for t in (E2E, Sequential, Simultaneous, QuickNet, Sync, Async)}


def modes(has: Callable[[type[Trainer]], bool]) -> tuple[str, ...]:
    """The train.mode names whose trainer has a capability, e.g. modes(lambda t: t.resumable)."""
    return tuple(m for m, t in TRAINERS.items() if has(t))


__all__ = ["TRAINERS", "Trainer", "modes"]
