"""`decoupled bench`: every way to train one model split, measured side by side on the same cores.

One invocation times, on the same config, data and K-rank split:
  stages        each rank's blocks alone (forward + local backward + head + step) on cached inputs:
                t_k seconds per epoch, bound = sum(t_k) / max(t_k), bound throughput = n / max(t_k)
  e2e           end-to-end backprop in one process, 1 thread    (the real `decoupled train`)
  e2e-Kthreads  the same with K threads (OMP_NUM_THREADS=K)
  sequential    greedy block after block on cached pseudo-inputs
  sync, async   the decoupled engine on K torchrun ranks
  gpipe         the e2e network through torch.distributed.pipelining on the same K-rank split

Every row is a fresh process (or a torchrun job), because peak memory (CPU VmHWM) is per process.
Timing: every row trains 1 + repeats epochs; the first is warm-up and is dropped; a row's time is
the median of the other epochs' wall times, read from the run's own metrics.jsonl stamps (or timed
by the worker), so process start, data loading and the final evaluation never count. Throughput is
training samples per second of that median epoch.

    decoupled bench --config launch/configs/bench_cpu.toml --ranks 2 --out runs/bench
    decoupled bench --sweep depth --config launch/configs/bench_cpu.toml --out runs/sweep

Writes bench.json, bench.md and bench.png (sweep: sweep.json, sweep.md, sweep.png) into --out.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from .config import ConfigError, JobConfig, load, to_toml

ROWS = ("e2e", "e2e-Kthreads", "sequential", "sync", "async", "gpipe")
# Cascade Tables I/II style depth sweep: VGG stages, one decoupled block (and one rank) per stage.
DEFAULT_HIERARCHIES = "[1,1,1],[1,1,2,2],[1,1,2,2,2],[2,2,3,3,3],[2,2,4,4,4]"
MiB = 2 ** 20


# ---------------------------------------------------------------------------- small pure helpers

def median(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def bound(stage_s: list[float]) -> float:
    """Ideal pipeline speed-up over running the stages one after another: sum(t_k) / max(t_k)."""
    return sum(stage_s) / max(stage_s)


def bound_samples_per_s(n: int, stage_s: list[float]) -> float:
    """A pipeline is as fast as its slowest stage: n samples per max(t_k) seconds."""
    return n / max(stage_s)


def timed(stamps: list[float]) -> list[float]:
    """Epoch wall times from end-of-epoch stamps; the first stamp closes the warm-up epoch, so
    N+1 stamps give N timed epochs."""
    return [b - a for a, b in zip(stamps, stamps[1:])]


def parse_lists(text: str) -> list[list[int]]:
    """'[1,1,2],[2,2]' -> [[1,1,2],[2,2]] (the TOML list literals of a --hierarchies flag)."""
    import tomllib
    return tomllib.loads(f"v = [{text}]")["v"]


def machine() -> dict:
    import torch
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "loadavg_start": list(os.getloadavg()), "cuda": torch.cuda.is_available(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---------------------------------------------------------------------------- processes

def env(threads: int, mmap_threshold: int = 0) -> dict:
    # One process = `threads` intra-op threads (1 per rank on CPU): no rank steals another's core.
    e = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if mmap_threshold:
        # glibc raises its mmap threshold whenever a large block is freed, so after the first step
        # activations come from the heap and VmHWM grows with fragmentation (block 0 of a VGG alone:
        # 45 MiB after one step, 76 MiB after five). A fixed threshold maps every tensor above it
        # on its own and unmaps it when freed: VmHWM then tracks live tensor bytes. It costs page
        # faults (train steps 1.3-2.7x slower), so only the memory-only sweep uses it by default.
        e["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    return e


def torchrun(k: int, module_args: list[str]) -> list[str]:
    # --standalone: the agent picks its own free port, so concurrent jobs never race for one
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}", "-m", *module_args]


def run(cmd: list[str], log: Path, threads: int, timeout: float, mmap_threshold: int = 0) -> str | None:
    """Run one row's process; None if it worked, else the error (exit code + the log's tail)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        try:
            p = subprocess.run(cmd, env=env(threads, mmap_threshold), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f}s (see {log})"
    if p.returncode != 0:
        tail = [l for l in log.read_text().splitlines()[1:] if l.strip()][-6:]  # [0] is the command
        return f"exit code {p.returncode}: " + " | ".join(tail)
    return None


# ---------------------------------------------------------------------------- row results

def rank_row(r: dict, window: dict | None = None) -> dict:
    """A summary.json rank entry in the bench schema; compute/comm/idle are seconds per timed epoch."""
    out = {"rank": r["rank"], "blocks": r.get("blocks"), "peak_mem_bytes": r["peak_mem_bytes"]}
    out.update(window or {"compute_s": r.get("compute_s", 0.0), "comm_s": r.get("comm_s", 0.0),
                          "idle_s": r.get("idle_s", 0.0)})
    return out


def single_process_row(mode: str, out: Path, n: int) -> dict:
    """e2e / sequential, from the real trainer's run directory. train.log_every is one epoch of
    steps, so every block logs a `step` record at the end of each of its epochs."""
    summary = json.loads((out / "summary.json").read_text())
    stamps: dict[int, list[float]] = {}
    for m in read_jsonl(out / "metrics.jsonl"):
        if m.get("kind") == "step":
            stamps.setdefault(m["block"], []).append(m["time_s"])
    # e2e logs only its last block; sequential trains blocks one after another, so one epoch of
    # the whole network costs the sum over blocks of each block's median epoch
    per_block = {b: median(timed(s)) for b, s in sorted(stamps.items())}
    epoch_s = sum(per_block.values())
    r = summary["ranks"][0]
    rank = rank_row(r, {"compute_s": epoch_s, "comm_s": 0.0, "idle_s": 0.0})
    row = {"mode": mode, "samples_per_s": n / epoch_s, "epoch_s": epoch_s,
           "epochs_timed": [timed(s) for _, s in sorted(stamps.items())], "ranks": [rank]}
    if mode == "sequential":
        row["block_epoch_s"] = per_block
    return row


def pipeline_row(mode: str, out: Path, n: int, batch: int) -> dict:
    """sync / async on K ranks: end-of-epoch stamps and cumulative counters per rank from
    metrics.jsonl. The network's epoch time is the last rank's (it closes every epoch)."""
    summary = json.loads((out / "summary.json").read_text())
    ends: dict[int, list[dict]] = {}
    for m in read_jsonl(out / "metrics.jsonl"):
        if m.get("kind") == "epoch_end":
            ends.setdefault(m["rank"], []).append(m)
    ranks, dropped = [], 0
    for r in summary["ranks"]:
        e = sorted(ends.get(r["rank"], []), key=lambda m: m["epoch"])
        k = max(len(e) - 1, 1)  # timed epochs
        per = lambda key: (e[-1].get(key, 0.0) - e[0].get(key, 0.0)) / k  # noqa: E731  (per timed epoch)
        row = rank_row(r, {"compute_s": per("compute_s"), "comm_s": per("comm_s"), "idle_s": per("idle_s")})
        row["steps_per_epoch"] = per("steps")
        row["epoch_s"] = median(timed([m["time_s"] for m in e]))
        if "replay" in e[-1]:  # async: batches evicted before ever being trained on
            d = (e[-1]["replay"]["dropped"] - e[0]["replay"]["dropped"]) / k
            row["dropped_batches_per_epoch"] = d
            dropped += d
        ranks.append(row)
    last = sorted(ends[summary["ranks"][-1]["rank"]], key=lambda m: m["epoch"])
    epoch_s = median(timed([m["time_s"] for m in last]))
    # async drops batches a rank was too slow to take: count only samples the whole network saw
    trained = max(n - dropped * batch, 0)
    return {"mode": mode, "samples_per_s": trained / epoch_s, "epoch_s": epoch_s,
            "epochs_timed": timed([m["time_s"] for m in last]), "ranks": ranks,
            "placement": summary.get("placement"), "backend": summary.get("backend")}


# ---------------------------------------------------------------------------- the benchmark

def prepare(config: str | None, overrides: list[str], repeats: int) -> tuple[JobConfig, int]:
    """The config every row runs: the user's, then the bench's timing knobs. Returns (cfg, n_train)."""
    from .data import build_data
    base = load(config, overrides)
    data = build_data(base.data, base.train.seed)  # only for the training-set size
    n = len(data.train)
    steps = -(-n // base.data.batch_size)
    cfg = load(None, [f"train.epochs={1 + repeats}",  # epoch 0 is warm-up
                      "train.eval_every=0", "train.checkpoint=false", "train.probe_epochs=0",
                      f"train.log_every={steps}",  # one `step` record per block per epoch: its end stamp
                      f"data.eval_batch_size={base.data.batch_size}"],  # the peak is training's, not eval's
               base=base)
    return cfg, n


def bench(config: str | None, overrides: list[str], ranks: int, out: Path, repeats: int = 3,
          microbatches: int = 4, rows: tuple[str, ...] = ROWS, timeout: float = 900.0,
          mmap_threshold: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    cfg, n = prepare(config, overrides, repeats)
    cfg_path = out / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    B = cfg.data.batch_size
    py = [sys.executable, "-m"]
    train = ["decoupled", "train", "--config", str(cfg_path)]

    print(f"bench: {n} training samples, batch {B}, {ranks} ranks, {repeats} timed epochs (+1 warm-up) per row")
    result: dict = {"rows": [], "machine": info, "config": str(config), "overrides": list(overrides),
                    "n_train": n, "batch_size": B, "ranks": ranks, "repeats": repeats, "microbatches": microbatches,
                    "malloc_mmap_threshold": mmap_threshold or "glibc default (dynamic)"}

    # 1. each rank's stages alone: the bound
    err = run(py + ["decoupled.bench", "stages", str(cfg_path), str(ranks), str(out / "stages.json")],
              out / "logs" / "stages.log", 1, timeout, mmap_threshold)
    stage_s = None
    if err is None:
        result["stages"] = json.loads((out / "stages.json").read_text())
        stage_s = [s["epoch_s"] for s in result["stages"]]
        result["bound"] = bound(stage_s)
        result["bound_samples_per_s"] = bound_samples_per_s(n, stage_s)
    else:
        result["stages_error"] = err

    for mode in rows:
        t0 = time.perf_counter()
        d = out / mode
        threads, sets = 1, ["--out", str(d)]
        if mode in ("e2e", "e2e-Kthreads"):
            threads = ranks if mode == "e2e-Kthreads" else 1
            cmd = py + train + ["--set", "train.mode=e2e", *sets]
        elif mode == "sequential":
            cmd = py + train + ["--set", "train.mode=sequential", *sets]
        elif mode in ("sync", "async"):
            cmd = torchrun(ranks, train + ["--set", f"train.mode={mode}", *sets])
        else:  # gpipe
            cmd = torchrun(ranks, ["decoupled.gpipe", str(cfg_path), str(d / "gpipe.json"), str(microbatches)])
        if mode == "gpipe" and B % microbatches:
            err = f"data.batch_size={B} is not divisible by --microbatches={microbatches}"
        else:
            err = run(cmd, out / "logs" / f"{mode}.log", threads, timeout, mmap_threshold)
        if err is not None:
            row = {"mode": mode, "error": err, "samples_per_s": None, "ranks": []}
        else:
            try:
                if mode in ("sync", "async"):
                    row = pipeline_row(mode, d, n, B)
                elif mode == "gpipe":
                    row = json.loads((d / "gpipe.json").read_text())
                else:
                    row = single_process_row(mode, d, n)
            except (OSError, KeyError, ValueError, ZeroDivisionError) as e:
                row = {"mode": mode, "error": f"could not read the run: {e!r}", "samples_per_s": None, "ranks": []}
        if mode == "e2e-Kthreads":
            row["threads"] = ranks
        if mode in ("sync", "async") and stage_s and row.get("samples_per_s"):
            row["bound_samples_per_s"] = result["bound_samples_per_s"]
            row["of_bound"] = row["samples_per_s"] / result["bound_samples_per_s"]
        row["cmd"] = " ".join(cmd)
        row["bench_wall_s"] = time.perf_counter() - t0
        row["loadavg_1min_after"] = os.getloadavg()[0]  # other users' load skews a row: keep the evidence
        result["rows"].append(row)
        sps = row.get("samples_per_s")
        print(f"  {mode:13s} " + (f"{sps:9.1f} samples/s" if sps else f"FAILED: {row['error']}")
              + f"  ({row['bench_wall_s']:.0f}s)", flush=True)

    info["loadavg_end"] = list(os.getloadavg())
    result["targets"] = targets(result)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown(result))
    chart(result, out / "bench.png")
    return result


def _row(result: dict, mode: str) -> dict | None:
    return next((r for r in result["rows"] if r["mode"] == mode and r.get("samples_per_s")), None)


def peak(row: dict) -> int:
    return max((r["peak_mem_bytes"] for r in row["ranks"]), default=0)


def targets(result: dict) -> dict:
    """The issue's three targets, measured (None where a row is missing)."""
    sync, gpipe, e2e = _row(result, "sync"), _row(result, "gpipe"), _row(result, "e2e")
    t = {}
    if sync and "of_bound" in sync:
        t["sync_of_bound"] = {"value": sync["of_bound"], "target": 0.85, "met": sync["of_bound"] >= 0.85}
    if sync and gpipe:
        v = sync["samples_per_s"] / gpipe["samples_per_s"]
        t["sync_over_gpipe"] = {"value": v, "target": 1.3, "met": v >= 1.3}
    if sync and e2e and peak(e2e) > 0:
        v = peak(sync) / peak(e2e)
        blocks = sum(len(p) for p in sync.get("placement") or [])
        t["max_rank_peak_over_e2e_peak"] = {"value": v, "target": 0.6, "met": v <= 0.6, "blocks": blocks,
                                           "applies": blocks >= 3}
    return t


# ---------------------------------------------------------------------------- reports

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
        if not r.get("samples_per_s"):
            lines.append(f"| {name} | failed | | | | {r.get('error', '')[:200]} |")
            continue
        vs = f"{r['samples_per_s'] / e2e['samples_per_s']:.2f}x" if e2e else ""
        ob = f"{r['of_bound']:.2f}" if "of_bound" in r else ""
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        per = "; ".join(f"{x['compute_s']:.2f} / {fmt(x['comm_s'])} / {fmt(x['idle_s'])}" for x in r["ranks"])
        lines.append(f"| {name} | {r['samples_per_s']:.1f} | {vs} | {ob} | {peak(r) / MiB:.1f} | {per} |")
    if result.get("targets"):
        lines += ["", "| target | measured | wanted | met |", "|---|---:|---:|---|"]
        for k, v in result["targets"].items():
            op = "<=" if k.startswith("max_rank") else ">="
            note = "" if v.get("applies", True) else f" (n/a: {v['blocks']} blocks < 3)"
            lines.append(f"| {k} | {v['value']:.2f} | {op} {v['target']} | {'yes' if v['met'] else 'no'}{note} |")
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
    b.bar(names, [peak(r) / MiB for r in rows], color="tab:orange")
    b.set_ylabel("peak memory of the largest process (MiB)")
    b.set_title("peak memory")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- depth sweep

def sweep_depth(config: str | None, overrides: list[str], out: Path, hierarchies: list[list[int]],
                timeout: float = 900.0, mmap_threshold: int = 65536) -> dict:
    """e2e peak vs per-rank peak as VGG depth grows (Marquez 2018, Tables I and II): one block and
    one rank per VGG stage, one epoch each (the peak does not need a warm-up)."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "config": str(config), "overrides": list(overrides), "points": [],
              "malloc_mmap_threshold": mmap_threshold or "glibc default (dynamic)"}
    for h in hierarchies:
        name = "h" + "-".join(map(str, h))
        cfg, _ = prepare(config, [*overrides, "model.name=vgg", f"model.hierarchy={h}", f"model.blocks={len(h)}",
                                  "model.block_sizes=[]", "model.channels=[]", "dist.placement=[]"], repeats=0)
        cfg_path = out / name / "config.toml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(to_toml(cfg))
        train = ["decoupled", "train", "--config", str(cfg_path)]
        point = {"hierarchy": h, "convs": sum(h), "blocks": len(h)}
        e = run([sys.executable, "-m", *train, "--set", "train.mode=e2e", "--out", str(out / name / "e2e")],
                out / name / "e2e.log", 1, timeout, mmap_threshold)
        s = run(torchrun(len(h), train + ["--set", "train.mode=sync", "--out", str(out / name / "sync")]),
                out / name / "sync.log", 1, timeout, mmap_threshold)
        if e or s:
            point["error"] = e or s
        else:
            es = json.loads((out / name / "e2e" / "summary.json").read_text())
            ss = json.loads((out / name / "sync" / "summary.json").read_text())
            point["e2e_peak_bytes"] = es["ranks"][0]["peak_mem_bytes"]
            point["rank_peak_bytes"] = [r["peak_mem_bytes"] for r in ss["ranks"]]
            point["max_rank_peak_bytes"] = max(point["rank_peak_bytes"])
            point["ratio"] = point["max_rank_peak_bytes"] / max(point["e2e_peak_bytes"], 1)
            point["params"] = sum(l["params"] for l in ss["layers"])
        result["points"].append(point)
        print(f"  {name}: " + (f"e2e {point['e2e_peak_bytes'] / MiB:.1f} MiB, max rank "
                               f"{point['max_rank_peak_bytes'] / MiB:.1f} MiB, ratio {point['ratio']:.2f}"
                               if "ratio" in point else f"FAILED: {point['error']}"), flush=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    lines = [f"peak = VmHWM growth over the post-init baseline, one epoch; MALLOC_MMAP_THRESHOLD_="
             f"{result['malloc_mmap_threshold']}", "",
             "| VGG hierarchy | convs | ranks | e2e peak MiB | per-rank peak MiB | max rank / e2e |",
             "|---|---:|---:|---:|---|---:|"]
    for p in result["points"]:
        if "ratio" not in p:
            lines.append(f"| {p['hierarchy']} | {p['convs']} | {p['blocks']} | failed | {p['error'][:150]} | |")
            continue
        per = ", ".join(f"{b / MiB:.1f}" for b in p["rank_peak_bytes"])
        lines.append(f"| {p['hierarchy']} | {p['convs']} | {p['blocks']} | {p['e2e_peak_bytes'] / MiB:.1f} | "
                     f"{per} | {p['ratio']:.2f} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    sweep_chart(result, out / "sweep.png")
    return result


def sweep_chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [p for p in result["points"] if "ratio" in p]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p["convs"] for p in pts]
    ax.plot(x, [p["e2e_peak_bytes"] / MiB for p in pts], "o-", label="e2e (one process)")
    ax.plot(x, [p["max_rank_peak_bytes"] / MiB for p in pts], "s-", label="decoupled sync: largest rank")
    for p in pts:
        ax.scatter([p["convs"]] * len(p["rank_peak_bytes"]), [b / MiB for b in p["rank_peak_bytes"]], c="gray",
                   s=10, zorder=3)
    ax.set_xlabel("VGG depth (conv layers; one rank per stage)")
    ax.set_ylabel("peak memory above baseline (MiB)")
    ax.set_title("training memory vs depth (gray: every rank)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI and workers

def add_parser(sub) -> None:
    """`decoupled bench ...` (wired in cli.py)."""
    b = sub.add_parser("bench", help="time every baseline side by side (e2e, sequential, sync, async, gpipe)")
    b.add_argument("--config", help="TOML config (e.g. launch/configs/bench_cpu.toml)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    b.add_argument("--ranks", type=int, default=2, help="K: torchrun ranks for sync/async/gpipe, threads of e2e-Kthreads")
    b.add_argument("--out", type=Path, help="output folder (default runs/bench-<timestamp>)")
    b.add_argument("--repeats", type=int, default=3, help="timed epochs per row, after one warm-up epoch")
    b.add_argument("--microbatches", type=int, default=4, help="GPipe microbatches per batch")
    b.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    b.add_argument("--sweep", choices=["depth"], help="instead: e2e vs per-rank peak memory as VGG depth grows")
    b.add_argument("--hierarchies", default=DEFAULT_HIERARCHIES,
                   help="--sweep depth: VGG hierarchies, one block and one rank per stage")
    b.add_argument("--mmap-threshold", type=int,
                   help="MALLOC_MMAP_THRESHOLD_ for every process, so CPU VmHWM tracks tensor bytes rather than "
                        "glibc heap growth (slows steps); default 65536 for --sweep, 0 (glibc's own) for the bench")
    b.add_argument("--timeout", type=float, default=900.0, help="seconds per row before it counts as failed")


def main(args) -> int:
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    bad = [r for r in rows if r not in ROWS]
    if bad or args.ranks < 1 or args.repeats < 1 or args.microbatches < 1:
        raise ConfigError(f"bench: --rows must be among {', '.join(ROWS)} (got {bad}); --ranks, --repeats and "
                          "--microbatches must be >= 1")
    out = args.out or Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")
    if args.sweep == "depth":
        threshold = 65536 if args.mmap_threshold is None else args.mmap_threshold
        sweep_depth(args.config, args.overrides, out, parse_lists(args.hierarchies), args.timeout, threshold)
        print((out / "sweep.md").read_text() + f"written: {out}/sweep.json, sweep.md, sweep.png")
        return 0
    result = bench(args.config, args.overrides, args.ranks, out, args.repeats, args.microbatches, rows,
                   args.timeout, args.mmap_threshold or 0)
    print(markdown(result) + f"written: {out}/bench.json, bench.md, bench.png")
    return 1 if any("error" in r for r in result["rows"]) else 0


def time_stages(cfg_path: str, ranks: int, out: str) -> None:
    """Worker (fresh process): each rank's blocks alone, exactly the `Stage.train_step` the engine
    runs, on that rank's inputs computed once (eval mode, like the sequential cache)."""
    import torch

    from .data import Split, batches, build_data
    from .engine.distributed import placement
    from .engine.stage import build_stages
    from .train import resolve_device
    cfg = load(cfg_path)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, cfg.train.seed)
    stages = build_stages(cfg, data.input_shape, data.num_classes, device)
    x, y = data.train.x.to(device), data.train.y.to(device)
    res = []
    for r, group in enumerate(placement(cfg, len(stages), ranks)):
        mine = [stages[j] for j in group]
        times = []
        for epoch in range(cfg.train.epochs):
            t0 = time.perf_counter()
            for b in batches(Split(x, y), cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
                             augment=cfg.data.augment and r == 0):
                h = b.x
                for s in mine:
                    h, _ = s.train_step(h, b.y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        res.append({"rank": r, "blocks": group, "epoch_s": median(times[1:]), "epochs": times})
        with torch.no_grad():  # the next rank's inputs
            outs = []
            for i in range(0, len(x), cfg.data.eval_batch_size):
                h = x[i:i + cfg.data.eval_batch_size]
                for s in mine:
                    h = s.forward(h)
                outs.append(h)
            x = torch.cat(outs)
    Path(out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":  # python -m decoupled.bench stages CONFIG RANKS OUT.json
    if len(sys.argv) == 5 and sys.argv[1] == "stages":
        time_stages(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit("usage: python -m decoupled.bench stages CONFIG.toml RANKS OUT.json (use `decoupled bench`)")
