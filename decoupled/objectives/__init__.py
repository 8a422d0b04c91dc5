"""Local objectives. A new objective is one file plus one line in OBJECTIVES."""
from ..config import ObjectiveConfig
from .base import LocalOutput, Objective
from .cascade import Cascade
from .khidden import KHidden
from .predsim import PredSim
from .quicknet import QuickNet

OBJECTIVES: dict[str, type[Objective]] = {
    "khidden": KHidden,
    "cascade": Cascade,
    "predsim": PredSim,
    "quicknet": QuickNet,
}


def build_objective(cfg: ObjectiveConfig, in_shape, num_classes: int) -> Objective:
    return OBJECTIVES[cfg.name](cfg, in_shape, num_classes)


__all__ = ["LocalOutput", "Objective", "OBJECTIVES", "build_objective"]
