"""The trainers, one class per train.mode: its declaration (modes.py: capabilities as class
attributes, keys, rules) with its loop (base.py). TRAINERS maps train.mode to its class."""
from ..modes import modes
from .base import Trainer
from .decoupled import Async, Sync
from .e2e import E2E
from .quicknet import QuickNet
from .sequential import Sequential
from .simultaneous import Simultaneous

TRAINERS: dict[str, type[Trainer]] = {t.mode: t for t in (E2E, Sequential, Simultaneous, QuickNet, Sync, Async)}


__all__ = ["TRAINERS", "Trainer", "modes"]
