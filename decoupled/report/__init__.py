"""`decoupled report RUN_OR_BENCH... --out DIR`: the figures of plots.py and DIR/report.md, a page of
the runs' summaries (per-block accuracy, memory and throughput per rank, the exit curve when there is
one, the end-to-end baseline when the run was compared with one) and of the bench folders' tables;
given a `decoupled plan` folder too, its predictions against the benches' measurements
(plan/compare.py: the table, and DIR/plan_vs_bench.json). `--regime DIR...` instead: the regime map of
`decoupled bench --nodes` outputs (regime.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..metrics import mib_text


def _fmt(v, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def run_section(name: str, s: dict) -> list[str]:
    lines = [f"## {name}", "",
             f"`{s['mode']}` / `{s['objective']}` / `{s['model']}` on `{s['dataset']}`, {s['world_size']} rank(s), "
             f"{s['wall_s']:.1f} s wall; run directory `{s['run_dir']}`", "",
             "| block | test acc. | train samples | epochs | params |", "|---:|---:|---:|---:|---:|"]
    for layer in s["layers"]:
        lines.append(f"| {layer['block']} | {_fmt(layer['test_acc'])} | {layer['train_samples']} | {layer['epochs']} | "
                     f"{layer['params']} |")
    lines += ["", f"Ensemble test accuracy: **{_fmt(s.get('ensemble_test_acc'))}**"]
    if s.get("e2e_baseline"):
        b = s["e2e_baseline"]
        lines.append(f"; end-to-end backprop baseline: {_fmt(b['test_acc'])} (last block) in {b['wall_s']:.1f} s "
                     f"(`{b['run_dir']}`)")
    lines += ["", "| rank | blocks | peak memory (process) | exact training memory | samples/s | compute s | comm s "
              "| idle s |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in s.get("ranks", []):
        lines.append(f"| {r['rank']} | {r['blocks']} | {mib_text(r.get('peak_mem_bytes'))} | "
                     f"{mib_text(r.get('exact_train_mem_bytes'))} | "
                     f"{r.get('samples_per_s', 0):.0f} | {_fmt(r.get('compute_s'), '.2f')} | "
                     f"{_fmt(r.get('comm_s'), '.2f')} | {_fmt(r.get('idle_s'), '.2f')} |")
    if s.get("exit_curve"):
        lines += ["", "Early-exit curve:", "", "| threshold | accuracy | MFLOPs/sample | exit fractions |",
                  "|---:|---:|---:|---|"]
        for c in s["exit_curve"]:
            lines.append(f"| {c['threshold']:g} | {c['accuracy']:.4f} | {c['avg_flops'] / 1e6:.4f} | "
                         + " ".join(f"{f:.3f}" for f in c["exit_fraction"]) + " |")
    return lines + [""]


def markdown(runs: list[Path], bench_dirs: list[Path], figures: list[Path], predicted: str | None = None) -> str:
    lines = ["# decoupled report", "", f"{len(runs)} run(s), {len(bench_dirs)} bench folder(s).", ""]
    if predicted:
        lines += ["## predicted against measured", "", predicted]
    for f in figures:
        lines += [f"![{f.stem}]({f.name})", ""]
    for r in runs:
        lines += run_section(str(r), json.loads((r / "summary.json").read_text()))
    for b in bench_dirs:
        md = next((b / n for n in ("bench.md", "layouts.md") if (b / n).exists()), None)
        lines += [f"## bench {b}", "", md.read_text() if md else "(no bench.md)", ""]
    return "\n".join(lines)


def main(paths: list[Path], out: Path, regime: list[Path] | None = None) -> int:
    if bool(paths) == bool(regime):
        print("decoupled: report: give run or bench folders, or --regime DIR... (the regime map), not both",
              file=sys.stderr)
        return 2
    if regime:
        from .regime import main as regime_main
        return regime_main(regime, out)
    from ..plan.compare import find_plans, write
    from .plots import load_all, plot_all
    try:
        runs, groups, bench_dirs, benches = load_all(paths)
    except FileNotFoundError as e:
        print(f"decoupled: report: {e}", file=sys.stderr)
        return 2
    figures = plot_all(groups, benches, out)
    predicted = write(find_plans(paths), benches, out)
    page = out / "report.md"
    page.write_text(markdown(runs, bench_dirs, figures, predicted))
    print(f"report: {len(runs)} run(s), {len(bench_dirs)} bench folder(s) -> {page}")
    for f in figures:
        print(f"  {f}")
    return 0
