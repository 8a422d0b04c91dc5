"""The single-process trainers, one file each; a loop only decides the order of work (the stage
trains, the Run logs, evaluates and checkpoints). LOOPS maps train.mode to its loop."""
from .e2e import train_e2e
from .quicknet import train_quicknet
from .sequential import train_sequential
from .simultaneous import train_simultaneous

LOOPS = {"e2e": train_e2e, "sequential": train_sequential, "simultaneous": train_simultaneous,
         "quicknet": train_quicknet}

__all__ = ["LOOPS", "train_e2e", "train_quicknet", "train_sequential", "train_simultaneous"]
