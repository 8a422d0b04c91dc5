"""The data-parallel rows' own settings (bench/strategies.py): bench flags, not job config keys, since
a job that `decoupled train` runs has no DDP bucket, compressor or averager to set. cli.py reads them
(`--bucket-mb`, `--powersgd-rank`, ...), rows.py hands each row's worker the ones its strategy reads,
and `--tune` sweeps one of them by its flag's name (tune.py), e.g. `--tune powersgd-rank=1,2,4`.

Every value is checked here, so bad input stops the bench before anything runs, with the flag named.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from ..config import ConfigError


def _knob(default, kind: type, low: float, strict: bool, help: str):
    """A knob's default, its type, its lower bound (`strict`: the value must exceed it) and its help."""
    return field(default=default, metadata={"kind": kind, "low": low, "strict": strict, "help": help})


@dataclass(frozen=True)
class Knobs:
    # None: torch's own default, 25 MiB buckets after a first one of 1 MiB (DDP shrinks only the first
    # bucket when bucket_cap_mb is not given, so passing 25 would change the first bucket: the ddp row
    # kept its buckets by not passing it)
    bucket_mb: float | None = _knob(None, float, 0.0, True,
                                    "DDP's bucket_cap_mb in MiB for ddp, ddp-bf16, ddp-powersgd and localsgd (default: "
                                    "torch's, 25 MiB after a first bucket of 1 MiB)")
    powersgd_rank: int = _knob(4, int, 1, False,
                               "ddp-powersgd: PowerSGD's matrix_approximation_rank (default 4)")
    # torch refuses a start below 2 with error feedback or warm start: DDP rebuilds its buckets after the
    # first iteration, and the error and P / Q memories are kept per bucket
    powersgd_start: int = _knob(2, int, 2, False,
                                "ddp-powersgd: start_powerSGD_iter, the optimizer steps all-reduced exactly before "
                                "compression starts (>= 2: torch's least with error feedback and warm start; "
                                "default 2)")
    localsgd_period: int = _knob(16, int, 1, False,
                                 "localsgd: PeriodicModelAverager's period, optimizer steps between averagings of "
                                 "the ranks' models (default 16)")
    localsgd_warmup: int = _knob(0, int, 0, False,
                                 "localsgd: start_localSGD_iter = the averager's warmup_steps, optimizer steps with "
                                 "all-reduced gradients before local steps start (default 0)")


FIELDS = {f.name: f for f in dataclasses.fields(Knobs)}


def flag(name: str) -> str:
    """The bench flag of a Knobs field: bucket_mb -> --bucket-mb."""
    return "--" + name.replace("_", "-")


def field_of(key: str) -> str | None:
    """The Knobs field a flag's name (`powersgd-rank`, `--powersgd-rank`, `powersgd_rank`) names; None if none."""
    name = key.strip().lstrip("-").replace("-", "_")
    return name if name in FIELDS else None


def parse(name: str, text: str):
    """A knob's value from its text, checked; bad input is a ConfigError naming the flag."""
    meta = FIELDS[name].metadata
    kind, low, strict = meta["kind"], meta["low"], meta["strict"]
    try:
        value = kind(text)
        if not math.isfinite(value):
            raise ValueError(text)
    except ValueError:
        what = "an integer" if kind is int else "a finite number"
        raise ConfigError(f"bench {flag(name)} {text!r}: expected {what}; {meta['help']}") from None
    if value < low or (strict and value == low):
        raise ConfigError(f"bench {flag(name)} {text}: must be {'>' if strict else '>='} {low:g}; {meta['help']}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every knob as a flag (text: parsed and checked by `from_args`, so errors name the flag)."""
    for name, f in FIELDS.items():
        parser.add_argument(flag(name), dest=name, metavar="V", help=f.metadata["help"])


def from_args(args: argparse.Namespace) -> Knobs:
    """The knobs given on the command line (the defaults elsewhere), checked."""
    return Knobs(**{name: parse(name, getattr(args, name)) for name in FIELDS if getattr(args, name) is not None})


def given(knobs: Knobs) -> list[str]:
    """The knobs set to other than their default."""
    return [name for name, f in FIELDS.items() if getattr(knobs, name) != f.default]


def to_args(knobs: Knobs, names) -> list[str]:
    """A worker's arguments for the knobs `names` (torch's default bucket size: no flag)."""
    return [a for n in names if getattr(knobs, n) is not None for a in (flag(n), str(getattr(knobs, n)))]
