"""Belilovsky et al. 2019: cross-entropy through a k-hidden-layer auxiliary CNN."""
from .base import Objective


class KHidden(Objective):
    """Objective.Config's keys, its default head."""
