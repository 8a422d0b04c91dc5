"""Marquez et al. 2018, cascade learning: cross-entropy through a dense output block, with the
epoch budget growing with depth (layer l trains i0 + k*l epochs). The trainers serve it cached
pseudo-inputs: a frozen block's outputs are computed once, not every epoch."""
from ..config import TrainConfig
from .base import Objective


class Cascade(Objective):
    default_head = "dense"

    def epochs_for(self, block: int, train: TrainConfig) -> int:
        return self.cfg.cascade_initial_epochs + self.cfg.cascade_epoch_increment * block
