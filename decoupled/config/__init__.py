"""Every knob of a job, as dataclasses that a TOML file and `--set section.key=value` both fill.

schema.py: the fields and their rules; parse.py: TOML / --set -> JobConfig and back; rules.py:
`validate`. A typo is never silently ignored: unknown sections and keys are errors that list the
valid names, and every value is checked before any process starts training.
"""
from .parse import load, to_dict, to_toml
from .rules import validate
from .schema import (FALLBACKS, ConfigError, DataConfig, DistConfig, JobConfig, ModelConfig, ObjectiveConfig,
                     OptimConfig, ReplayConfig, TrainConfig, registry_names)

__all__ = ["load", "to_dict", "to_toml", "validate", "FALLBACKS", "ConfigError", "DataConfig", "DistConfig",
           "JobConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "ReplayConfig", "TrainConfig",
           "registry_names"]
