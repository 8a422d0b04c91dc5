"""One markdown table of final test accuracy from run directories (analysis/ablate.py's output, any
number of them): a row per objective, a column per train.mode, each cell the mean +- std (population)
of the last block's head over the seeds found, with the seed count; and the same for every block.

    python analysis/table.py runs/objectives_fmnist --out table.md

A run is any folder holding summary.json and config.toml. The objective is named from the run's own
config (khidden with its k: "khidden k=2"); a (objective, mode) pair with no finished run is "refused
or not run", which the page that cites the table must say which.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

MODES = ("e2e", "sequential", "simultaneous", "quicknet", "sync", "async")


def runs(roots: list[Path]):
    """(objective label, mode, seed, summary) of every finished run under the roots."""
    for root in roots:
        for s in sorted(root.rglob("summary.json")):
            cfg = tomllib.loads((s.parent / "config.toml").read_text())
            obj = cfg["objective"]
            label = obj["name"] + (f" k={obj.get('k', 1)}" if obj["name"] == "khidden" else "")
            yield label, cfg["train"]["mode"], cfg["train"]["seed"], json.loads(s.read_text())


def cell(accs: list[float]) -> str:
    if not accs:
        return ""
    m = sum(accs) / len(accs)
    sd = math.sqrt(sum((a - m) ** 2 for a in accs) / len(accs))
    return f"{m:.4f} ± {sd:.4f} ({len(accs)})"


def table(roots: list[Path]) -> str:
    last: dict = defaultdict(list)
    blocks: dict = defaultdict(list)
    for label, mode, _, s in runs(roots):
        accs = [layer["test_acc"] for layer in s["layers"]]
        last[label, mode].append(accs[-1])
        blocks[label, mode].append(accs)
    labels = sorted({k[0] for k in last})
    modes = [m for m in MODES if any((lab, m) in last for lab in labels)]
    out = ["| objective | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    out += [f"| {lab} | " + " | ".join(cell(last.get((lab, m), [])) for m in modes) + " |" for lab in labels]
    out += ["", "Every block's head (mean over seeds, block 0 first):", "",
            "| objective | mode | blocks |", "|---|---|---|"]
    for (lab, mode), rows in sorted(blocks.items()):
        means = [sum(col) / len(col) for col in zip(*rows)]
        out.append(f"| {lab} | {mode} | " + " / ".join(f"{v:.4f}" for v in means) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    text = table(a.roots)
    if a.out:
        a.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
