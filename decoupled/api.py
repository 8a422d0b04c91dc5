"""The Python entry point, for notebooks and scripts: `decoupled.load_config` and `decoupled.train`.
The CLI (cli.py) is a thin layer over these two.

    import decoupled
    summary = decoupled.train("launch/configs/quickstart.toml", overrides=["train.epochs=1"], out="runs/nb")
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import to_toml_value
from .job import JobConfig, load


def load_config(config: str | os.PathLike | dict | JobConfig | None = None, overrides: list[str] | dict = (),
                base: JobConfig | None = None, validate: bool = True) -> JobConfig:
    """A validated JobConfig from a TOML file, a dict of [section] tables ({"model": {"name": "vgg"}}),
    a JobConfig (copied) or None (the defaults), then `overrides`: `--set` strings ["train.epochs=3"] or a
    dict {"train.epochs": 3}. Plug-in names are imported and checked here (docs/plugins.md)."""
    if isinstance(config, JobConfig):
        base, config = config, None
    if isinstance(overrides, dict):
        overrides = [f"{k}={to_toml_value(v)}" for k, v in overrides.items()]
    return load(config, list(overrides), base=base, validate_now=validate)


def train(config: str | os.PathLike | dict | JobConfig | None = None, overrides: list[str] | dict = (),
          out: str | os.PathLike | None = None, resume: bool | str = False) -> dict | None:
    """Train the job `config` (as load_config takes it, with `overrides`) into the run directory `out`
    (default runs/<timestamp>); returns the summary (summary.json's content), None on ranks other than 0.
    train.mode sync / async run on the ranks of an enclosing torchrun, or as a world of one."""
    cfg = load_config(config, overrides)
    from .run_job import train as run_job  # the engine: torch and the trainers, only once the config is valid
    return run_job(cfg, Path(out) if out is not None else None, resume=resume)
