"""bench.md and bench.png from a bench result, cluster.md of a --nodes bench (docs/results/ states the
targets these numbers meet)."""
from __future__ import annotations

import json
from pathlib import Path

from .curve import seed_summary
from .resume import reused

MiB = 2 ** 20
# rows whose exact training memory is a lower bound (memory.py): FSDP counts its shards, not the
# parameters it all-gathers nor the unsharded gradients it reduce-scatters
LOWER_BOUND_EXACT = {"fsdp"}


def _row(result: dict, mode: str) -> dict | None:
    return next((r for r in result["rows"] if r["mode"] == mode and r.get("samples_per_s")), None)


def peak(row: dict, key: str = "peak_mem_bytes") -> int | None:
    """The largest rank's training peak (`key`="eval_peak_mem_bytes": evaluation's); None (unknown) if
    no rank could measure its own."""
    return max((r[key] for r in row["ranks"] if r.get(key) is not None), default=None)


def exact(row: dict) -> int | None:
    """The largest rank's exact training bytes (memory.py); None where a row's process could not count them."""
    return max((r["exact_train_mem_bytes"] for r in row["ranks"] if r.get("exact_train_mem_bytes") is not None),
               default=None)


def _pm(mean, std, spec: str) -> str:
    return "-" if mean is None else format(mean, spec) + (f" ± {format(std, spec)}" if std is not None else "")


def _range(lo, hi, spec: str) -> str:
    return "-" if lo is None else f"{format(lo, spec)}–{format(hi, spec)}"


def accuracy_head(result: dict) -> list[str]:
    """--curve's columns: final accuracy and time to target; with several seeds, their min–max and the
    median time to target too (no --target-acc: "target", and its cells "-")."""
    c = result.get("curve")
    if not c:
        return []
    t = c["target_acc"] or "target"
    if c["seeds"] <= 1:
        return ["final acc", f"time to {t} (s)"]
    return ["final acc", "final acc min–max", f"time to {t} (s)", f"time to {t} min–max (s)",
            f"median time to {t} (s)"]


def accuracy_cells(result: dict, r: dict) -> list[str]:
    """--curve: final accuracy and time to target. With several seeds: the final accuracy's mean ± std and
    min–max over the seeds that have a curve; the time to target's mean ± std and min–max over the seeds
    that reached it, with (reached/seeds); and its median over every seed, a seed that never reached it
    counting as never (curve.median_time_to_target): "never" unless more than half reached it."""
    head = accuracy_head(result)
    if not head:
        return []
    if r["mode"] not in result["curve"]["rows"]:
        return ["(no curve)"] + [""] * (len(head) - 1)
    target = result["curve"]["target_acc"]
    if "n_seeds" not in r and len(head) > 2:  # one run under several seeds' columns: a summary of one seed
        r = {**r, **seed_summary([r], target)}
    if "n_seeds" not in r:
        t = r.get("time_to_target_s")
        return [_pm(r.get("final_acc"), None, ".4f"), "never" if t is None and target else _pm(t, None, ".1f")]
    k, n = r.get("time_to_target_reached", r["reached_target"]), r.get("time_to_target_seeds", r["n_seeds"])
    final = [_pm(r["final_acc_mean"], r["final_acc_std"], ".4f"),
             _range(r.get("final_acc_min"), r.get("final_acc_max"), ".4f")]
    if not target:
        return final + ["-", "-", "-"]
    if not k:
        return final + [f"never ({k}/{n})", "never", f"never ({k}/{n})"]
    med = r.get("time_to_target_median_s")
    return final + [f"{_pm(r['time_to_target_mean_s'], r['time_to_target_std_s'], '.1f')} ({k}/{n})",
                    _range(r.get("time_to_target_min_s"), r.get("time_to_target_max_s"), ".1f"),
                    f"{'never' if med is None else format(med, '.1f')} ({k}/{n})"]


def link_line(c: dict) -> str:
    """--nodes: the emulated nodes and their link (bench/cluster.py, Note [emulated cluster])."""
    shaped = (f"tbf at {c['link']} ({c['rate_bytes_per_s'] / 1e6:.2f} MB/s, burst {c['burst_bytes'] // 1024} KiB) "
              "on both ends of every node's veth" if c.get("rate_bytes_per_s") else "unshaped veths (loopback)")
    return (f"Emulated cluster: {c['nodes']} nodes, one network namespace each, behind a bridge; {shaped}; a raw TCP "
            f"stream between two nodes ran at {c['tcp_bytes_per_s'] / 1e6:.2f} MB/s. Bandwidth only: no latency, no "
            "loss. Single-process rows (e2e, sequential) run outside the nodes")


def mib(b: int | None) -> float:
    return float("nan") if b is None else b / MiB  # nan: an unknown peak is not drawn, and never 0


def markdown(result: dict) -> str:
    e2e = _row(result, "e2e")
    m = result["machine"]
    timing = (f"{result['curve']['epochs']} epochs per row" if "curve" in result else
              f"median of {result['repeats']} epochs after 1 warm-up")
    lines = [f"{result['n_train']} samples/epoch, batch {result['batch_size']}, {result['ranks']} ranks, "
             f"{timing}; torch {m['torch']}, {m['cpu_count']} CPUs, "
             f"load average at start {m['loadavg_start'][0]:.2f}; MALLOC_MMAP_THRESHOLD_="
             f"{result.get('malloc_mmap_threshold', 'glibc default (dynamic)')}", ""]
    if result.get("cluster"):
        lines += [link_line(result["cluster"]), ""]
    again = reused(result["rows"])
    if again:
        lines += ["Read back from an earlier bench into this folder (the same config, link and row; measured then, "
                  f"bench/resume.py): {', '.join(again)}", ""]
    if "stages" in result:
        ts = ", ".join(f"rank {s['rank']} {s['epoch_s']:.2f}s" for s in result["stages"])
        lines += [f"Stages alone (s/epoch): {ts}; bound = sum/max = {result['bound']:.2f}x, "
                  f"{result['bound_samples_per_s']:.0f} samples/s"
                  + (" (read back from an earlier bench into this folder)" if result.get("stages_reused") else ""), ""]
    c = result.get("curve")
    if c:
        lines += [f"--curve: {c['epochs']} epochs, test accuracy (last block's head) after each, outside the timed "
                  f"window; {c['seeds']} seed(s); samples/s over the training epochs after the first (with several "
                  "seeds: mean ± std; vs e2e and of bound: the first seed's)", ""]
        if c.get("eval_every_steps"):
            lines += [f"Also after every {c['eval_every_steps']} source steps inside an epoch "
                      f"(train.eval_every_steps), on the first {c['eval_subset']} test samples (the same for every "
                      "row and seed): an accuracy "
                      f"p there has standard error sqrt(p(1-p)/{c['eval_subset']}) = {c['eval_subset_se']:.4f} at "
                      f"p = {c['eval_subset_se_at']}; epoch ends score the whole test set", ""]
        if c["seeds"] > 1:
            lines += ["Over the seeds: final acc mean ± std and min–max; time to target mean ± std and min–max over "
                      "the seeds that reached it (reached/seeds); median time to target over every seed, one that "
                      "never reached it counting as never: a time when more than half reached it, "
                      "else never", ""]
    t = result.get("tune")
    tune_head = [t["key"]] if t else []
    if t:
        who = "every row" if "." in t["key"] else ", ".join(t["rows"])  # a bench flag: the rows that read it
        lines += [f"--tune: {who} at its own {t['key']} of {t['grid']}, chosen by the final validation accuracy "
                  f"(last block's head) after {t['epochs']} epoch on seed {t['seed']}; every run, tuning and real, "
                  f"trains on the training set minus the data.val_fraction={t['val_fraction']} stratified hold-out "
                  "(the same samples on that seed; bench/tune.py). Each candidate's accuracy: bench.json "
                  "rows[].tune", ""]
    acc_head = [*tune_head, *accuracy_head(result)]
    lines += ["Memory: exact = the largest rank's parameters + gradients + optimizer state + autograd's saved "
              "activations + transport/replay buffers + an all-reduce's flat copy (a replica's gradients, local SGD's "
              "parameters) + a comm hook's state (PowerSGD's error feedback, P and Q) (decoupled/memory.py); "
              "≥: a lower bound (fsdp: the parameters FSDP all-gathers and the unsharded gradients it "
              "reduce-scatters are not counted, only its shards); process train / eval = the largest "
              "process's peak growth (CPU: resident set, glibc heap included) during training and during the "
              "evaluations, measured apart (metrics.PeakMemory.evaluating)", ""]
    comm = any(r.get("comm_bytes_per_sample") is not None for r in result["rows"])  # the data-parallel rows
    comm_head = ["all-reduce B/sample"] if comm else []
    if comm:
        lines += ["all-reduce B/sample: the bytes the data-parallel rows' ranks hand to all-reduces in their training "
                  "steps, summed over ranks, per training sample (a ring all-reduce puts 2(K-1)/K of it on the links: "
                  "all of it for K = 2); wire B/sample: the engine's activation messages", ""]
    lines += ["| " + " | ".join(["row", "samples/s", "vs e2e", "of bound", "exact train MiB", "process train MiB",
                                 "process eval MiB",
                                 *acc_head, "wire B/sample", *comm_head,
                                 "per rank: compute / comm / idle s/epoch"]) + " |",
              "|---|" + "---:|" * (7 + len(acc_head) + len(comm_head)) + "---|"]
    for r in result["rows"]:
        name = f"e2e ({r.get('threads', '?')} threads)" if r["mode"] == "e2e-Kthreads" else r["mode"]
        if "split" in r:  # gpipe / 1f1b: their own split and microbatch count
            name += f" (split {r['split']}, {r.get('microbatches')} microbatches)"
        if r.get("replicas") and (r["mode"] == "sync-auto" or max(r["replicas"]) > 1):  # a layout chosen or replicated
            batches = f", {r['replica_batch']} batches" if r.get("replica_batch") and max(r["replicas"]) > 1 else ""
            name += f" (blocks {r['placement']}, ranks {r['replicas']}{batches})"
        if r.get("label"):  # a data-parallel row's settings and how it trains (strategies.py)
            name += f" ({r['label']})"
        if not r.get("samples_per_s"):
            lines.append(f"| {name} | failed |" + " |" * (6 + len(acc_head) + len(comm_head))
                         + f" {r.get('error', '')[:200]} |")
            continue
        vs = f"{r['samples_per_s'] / e2e['samples_per_s']:.2f}x" if e2e else ""
        ob = f"{r['of_bound']:.2f}" if r.get("of_bound") else ""
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        per = "; ".join(f"{fmt(x['compute_s'])} / {fmt(x['comm_s'])} / {fmt(x['idle_s'])}" for x in r["ranks"])
        sps = (_pm(r["samples_per_s_mean"], r["samples_per_s_std"], ".1f") if r.get("samples_per_s_mean")
               else f"{r['samples_per_s']:.1f}")  # --seeds: the mean over seeds; vs e2e / of bound: seed 0's
        bound = "≥ " if r["mode"] in LOWER_BOUND_EXACT and exact(r) is not None else ""
        cells = [name, sps, vs, ob, f"{bound}{mib(exact(r)):.2f}", f"{mib(peak(r)):.1f}",
                 fmt(None if peak(r, "eval_peak_mem_bytes") is None else mib(peak(r, "eval_peak_mem_bytes"))),
                 *([str(r["tune"]["chosen_text"]) if "tune" in r else "-"] if t else []),  # "-": not tuned
                 *accuracy_cells(result, r),
                 "-" if r.get("wire_bytes_per_sample") is None else f"{r['wire_bytes_per_sample']:.0f}",
                 *(["-" if r.get("comm_bytes_per_sample") is None else f"{r['comm_bytes_per_sample']:.0f}"]
                   if comm else []), per]
        lines.append("| " + " | ".join(cells) + " |")
    shares = [f"{r['mode']} {r['link_share']:.2f}" for r in result["rows"] if r.get("link_share")]
    if shares:
        lines += ["", "Link share (the busiest sender's bytes per wall second of its timed epochs over the raw TCP "
                  f"stream's rate; near 1 where the link sets the pace): {', '.join(shares)}"]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r.get("samples_per_s")]
    names = [f"e2e {r['threads']}thr" if r["mode"] == "e2e-Kthreads" else r["mode"] for r in rows]
    curves = [r for r in rows if r.get("curve")]
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(16 if curves else 11, 4))
    a, b = axes[0], axes[1]
    if curves:
        from ..report.plots import draw_accuracy_vs_time
        draw_accuracy_vs_time(axes[2], [(r["mode"], r) for r in curves], result.get("curve", {}).get("target_acc"))
    a.bar(names, [r["samples_per_s"] for r in rows], color="tab:blue")
    if "bound_samples_per_s" in result:
        a.axhline(result["bound_samples_per_s"], ls="--", c="k", label=f"bound ({result['bound']:.2f}x stages)")
        a.legend()
    a.set_ylabel("training samples / s")
    a.set_title(f"throughput, {result['ranks']} ranks")
    b.bar(names, [mib(exact(r)) for r in rows], color="tab:orange")
    b.set_ylabel("exact training memory of the largest rank (MiB)")
    b.set_title("memory (exact)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(out: Path, records: list[dict]) -> str:
    """OUT/cluster.json and cluster.md of a --nodes bench: every link's measured rate and, for the row
    bench, each row's throughput per link (from OUT/<link>/bench.json, where it is written yet). Returns
    the page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps({"nodes": records[0]["nodes"], "links": records}, indent=2))
    lines = [f"{records[0]['nodes']} emulated nodes (network namespaces behind a bridge; bench/cluster.py); "
             "bandwidth only: no latency, no loss", "",
             "| link | tbf rate MB/s | raw TCP stream MB/s | rows in |", "|---|---:|---:|---|"]
    for r in records:
        rate = f"{r['rate_bytes_per_s'] / 1e6:.2f}" if r.get("rate_bytes_per_s") else "unshaped"
        lines.append(f"| {r['link']} | {rate} | {r['tcp_bytes_per_s'] / 1e6:.2f} | {r['folder']}/ |")
    benches = {r["link"]: json.loads((out / r["folder"] / "bench.json").read_text()) for r in records
               if (out / r["folder"] / "bench.json").exists()}
    if benches:
        modes = list(dict.fromkeys(row["mode"] for b in benches.values() for row in b["rows"]))
        lines += ["", "samples/s per link (in brackets the link share: the busiest sender's bytes per second over "
                  "the TCP stream's)", "", "| row | " + " | ".join(benches) + " |",
                  "|---|" + "---:|" * len(benches)]
        for mode in modes:
            cells = []
            for b in benches.values():
                row = next((row for row in b["rows"] if row["mode"] == mode), {})
                share = f" ({row['link_share']:.2f})" if row.get("link_share") else ""
                cells.append(f"{row['samples_per_s']:.1f}{share}" if row.get("samples_per_s") else
                             ("failed" if row else ""))
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    (out / "cluster.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines) + "\n"
