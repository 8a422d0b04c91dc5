"""The machinery of a job's settings, as dataclasses that a TOML file and `--set section.key=value`
both fill. A leaf: it imports nothing else from the package.

schema.py: `knob`, ConfigError, the sections config/ owns and the base of a plug-in's settings
(`Choice`); parse.py: TOML / --set -> a job and back; rules.py: `validate`; applies.py: which keys
act on which job; reference.py: the key reference in docs/configuration.md. A typo is never silently
ignored: unknown sections and keys are errors that list the valid names, and every value is checked
before any process starts training. The job itself (JobConfig, `load`) is decoupled/job.py: it knows
the plug-ins.
"""
from .parse import parse, to_dict, to_toml, to_toml_value
from .rules import check_section, validate
from .schema import (FALLBACKS, Choice, ConfigError, DataConfig, DistConfig, LogConfig, ReplayConfig, Schema,
                     TrainConfig, knob)

__all__ = ["parse", "to_dict", "to_toml", "to_toml_value", "check_section", "validate", "FALLBACKS", "Choice",
           "ConfigError", "DataConfig", "DistConfig", "LogConfig", "ReplayConfig", "Schema", "TrainConfig", "knob"]
