"""Local objectives. A new objective is one file plus one line in OBJECTIVES.

Each entry is a spec: the Objective class (head, loss, epoch budget; its settings are its nested
`Config` dataclass: the [objective] keys it has) and the optional capabilities it brings, declared
here and never probed: `build_router` for an objective that passes on only the
samples it has not learned (QuickNets), called by the stage with
(objective, cfg, block, lr, class_counts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import TrainConfig
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


def build_objective(cfg: ObjectiveConfig, in_shape, num_classes: int) -> Objective:
    return OBJECTIVES[cfg.name].objective(cfg, in_shape, num_classes)


__all__ = ["LocalOutput", "Objective", "ObjectiveConfig", "ObjectiveSpec", "OBJECTIVES", "build_objective"]
