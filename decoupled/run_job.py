"""One training job: config -> its trainer (TRAINERS[train.mode]) -> the run directory.

The run directory holds config.toml (resolved), metrics.jsonl, checkpoints/ and summary.json.
Single-process trainers run their loop here; sync and async run the same stages on torchrun ranks
(trainers/decoupled.py, engine/ranks/).
"""
from __future__ import annotations

from pathlib import Path

from .job import ConfigError, JobConfig
from .live import require_tensorboard
from .trainers import TRAINERS, modes
from .trainers.base import default_out

__all__ = ["default_out", "train"]


def train(cfg: JobConfig, out: Path | None = None, resume: bool | str = False) -> dict | None:
    """Run the job in `out` (default runs/<timestamp>); returns the summary on rank 0, None on others.

    resume: True continues from the last epoch every rank completed (an error if there is none);
    "auto" does the same but starts afresh when there is no checkpoint yet (torchrun restarts)."""
    require_tensorboard(cfg)  # before anything trains
    trainer = TRAINERS[cfg.train.mode]
    if resume and not trainer.resumable:
        raise ConfigError(f"--resume supports train.mode in {modes(lambda t: t.resumable)}, not {cfg.train.mode!r}")
    return trainer(cfg).run(out, resume)
