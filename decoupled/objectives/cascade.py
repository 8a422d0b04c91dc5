"""Marquez et al. 2018, cascade learning: cross-entropy through a dense output block, with the
epoch budget growing with depth (layer l trains i0 + k*l epochs). The trainers serve it cached
pseudo-inputs: a frozen block's outputs are computed once, not every epoch."""
from dataclasses import dataclass

from ..config import TrainConfig, knob
from .base import Objective, ObjectiveConfig


class Cascade(Objective):
    @dataclass
    class Config(ObjectiveConfig):
        name: str = "cascade"
        # block j (0-based) trains cascade_initial_epochs + cascade_epoch_increment * j epochs.
        # Marquez 2018, Algorithm 1: layer l (1-based) trains `epochs + k * l`, so the paper's (epochs, k)
        # is cascade_initial_epochs = epochs + k, cascade_epoch_increment = k
        cascade_initial_epochs: int = knob(1, ge=1)
        cascade_epoch_increment: int = knob(1, ge=0)  # extra epochs per block of depth (see above)
        default_head = "dense"

    @classmethod
    def epochs_for(cls, cfg: Config, block: int, train: TrainConfig) -> int:
        return cfg.cascade_initial_epochs + cfg.cascade_epoch_increment * block
