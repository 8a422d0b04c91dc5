"""Predicted against measured: plan.json rows joined with bench.json rows (`decoupled report PLAN BENCH...`
writes the table into report.md and plan_vs_bench.json). A plan row and a bench row are the same
run when they name the same row (`mode`), the same number of ranks (bench.json's `ranks`) and the same
link: the bench row's `link`, else its bench.json's, else none, which is an unshaped link
("loopback"). Each residual is predicted / measured - 1, so +0.25 is a prediction 25 % too high.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .cli import parse_rate

MiB = 2 ** 20
# (plan.json field, bench.json field of a row or of its largest rank), compared where both have it
FIELDS = {"samples_per_s": "samples_per_s", "exact_train_mem_bytes": "exact_train_mem_bytes",
          "wire_bytes_per_sample": "wire_bytes_per_sample"}


def find_plans(paths: list[Path]) -> list[Path]:
    """Every plan.json under the given paths."""
    found: set[Path] = set()
    for p in paths:
        found |= {p / "plan.json"} if (p / "plan.json").exists() else set(p.rglob("plan.json")) if p.is_dir() else set()
    return sorted(found)


def _rate(value) -> float:
    if value is None:
        return math.inf
    return float(value) if isinstance(value, (int, float)) else parse_rate(str(value))


def _same(a: float, b: float) -> bool:
    return (math.isinf(a) and math.isinf(b)) or math.isclose(a, b, rel_tol=1e-6)


def measured(row: dict, field: str):
    """A bench row's figure: its own, or (exact memory) its largest rank's, as bench/report.exact reads it."""
    if field == "exact_train_mem_bytes":
        return max((r["exact_train_mem_bytes"] for r in row.get("ranks", [])
                    if isinstance(r, dict) and r.get("exact_train_mem_bytes") is not None), default=None)
    return row.get(field)


def join(plans: list[dict], benches: list[dict]) -> list[dict]:
    """One line per bench row that a plan predicted: each field predicted, measured and its residual."""
    out = []
    for bench in benches:
        for row in bench.get("rows", []):
            if not row.get("samples_per_s") or "mode" not in row:  # a failed row, or --sweep layouts' rows
                continue
            link = row.get("link", bench.get("link"))
            rate = _rate(link)
            for plan in plans:
                match = [p for p in plan["rows"] if p["mode"] == row["mode"] and p["ranks"] == bench.get("ranks")
                         and _same(_rate(p["link_bytes_per_s"]), rate) and p.get("samples_per_s")]
                for p in match:
                    # a row the bench laid out otherwise (its sync row: an even split) is no test of the layout
                    line = {"mode": row["mode"], "ranks": p["ranks"], "link": p["link"],
                            "placement": {"predicted": p.get("layout", {}).get("placement"),
                                          "measured": row.get("placement")}}
                    for mine, theirs in FIELDS.items():
                        a, b = p.get(mine), measured(row, theirs)
                        line[mine] = {"predicted": a, "measured": b,
                                      "residual": a / b - 1 if a is not None and b else None}
                    out.append(line)
    return out


def markdown(lines: list[dict]) -> str:
    def cell(v: dict, scale: float = 1.0, spec: str = ".1f") -> str:
        if v["residual"] is None:
            return "-"
        return (f"{v['predicted'] / scale:{spec}} / {v['measured'] / scale:{spec}} "
                f"({v['residual']:+.0%})")

    def layout(v: dict) -> str:
        same = v["measured"] is None or v["predicted"] == v["measured"]
        return "" if same else f" (plan's blocks {v['predicted']}, run's {v['measured']})"
    rows = ["Predicted / measured (residual = predicted / measured - 1), from plan.json and bench.json:", "",
            "| row | K | link | samples/s | exact train MiB (max rank) | wire B/sample |",
            "|---|---:|---|---:|---:|---:|"]
    for x in lines:
        rows.append(f"| {x['mode']}{layout(x['placement'])} | {x['ranks']} | {x['link']} | "
                    f"{cell(x['samples_per_s'])} | {cell(x['exact_train_mem_bytes'], MiB, '.2f')} | "
                    f"{cell(x['wire_bytes_per_sample'], 1, '.1f')} |")
    return "\n".join(rows) + "\n"


def write(plan_paths: list[Path], benches: list[dict], out: Path) -> str | None:
    """plan_vs_bench.json in `out` and the markdown table; None when no bench row was predicted."""
    lines = join([json.loads(p.read_text()) for p in plan_paths], benches)
    if not lines:
        return None
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_vs_bench.json").write_text(json.dumps(lines, indent=2))
    return markdown(lines)
