"""`decoupled bench --tune section.key=A,B,C`: every row at its own best value of one setting. The
setting is a config key (every row is tuned) or a bench flag of the data-parallel rows (knobs.py, by
its name: `--tune powersgd-rank=1,2,4`; only the rows whose strategy reads it are tuned, the others run
as given).

Before a row's real runs, the row trains once per value of the grid (the same grid for every row) with
a one-epoch budget (train.epochs=1) on the first seed (train.seed), and is scored by the final
validation accuracy of the network's output, the last block's head: summary.json layers[-1].val_acc
(e2e, sequential, sync, async) or the worker row's val_acc (the data-parallel rows, gpipe, 1f1b). The best value
(the first in grid order on a tie) is the row's; its real runs, every seed, --curve or not, train with it.

Note [tuning split]: tuning needs data.val_fraction > 0 (--val-fraction), and the real runs keep it:
they train on the training set minus the same hold-out (seeded by train.seed, so the first seed's runs
hold out exactly the samples tuning scored on; a further seed holds out the same fraction of its own
draw, as data.limit_train's subset is drawn). The test set is never used for the choice.

Each finished candidate is written at once to OUT/tune/<row>.json; a rerun into the same folder
reuses the candidates scored under the same setup (key, grid value, hold-out, seed, config and the
bench flags the row reads).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import ConfigError
from ..job import JobConfig, load, to_toml
from .knobs import FIELDS, Knobs, field_of, parse

# set by the tuner itself (Note [tuning split]), so not a grid's key
RESERVED = ("train.epochs", "train.seed", "data.val_fraction")


@dataclass
class Tune:
    key: str  # section.key, or a bench flag's name (powersgd-rank)
    texts: list[str]  # each value as --set (or the flag) spells it
    values: list  # each value as the config (or knobs.Knobs) holds it (bench.json's grid)
    val_fraction: float
    knob: str | None = None  # the Knobs field a bench flag's key names

    def overrides(self, text: str) -> list[str]:
        """A candidate's config overrides (a bench flag's: none)."""
        return [] if self.knob else [f"{self.key}={text}"]

    def knobs(self, base: Knobs, text: str) -> Knobs:
        """A candidate's bench flags: `base`, with a bench flag's key at `text`."""
        return dataclasses.replace(base, **{self.knob: parse(self.knob, text)}) if self.knob else base

    def applies(self, reads: tuple[str, ...]) -> bool:
        """Whether a row that reads the bench flags `reads` is tuned: every row for a config key."""
        return self.knob is None or self.knob in reads


def parse_tune(spec: str, val_fraction: float | None, config: str | None, overrides: list[str]) -> Tune:
    """--tune SECTION.KEY=V1,V2,... (or FLAG=V1,V2,... for a bench flag of knobs.py) checked against the
    bench's config (every value must load) before anything runs."""
    key, sep, listed = spec.partition("=")
    key, texts = key.strip(), [v.strip() for v in listed.split(",")]
    knob = field_of(key) if "." not in key else None
    if not sep or (knob is None and (key.count(".") != 1 or not all(key.split(".")))) or not all(texts):
        raise ConfigError(f"bench --tune {spec!r}: expected SECTION.KEY=V1,V2,... (one setting, comma-separated "
                          "values, none empty), e.g. --tune optim.lr=0.01,0.03,0.1, or a bench flag's name: "
                          f"{', '.join(n.replace('_', '-') for n in FIELDS)} (e.g. --tune powersgd-rank=1,2,4)")
    if key in RESERVED:
        raise ConfigError(f"bench --tune {key}: the tuner sets {', '.join(RESERVED)} itself; tune another setting "
                          "(e.g. optim.lr)")
    if len(set(texts)) != len(texts):
        raise ConfigError(f"bench --tune {spec!r}: a value is listed twice; list each once")
    fraction = 0.1 if val_fraction is None else val_fraction
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"bench --val-fraction {fraction}: tuning scores a validation hold-out, so it must be in "
                          "(0, 1); e.g. --val-fraction 0.1")
    if knob:
        return Tune(knob.replace("_", "-"), texts, [parse(knob, t) for t in texts], fraction, knob)
    section, name = key.split(".")
    values = []
    for text in texts:
        try:
            cfg = load(config, [*overrides, f"{key}={text}", f"data.val_fraction={fraction}"])
        except ConfigError as e:
            raise ConfigError(f"bench --tune {key}={text}: {e}") from None
        values.append(getattr(getattr(cfg, section), name))
    return Tune(key, texts, values, fraction)


def choose(candidates: list[dict]):
    """The value of the best validation accuracy (the first in grid order on a tie); None if none scored."""
    scored = [c for c in candidates if c.get("val_acc") is not None]
    return max(scored, key=lambda c: c["val_acc"])["value"] if scored else None


def tuning_config(tune: Tune, cfg: JobConfig, text: str) -> JobConfig:
    """A candidate's config: the bench's, the value, one epoch, no evaluation before the final one."""
    return load(None, [*tune.overrides(text), "train.epochs=1", "train.eval_every=0"], base=cfg)


def tune_row(mode: str, tune: Tune, cfg: JobConfig, out: Path, score: Callable[[Path, Path, str], dict],
             knobs: dict | None = None) -> dict:
    """Score every value of the grid for one row (`score(config path, run folder, value's text)` runs it:
    {"val_acc"} or {"val_acc": None, "error"}), writing OUT/tune/<mode>.json after each; the row's tuning
    record. `knobs`: the bench flags the row reads, as given (part of the setup)."""
    where = out / "tune"
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{mode}.json"
    setup = {"key": tune.key, "val_fraction": tune.val_fraction, "epochs": 1, "seed": cfg.train.seed,
             "config_sha": hashlib.sha256(to_toml(cfg).encode()).hexdigest()[:16]}
    if knobs:  # only where the row reads some: the other rows' setups are as before
        setup["knobs"] = knobs
    before = json.loads(path.read_text()) if path.exists() else {}
    reuse = {json.dumps(c["value"]): c for c in before.get("candidates", [])
             if before.get("setup") == setup and c.get("val_acc") is not None}
    record = {"setup": setup, "grid": tune.values, "candidates": []}
    for i, (text, value) in enumerate(zip(tune.texts, tune.values)):
        c = reuse.get(json.dumps(value))
        if c is None:
            cfg_path = where / f"{mode}-{i}.toml"
            cfg_path.write_text(to_toml(tuning_config(tune, cfg, text)))
            c = {"value": value, "text": text, **score(cfg_path, where / f"{mode}-{i}", text)}
        record["candidates"].append(c)
        path.write_text(json.dumps(record, indent=2))  # as each finishes: a rerun picks up from here
    record["chosen"] = choose(record["candidates"])
    record["chosen_text"] = next((c["text"] for c in record["candidates"] if c["value"] == record["chosen"]), None)
    path.write_text(json.dumps(record, indent=2))
    return record


def read_val_acc(mode: str, d: Path, worker: bool) -> float:
    """The network's final validation accuracy as a row's run reports it (see the module docstring);
    `worker`: a data-parallel or pipeline worker's row."""
    if worker:
        acc = json.loads((d / f"{mode}.json").read_text())["val_acc"]
    else:
        acc = json.loads((d / "summary.json").read_text())["layers"][-1]["val_acc"]
    if acc is None:
        raise ValueError(f"{d}: no validation accuracy (data.val_fraction = 0?)")
    return float(acc)
