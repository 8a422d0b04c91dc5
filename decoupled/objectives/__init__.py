"""Local objectives. A new objective is one file plus one line in OBJECTIVES.

Each entry is a spec: the Objective class (head, loss, epoch budget; its settings are its nested
`Config` dataclass: the [objective] keys it has) and the optional capabilities it brings, declared
here and never probed: `build_router` for an objective that passes on only the
samples it has not learned (QuickNets), called by the stage with
(objective, cfg, block, lr, class_counts).
An objective plug-in (decoupled/plugins.py) is a subclass of the public `Objective`; `spec_for` gives
its spec (no router: only built-ins route).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import TrainConfig
from ..plugins import PluginError, resolve
from .base import LocalOutput, Objective, ObjectiveConfig
from .cascade import Cascade
from .khidden import KHidden
from .predsim import PredSim
from .quicknet import QuickNet
from .router import LearnedSampleRouter


@dataclass(frozen=True)
class ObjectiveSpec:
    objective: type[Objective]
    build_router: Callable | None = None  # routes samples between blocks (objectives/router.py)

    @property
    def Config(self) -> type[ObjectiveConfig]:  # noqa: N802 (a type, named as one)
        return self.objective.Config

    def epochs_for(self, cfg: ObjectiveConfig, block: int, train: TrainConfig) -> int:
        """Block `block`'s epoch budget, known to every rank without building its head."""
        return self.objective.epochs_for(cfg, block, train)


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "khidden": ObjectiveSpec(KHidden),
    "cascade": ObjectiveSpec(Cascade),
    "predsim": ObjectiveSpec(PredSim),
    "quicknet": ObjectiveSpec(QuickNet, build_router=LearnedSampleRouter),
}


def spec_for(name: str) -> ObjectiveSpec | None:
    """The spec objective.name names: built-in or a plug-in class (import path or entry point); None when
    it is neither. A plug-in that is not an Objective subclass raises, naming objective.name."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    cls = resolve("objective", name)
    if cls is None:
        return None
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise PluginError(f"objective.name={name!r} is {cls!r}, not a subclass of decoupled.objectives.Objective; "
                          "subclass it (override loss(h, logits, y, mask), default_head or epochs_for)")
    return ObjectiveSpec(cls)


def objective_spec(name: str) -> ObjectiveSpec:
    """spec_for of a validated config's objective.name (the config check rejected unknown names)."""
    spec = spec_for(name)
    if spec is None:
        raise PluginError(f"objective.name={name!r} is unknown; choose one of {sorted(OBJECTIVES)} or a plug-in "
                          "\"package.module:ClassName\"")
    return spec


def build_objective(cfg: ObjectiveConfig, in_shape, num_classes: int) -> Objective:
    return objective_spec(cfg.name).objective(cfg, in_shape, num_classes)


__all__ = ["LocalOutput", "Objective", "ObjectiveConfig", "ObjectiveSpec", "OBJECTIVES", "build_objective",
           "objective_spec", "spec_for"]
