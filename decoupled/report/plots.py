"""Figures from run directories (summary.json) and bench folders (bench.json), as PNG files.

    decoupled report runs/ablate runs/bench_cpu --out report/     # these figures + report.md
    python analysis/plots.py runs/ablate runs/bench_cpu --out plots/   # the figures only

Every argument is a run directory, a bench folder, or a folder searched recursively for both.
Runs are grouped into configurations by folder: `.../<config>/seed<N>/` groups the seeds of one
ablation point (mean and standard deviation), any other run is its own configuration.

  layer_accuracy.png     test accuracy of every block's head, per configuration (the papers' figure)
  samples_per_block.png  training samples each block saw (QuickNet: deeper blocks see fewer)
  exit_curves.png        accuracy when every sample exits at block j vs the parameters it ran through
  memory_per_rank.png    peak memory of every rank (and of every bench row's largest process)
  throughput_vs_ranks.png  samples/s vs number of ranks, per mode (runs: the slowest rank; bench rows)
  accuracy_vs_time.png   bench --curve: test accuracy vs training time (evaluation excluded), one line per row
  regime.png             `decoupled report --regime` only: time to target vs link rate (report/regime.py)
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.lines  # noqa: E402
import matplotlib.ticker  # noqa: E402

MiB = 2 ** 20


def find(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(run directories, bench folders) under the given paths."""
    runs, benches = set(), set()
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        runs |= {s.parent for s in ([p / "summary.json"] if (p / "summary.json").exists() else p.rglob("summary.json"))}
        for name in ("bench.json", "layouts.json"):  # `decoupled bench` and its --sweep layouts
            benches |= {b for b in ([p / name] if (p / name).exists() else p.rglob(name))}
    # a bench folder's own row runs (bench/sync, bench/e2e, ...) are drawn from bench.json
    runs = {r for r in runs if not any(b.parent in r.parents for b in benches)}
    return sorted(runs), sorted(benches)


def label(run: Path) -> str:
    """Seeds of one ablation point share a label: runs/ablate/<point>/seed2 -> <point>."""
    return run.parent.name if re.fullmatch(r"seed\d+", run.name) else run.name


def load_runs(runs: list[Path]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(label(r), []).append(json.loads((r / "summary.json").read_text()))
    return groups


def mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def per_block(summaries: list[dict], key: str):
    """Blocks, mean and std of layers[key] over the seeds of one configuration."""
    blocks = sorted({l["block"] for s in summaries for l in s["layers"]})
    vals = [[l[key] for s in summaries for l in s["layers"] if l["block"] == b and l.get(key) is not None]
            for b in blocks]
    stats = [mean_std(v) if v else (float("nan"), 0.0) for v in vals]
    return [b + 1 for b in blocks], [m for m, _ in stats], [sd for _, sd in stats]


def save(fig, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def layer_accuracy(groups, out, written):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ss in groups.items():
        x, m, sd = per_block(ss, "test_acc")
        ax.errorbar(x, m, yerr=sd, marker="o", capsize=3, label=f"{name} (n={len(ss)})")
    ax.set_xlabel("block (layer) j")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy of head j")
    ax.set_title("per-layer test accuracy")
    ax.legend(fontsize=7)
    save(fig, out / "layer_accuracy.png", written)


def samples_per_block(groups, out, written):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(groups), 1)
    for i, (name, ss) in enumerate(groups.items()):
        x, m, _ = per_block(ss, "train_samples")
        ax.bar([b + i * width for b in x], m, width=width, label=name)
    ax.set_xlabel("block j")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("training samples seen (all epochs)")
    ax.set_title("samples per block")
    ax.legend(fontsize=7)
    save(fig, out / "samples_per_block.png", written)


def exit_curves(groups, out, written):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ss in groups.items():
        x, acc, _ = per_block(ss, "test_acc")
        _, params, _ = per_block(ss, "params")
        cost, total = [], 0.0
        for p in params:  # exiting at block j runs blocks 1..j (and head j: counted in its block)
            total += p
            cost.append(total / 1e6)
        ax.plot(cost, acc, marker="o", label=name)
    ax.set_xlabel("parameters run through to exit at block j (millions)")
    ax.set_ylabel("test accuracy at that exit")
    ax.set_title("exit curves")
    ax.legend(fontsize=7)
    save(fig, out / "exit_curves.png", written)


def memory_per_rank(groups, benches, out, written):
    bars = []  # (label, [peak bytes per rank])
    for name, ss in groups.items():
        s = ss[0]
        bars.append((f"{name} [{s['mode']}]", [r["peak_mem_bytes"] for r in s.get("ranks", [])]))
    for b in benches:
        for row in b["rows"]:
            if row.get("ranks"):
                bars.append((f"bench {row['mode']}", [r["peak_mem_bytes"] for r in row["ranks"]]))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(bars) + 3), 4.5))
    k = max((len(v) for _, v in bars), default=1)
    width = 0.8 / k
    for r in range(k):
        xs = [i + r * width for i, (_, v) in enumerate(bars) if r < len(v)]
        ys = [float("nan") if v[r] is None else v[r] / MiB for _, v in bars if r < len(v)]  # None: unknown
        ax.bar(xs, ys, width=width, label=f"rank {r}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bars))], [n for n, _ in bars], rotation=30, ha="right",
                  fontsize=7)
    ax.set_ylabel("peak memory (MiB above baseline)")
    ax.set_title("memory per rank")
    ax.legend(fontsize=7)
    save(fig, out / "memory_per_rank.png", written)


def throughput_vs_ranks(groups, benches, out, written):
    series: dict[str, list[tuple[int, float]]] = {}
    for ss in groups.values():
        for s in ss:
            rate = min((r.get("samples_per_s", 0.0) for r in s.get("ranks", [])), default=0.0)
            series.setdefault(f"{s['mode']} (runs)", []).append((s["world_size"], rate))
    for b in benches:
        for row in b["rows"]:
            if row.get("samples_per_s"):
                k = row.get("world") or (b["ranks"] if len(row.get("ranks", [])) > 1 else (
                    row.get("threads", 1) if row["mode"] == "e2e-Kthreads" else 1))
                series.setdefault(f"bench {row['mode']}", []).append((k, row["samples_per_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("ranks (threads for e2e-Kthreads)")
    ax.set_ylabel("training samples / s")
    ax.set_title("throughput vs ranks")
    ax.legend(fontsize=7)
    save(fig, out / "throughput_vs_ranks.png", written)


def mean_curve(row: dict) -> list[tuple[float, float]]:
    """A bench row's (train_s, test_acc) per epoch, the mean over its seeds when it ran several."""
    runs = [x["curve"] for x in row.get("seeds", []) if x.get("curve")] or [row["curve"]]
    n = min(len(c) for c in runs)
    return [(sum(c[i]["train_s"] for c in runs) / len(runs), sum(c[i]["test_acc"] for c in runs) / len(runs))
            for i in range(n)]


def draw_accuracy_vs_time(ax, rows: list[tuple[str, dict]], target: float | None) -> None:
    """Test accuracy against cumulative training time (evaluation excluded), one line per (label, row)."""
    for name, r in rows:
        pts = mean_curve(r)
        ax.plot([t for t, _ in pts], [a for _, a in pts], marker="o", label=name)
    if target is not None:
        ax.axhline(target, ls="--", c="k", lw=0.8)
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("test accuracy")
    ax.set_title("time to accuracy")
    ax.legend(fontsize=7)


def accuracy_vs_time(benches, out, written):
    rows = [(f"{row['mode']}" if len(benches) == 1 else f"bench {i} {row['mode']}", row)
            for i, b in enumerate(benches) for row in b["rows"] if row.get("curve")]
    if not rows:
        return
    targets = {b["curve"]["target_acc"] for b in benches if b.get("curve")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_accuracy_vs_time(ax, rows, targets.pop() if len(targets) == 1 else None)
    save(fig, out / "accuracy_vs_time.png", written)


def regime_map(networks: list[dict], path: Path) -> Path:
    """report/regime.py's map: time to target against the link's measured TCP rate (both log), a panel
    per network, a line per row; measured points filled, computed hollow. "never" and "-" cells have no
    point (the page's table has them)."""
    fig, axes = plt.subplots(1, len(networks), figsize=(6.5 * len(networks), 4.8), squeeze=False)
    for ax, net in zip(axes[0], networks):
        rate = {rec["link"]: rec["tcp_bytes_per_s"] / 1e6 for rec in net["links"]}
        for i, row in enumerate(net["rows"]):
            pts = sorted((rate[c["link"]], c["time_to_target_s"], c["how"]) for c in net["cells"]
                         if c["row"] == row and c["time_to_target_s"] is not None)
            never = [c["link"] for c in net["cells"] if c["row"] == row and c["reached_target"] is False]
            color = f"C{i % 10}"  # a row without a point still has its legend entry, and says why
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], color=color,
                    label=row + (f" (never at {', '.join(never)})" if never else ""))
            for x, y, how in pts:
                ax.plot(x, y, "o", color=color, mfc=color if how == "measured" else "none")
        for link, x in rate.items():  # every link named where it sits: loopback at its own measured rate
            ax.axvline(x, ls=":", c="grey", lw=0.8)
            ax.text(x, 0.02, f" {link} ({x:.4g} MB/s)", transform=ax.get_xaxis_transform(), rotation=90,
                    va="bottom", ha="right", fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers (6, 20, 300), not 6 x 10^0
            axis.set_major_formatter(matplotlib.ticker.LogFormatter())
            axis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
        ax.set_xlabel("link rate (raw TCP stream, MB/s)")
        ax.set_ylabel(f"time to test accuracy {net['target_acc']} (s)")
        ax.set_title(net["network"], fontsize=9)
        marks = [matplotlib.lines.Line2D([], [], marker="o", ls="", color="k", label="measured"),
                 matplotlib.lines.Line2D([], [], marker="o", ls="", color="k", mfc="none", label="computed")]
        ax.legend(handles=ax.get_legend_handles_labels()[0] + marks, fontsize=7)
    save(fig, path, [])
    return path


def plot_all(groups, benches, out: Path) -> list[Path]:
    """Every figure that the runs and benches have data for; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if groups:
        layer_accuracy(groups, out, written)
        samples_per_block(groups, out, written)
        exit_curves(groups, out, written)
    memory_per_rank(groups, benches, out, written)
    throughput_vs_ranks(groups, benches, out, written)
    accuracy_vs_time(benches, out, written)
    return written


def load_all(paths: list[Path]):
    """(run paths, groups of summaries, bench folders, bench.json contents) under `paths`; raises
    FileNotFoundError when a path is missing or holds neither a run nor a bench."""
    runs, bench_dirs = find(paths)
    if not runs and not bench_dirs:
        raise FileNotFoundError(f"no summary.json or bench.json under {', '.join(map(str, paths))}")
    return runs, load_runs(runs), [b.parent for b in bench_dirs], [json.loads(b.read_text()) for b in bench_dirs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories, bench folders, or folders holding them")
    p.add_argument("--out", type=Path, default=Path("plots"), help="folder for the PNG files")
    args = p.parse_args(argv)
    try:
        runs, groups, _, benches = load_all(args.runs)
    except FileNotFoundError as e:
        print(f"plots: {e}", file=sys.stderr)
        return 2
    written = plot_all(groups, benches, args.out)
    print(f"plots: {len(runs)} runs in {len(groups)} configurations, {len(benches)} bench folders ->")
    for w in written:
        print(f"  {w}")
    return 0
