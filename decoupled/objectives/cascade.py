"""Marquez et al. 2018, cascade learning: cross-entropy through a dense output block, with the
epoch budget growing with depth (layer l trains i0 + k*l epochs). The trainers serve it cached
pseudo-inputs: a frozen block's outputs are computed once, not every epoch."""
from ..config import ObjectiveConfig, TrainConfig
from .base import Objective


class Cascade(Objective):
    default_head = "dense"

    @classmethod
    def epochs_for(cls, cfg: ObjectiveConfig, block: int, train: TrainConfig) -> int:
        return cfg.cascade_initial_epochs + cfg.cascade_epoch_increment * block
