"""`decoupled bench --sweep layouts`: the same sync job on the same number of ranks, laid out three
ways: an even split of the blocks (one rank per group), dist.placement="auto" (the split from
measured block times), and dist.placement="auto" with dist.replicas="auto" (a slow stage held by
several ranks that average their gradients); when the config gives dist.replicas as a list, a fourth
layout uses it with dist.placement="auto". Per layout: throughput, the predicted per-group time
against each rank's measured compute, and each rank's idle and blocked shares.

    decoupled bench --sweep layouts --config launch/configs/layouts_cpu.toml --ranks 3 --out runs/layouts
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..job import load, to_toml
from .launcher import Job, describe, run
from .runner import machine
from .straggler import fmt, rank_facts

VARIANTS = [("even", ["dist.placement=[]", "dist.replicas=[]"]),
            ("auto", ["dist.placement=\"auto\"", "dist.replicas=[]"]),
            ("auto+replicas", ["dist.placement=\"auto\"", "dist.replicas=\"auto\""])]


def layouts(config: str | None, overrides: list[str], ranks: int, out: Path, timeout: float = 900.0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = load(config, [*overrides, "train.mode=sync", "train.checkpoint=false"])
    result = {"machine": machine(), "config": str(config), "overrides": list(overrides), "ranks": ranks,
              "rows": []}
    variants = list(VARIANTS)
    if isinstance(base.dist.replicas, list) and any(r > 1 for r in base.dist.replicas):
        variants.append((f"auto+replicas={base.dist.replicas}", ["dist.placement=\"auto\""]))
    for name, sets in variants:
        cfg = load(None, sets, base=base)
        cfg_path = out / _folder(name) / "config.toml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(to_toml(cfg))
        job = Job(["decoupled", "train", "--config", str(cfg_path), "--out", str(cfg_path.parent / "run")], ranks)
        err = run(job, cfg_path.parent / "train.log", timeout)
        row = {"mode": f"sync {name}", "layout": name, "world": ranks, "cmd": describe(job)}
        if err:
            row["error"] = err
        else:
            row.update(facts(json.loads((cfg_path.parent / "run" / "summary.json").read_text())))
        result["rows"].append(row)
        print(f"  {name:14s} " + (f"{row['samples_per_s']:.0f} samples/s, groups {row['placement']} x "
                                  f"{row['replicas']}" if "samples_per_s" in row else f"FAILED: {row['error']}"),
              flush=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    (out / "layouts.json").write_text(json.dumps(result, indent=2))
    (out / "layouts.md").write_text(markdown(result))
    return result


def _folder(name: str) -> str:
    return name.replace("=", "-").replace("[", "").replace("]", "").replace(", ", "-").replace(",", "-")


def facts(s: dict) -> dict:
    """What one layout's summary says: throughput over the slowest rank's training time, each group's
    predicted and measured seconds per epoch (a group's measured time: its slowest replica's compute
    plus all-reduce), and per-rank shares."""
    epochs = max(l["epochs"] for l in s["layers"])
    n = s["layers"][0]["train_samples"]  # every sample of every epoch, over the source group's replicas
    groups = len(s["placement"])
    measured = [max((r["compute_s"] + r.get("allreduce_s", 0.0)) / epochs for r in s["ranks"] if r["stage"] == g)
                for g in range(groups)]
    return {"placement": s["placement"], "replicas": s.get("replicas", [1] * groups),
            "samples_per_s": n / max(r["train_s"] for r in s["ranks"]),
            "predicted_stage_s": s.get("predicted_stage_s"), "measured_stage_s": measured,
            "bound_samples_per_s": (n / epochs / max(s["predicted_stage_s"])) if s.get("predicted_stage_s") else None,
            "test_acc": [l["test_acc"] for l in s["layers"]], "wall_s": s["wall_s"],
            "ranks_facts": [{**rank_facts(r), "stage": r["stage"], "allreduce_s": r.get("allreduce_s")}
                            for r in s["ranks"]]}


def markdown(result: dict) -> str:
    f = fmt
    m = result["machine"]
    lines = [f"{result['ranks']} ranks, sync, on {m.get('cpus_usable', '?')} usable CPUs ({m.get('cpu_model', '?')}), "
             f"torch {m.get('torch')}, {m.get('time')}", "",
             "| layout | blocks per group | ranks per group | samples/s | predicted s/epoch per group | "
             "measured s/epoch per group | idle share per rank | last block acc |",
             "|---|---|---|---:|---|---|---|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['layout']} | failed | | | | | | {r['error'][:150]} |")
            continue
        pred = " / ".join(f(v) for v in r["predicted_stage_s"]) if r["predicted_stage_s"] else "-"
        lines.append(f"| {r['layout']} | {[len(g) for g in r['placement']]} | {r['replicas']} | "
                     f"{r['samples_per_s']:.0f} | {pred} | {' / '.join(f(v) for v in r['measured_stage_s'])} | "
                     f"{' / '.join(f(x['idle_share']) for x in r['ranks_facts'])} | {f(r['test_acc'][-1], 4)} |")
    return "\n".join(lines) + "\n"
