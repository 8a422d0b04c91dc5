"""bench.md and bench.png from a bench result (docs/results/ states the targets these numbers meet)."""
from __future__ import annotations

from pathlib import Path

MiB = 2 ** 20


def _row(result: dict, mode: str) -> dict | None:
    return next((r for r in result["rows"] if r["mode"] == mode and r.get("samples_per_s")), None)


def peak(row: dict) -> int | None:
    """The largest rank's peak; None (unknown) if no rank could measure its own."""
    return max((r["peak_mem_bytes"] for r in row["ranks"] if r["peak_mem_bytes"] is not None), default=None)


def mib(b: int | None) -> float:
    return float("nan") if b is None else b / MiB  # nan: an unknown peak is not drawn, and never 0


def markdown(result: dict) -> str:
    e2e = _row(result, "e2e")
    m = result["machine"]
    lines = [f"{result['n_train']} samples/epoch, batch {result['batch_size']}, {result['ranks']} ranks, "
             f"median of {result['repeats']} epochs after 1 warm-up; torch {m['torch']}, {m['cpu_count']} CPUs, "
             f"load average at start {m['loadavg_start'][0]:.2f}; MALLOC_MMAP_THRESHOLD_="
             f"{result.get('malloc_mmap_threshold', 'glibc default (dynamic)')}", ""]
    if "stages" in result:
        ts = ", ".join(f"rank {s['rank']} {s['epoch_s']:.2f}s" for s in result["stages"])
        lines += [f"Stages alone (s/epoch): {ts}; bound = sum/max = {result['bound']:.2f}x, "
                  f"{result['bound_samples_per_s']:.0f} samples/s", ""]
    lines += ["| row | samples/s | vs e2e | of bound | peak MiB (max rank) | per rank: compute / comm / idle s/epoch |",
              "|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        name = f"e2e ({r.get('threads', '?')} threads)" if r["mode"] == "e2e-Kthreads" else r["mode"]
        if "split" in r:  # gpipe / 1f1b: their own split and microbatch count
            name += f" (split {r['split']}, {r.get('microbatches')} microbatches)"
        if not r.get("samples_per_s"):
            lines.append(f"| {name} | failed | | | | {r.get('error', '')[:200]} |")
            continue
        vs = f"{r['samples_per_s'] / e2e['samples_per_s']:.2f}x" if e2e else ""
        ob = f"{r['of_bound']:.2f}" if r.get("of_bound") else ""
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        per = "; ".join(f"{x['compute_s']:.2f} / {fmt(x['comm_s'])} / {fmt(x['idle_s'])}" for x in r["ranks"])
        lines.append(f"| {name} | {r['samples_per_s']:.1f} | {vs} | {ob} | {mib(peak(r)):.1f} | {per} |")
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r.get("samples_per_s")]
    names = [f"e2e {r['threads']}thr" if r["mode"] == "e2e-Kthreads" else r["mode"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [r["samples_per_s"] for r in rows], color="tab:blue")
    if "bound_samples_per_s" in result:
        a.axhline(result["bound_samples_per_s"], ls="--", c="k", label=f"bound ({result['bound']:.2f}x stages)")
        a.legend()
    a.set_ylabel("training samples / s")
    a.set_title(f"throughput, {result['ranks']} ranks")
    b.bar(names, [mib(peak(r)) for r in rows], color="tab:orange")
    b.set_ylabel("peak memory of the largest process (MiB)")
    b.set_title("peak memory")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
