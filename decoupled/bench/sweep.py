"""`decoupled bench --sweep depth`: e2e peak memory vs every rank's peak as VGG depth grows (the
cascade paper's Tables I and II), one block and one rank per VGG stage."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..job import to_toml
from .report import mib, peak
from .rows import prepare
from .launcher import Job, run
from .runner import machine

# Cascade Tables I/II style depth sweep: VGG stages, one decoupled block (and one rank) per stage.
DEFAULT_HIERARCHIES = "[1,1,1],[1,1,2,2],[1,1,2,2,2],[2,2,3,3,3],[2,2,4,4,4]"


def parse_lists(text: str) -> list[list[int]]:
    """'[1,1,2],[2,2]' -> [[1,1,2],[2,2]] (the TOML list literals of a --hierarchies flag)."""
    import tomllib
    return tomllib.loads(f"v = [{text}]")["v"]


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
        e = run(Job([*train, "--set", "train.mode=e2e", "--out", str(out / name / "e2e")]),
                out / name / "e2e.log", timeout, mmap_threshold)
        s = run(Job(train + ["--set", "train.mode=sync", "--out", str(out / name / "sync")], len(h)),
                out / name / "sync.log", timeout, mmap_threshold)
        if e or s:
            point["error"] = e or s
        else:
            es = json.loads((out / name / "e2e" / "summary.json").read_text())
            ss = json.loads((out / name / "sync" / "summary.json").read_text())
            point["e2e_peak_bytes"] = es["ranks"][0]["peak_mem_bytes"]
            point["rank_peak_bytes"] = [r["peak_mem_bytes"] for r in ss["ranks"]]
            point["max_rank_peak_bytes"] = peak(ss)
            known = point["max_rank_peak_bytes"] is not None and point["e2e_peak_bytes"] is not None
            point["ratio"] = point["max_rank_peak_bytes"] / max(point["e2e_peak_bytes"], 1) if known else None
            point["params"] = sum(l["params"] for l in ss["layers"])
        result["points"].append(point)
        print(f"  {name}: " + (f"e2e {mib(point['e2e_peak_bytes']):.1f} MiB, max rank "
                               f"{mib(point['max_rank_peak_bytes']):.1f} MiB, "
                               f"ratio {point['ratio'] or float('nan'):.2f}"
                               if "ratio" in point else f"FAILED: {point['error']}"), flush=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    lines = ["peak = growth over the post-init baseline (summary.json ranks[].mem_method says how it was "
             f"measured), one epoch; MALLOC_MMAP_THRESHOLD_="
             f"{result['malloc_mmap_threshold']}", "",
             "| VGG hierarchy | convs | ranks | e2e peak MiB | per-rank peak MiB | max rank / e2e |",
             "|---|---:|---:|---:|---|---:|"]
    for p in result["points"]:
        if "ratio" not in p:
            lines.append(f"| {p['hierarchy']} | {p['convs']} | {p['blocks']} | failed | {p['error'][:150]} | |")
            continue
        per = ", ".join(f"{mib(b):.1f}" for b in p["rank_peak_bytes"])
        lines.append(f"| {p['hierarchy']} | {p['convs']} | {p['blocks']} | {mib(p['e2e_peak_bytes']):.1f} | "
                     f"{per} | {p['ratio'] or float('nan'):.2f} |")
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
    ax.plot(x, [mib(p["e2e_peak_bytes"]) for p in pts], "o-", label="e2e (one process)")
    ax.plot(x, [mib(p["max_rank_peak_bytes"]) for p in pts], "s-", label="decoupled sync: largest rank")
    for p in pts:
        ax.scatter([p["convs"]] * len(p["rank_peak_bytes"]), [mib(b) for b in p["rank_peak_bytes"]], c="gray",
                   s=10, zorder=3)
    ax.set_xlabel("VGG depth (conv layers; one rank per stage)")
    ax.set_ylabel("peak memory above baseline (MiB)")
    ax.set_title("training memory vs depth (gray: every rank)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
