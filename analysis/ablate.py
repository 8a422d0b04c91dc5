"""Run every point of a config grid (x seeds), skip what is done, collect one CSV.

    python analysis/ablate.py --config launch/configs/simcnn_k1_cifar10.toml \
        --grid objective.k=1,2,3 --grid model.hierarchy=[1,1,2,2],[2,2,2,2] --seeds 3 --out runs/ablate

A grid value list is split at top-level commas, so list values keep theirs; every value is a
`--set` literal (decoupled.config.load parses it, typos fail before anything runs). Each point and
seed gets its own run directory, named from its overrides:

    runs/ablate/objective.k=2__model.hierarchy=1-1-2-2/seed0/

and is skipped when its summary.json exists, so an interrupted ablation resumes by running the same
command again. Runs are fresh processes (`python -m decoupled train`, or torchrun with --ranks K for
train.mode sync/async): a failed run is reported and the others go on.

The CSV is long: one row per run and block (columns: point, seed, the grid keys, block, test_acc,
train_samples, epochs, params, then run-level ensemble_test_acc, wall_s, samples_per_s, peak memory),
ready for a pivot or a groupby; analysis/plots.py draws the figures from the run directories.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from decoupled.bench.launcher import Job, describe, run  # noqa: E402
from decoupled.bench.runner import train_command  # noqa: E402
from decoupled.job import ConfigError, load  # noqa: E402
from decoupled.modes import MODES  # noqa: E402


def split_values(text: str) -> list[str]:
    """'1,2,3' -> ['1','2','3'];  '[1,1,2],[2,2]' -> ['[1,1,2]', '[2,2]'] (commas inside brackets stay)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [v for v in out if v]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or "." not in key or not split_values(values):
            raise ConfigError(f"--grid {item!r}: expected section.key=v1,v2,... e.g. --grid objective.k=1,2,3")
        grid.append((key.strip(), split_values(values)))
    return grid


def slug(value: str) -> str:
    """A value as a folder-name piece: [1,1,2,2] -> 1-1-2-2, "vgg" -> vgg."""
    s = re.sub(r"[\[\]{}\"' ]", "", value).replace(",", "-")
    return re.sub(r"[^A-Za-z0-9._=-]", "_", s) or "empty"


def points(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination, as lists of `key=value` overrides."""
    keys = [k for k, _ in grid]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*[vs for _, vs in grid])]


def point_name(point: list[str]) -> str:
    if not point:
        return "base"
    return "__".join(f"{o.partition('=')[0]}={slug(o.partition('=')[2])}" for o in point)


def run_one(job: Job, out: Path, timeout: float) -> str | None:
    """One run through the bench's launcher (fresh process, one thread per rank unless
    OMP_NUM_THREADS says otherwise, a log, a timeout); an error unless summary.json was written."""
    err = run(job, out / "ablate.log", timeout)
    if err is None and not (out / "summary.json").exists():
        err = f"no summary.json (see {out / 'ablate.log'})"
    return err


FIELDS = ["point", "seed", "block", "test_acc", "train_samples", "epochs", "params", "ensemble_test_acc",
          "mode", "objective", "model", "dataset", "world_size", "wall_s", "samples_per_s", "max_peak_mem_bytes",
          "run_dir"]


def rows_of(run_dir: Path, point: str, seed: int, values: dict) -> list[dict]:
    s = json.loads((run_dir / "summary.json").read_text())
    ranks = s.get("ranks", [])
    run = {"point": point, "seed": seed, **values, "ensemble_test_acc": s.get("ensemble_test_acc"),
           "mode": s.get("mode"), "objective": s.get("objective"), "model": s.get("model"),
           "dataset": s.get("dataset"), "world_size": s.get("world_size"), "wall_s": s.get("wall_s"),
           # a pipeline moves at its slowest rank's pace
           "samples_per_s": min((r.get("samples_per_s", 0.0) for r in ranks), default=None),
           "max_peak_mem_bytes": max((r["peak_mem_bytes"] for r in ranks if r.get("peak_mem_bytes") is not None),
                                     default=None),
           "run_dir": str(run_dir)}
    return [{**run, **{k: layer.get(k) for k in ("block", "test_acc", "train_samples", "epochs", "params")}}
            for layer in s["layers"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="base TOML config")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="one grid axis (repeatable); values split at top-level commas")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="fixed override for every run (repeatable)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per point (train.seed)")
    p.add_argument("--ranks", type=int, default=0,
                   help="run each point on K torchrun ranks (train.mode sync/async; sync if the config says "
                        "otherwise); 0 = one process")
    p.add_argument("--out", type=Path, default=Path("runs/ablate"), help="root of the run directories")
    p.add_argument("--csv", type=Path, help="output CSV (default OUT/ablation.csv)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")
    args = p.parse_args(argv)

    try:
        grid = parse_grid(args.grid)
        keys = [k for k, _ in grid]
        fixed = list(args.overrides)
        if args.ranks:
            mode = load(args.config, fixed).train.mode
            if not MODES[mode].distributed:
                print(f"ablate: --ranks {args.ranks} with train.mode={mode!r}: running train.mode=sync")
                fixed.append("train.mode=sync")
        jobs = []
        for point in points(grid):
            for seed in range(args.seeds):
                sets = [*fixed, *point, f"train.seed={seed}"]
                load(args.config, sets)  # a bad value fails here, before any run starts
                values = {k: o.partition("=")[2] for k, o in zip(keys, point)}
                jobs.append((point_name(point), seed, values, sets, args.out / point_name(point) / f"seed{seed}"))
    except ConfigError as e:
        print(f"ablate: config error: {e}", file=sys.stderr)
        return 2

    failed = []
    for i, (name, seed, _, sets, out) in enumerate(jobs, 1):
        job = train_command(args.config, sets, out, args.ranks, int(os.environ.get("OMP_NUM_THREADS", "1")))
        tag = f"[{i}/{len(jobs)}] {name} seed {seed}"
        if (out / "summary.json").exists():
            print(f"{tag}: done, skipped ({out})")
            continue
        if args.dry_run:
            print(f"{tag}: {describe(job)}")
            continue
        print(f"{tag}: running -> {out}", flush=True)
        err = run_one(job, out, args.timeout)
        if err:
            failed.append((tag, err))
            print(f"{tag}: FAILED {err}", flush=True)

    rows = [r for name, seed, values, _, out in jobs if (out / "summary.json").exists()
            for r in rows_of(out, name, seed, values)]
    path = args.csv or args.out / "ablation.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS[:2] + keys + FIELDS[2:])
        w.writeheader()
        w.writerows(rows)
    print(f"ablate: {len(rows)} rows from {len({r['run_dir'] for r in rows})}/{len(jobs)} runs -> {path}")
    for tag, err in failed:
        print(f"  failed: {tag}: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
