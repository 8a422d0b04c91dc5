"""`decoupled bench --sweep straggler`: one rank holds far more work than the others (dist.placement),
and the same job runs in sync and in async under each replay budget (replay.budget): what a slow
rank costs in each (wall time, throughput, final accuracy, steps and drops per rank, how long the
upstream rank was blocked).

    decoupled bench --sweep straggler --config launch/configs/straggler_cpu.toml --out runs/straggler
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..job import ConfigError, load, to_toml
from .launcher import Job, describe, run
from .runner import machine

# (row name, overrides): sync, then async under each replay budget
VARIANTS = [("sync", ["train.mode=sync"]),
            ("async-upstream", ["train.mode=async", "replay.budget=upstream"]),
            ("async-steps", ["train.mode=async", "replay.budget=steps"])]


def rank_facts(r: dict) -> dict:
    rep = r.get("replay") or {}
    train_s = r.get("train_s") or 0.0
    return {"rank": r["rank"], "blocks": r.get("blocks"), "steps": r.get("steps"),
            "optimizer_steps": r.get("optimizer_steps"), "samples_trained": r.get("samples_trained"),
            "blocked_share": (r.get("comm_s", 0.0) / train_s) if train_s else None,
            "idle_share": (r.get("idle_s", 0.0) / train_s) if train_s else None,
            "dropped": rep.get("dropped"), "fresh_draws": rep.get("fresh_draws"),
            "replayed_draws": rep.get("replayed_draws"), "staleness_mean": rep.get("staleness_mean")}


def straggler(config: str | None, overrides: list[str], out: Path, timeout: float = 900.0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = load(config, [*overrides, "train.checkpoint=false", "train.eval_every=0"])
    if not isinstance(base.dist.placement, list) or not base.dist.placement:
        raise ConfigError("bench --sweep straggler needs dist.placement (one rank with more blocks), e.g. "
                          "--set dist.placement=[1,2]")
    k = len(base.dist.placement)
    result = {"machine": machine(), "config": str(config), "overrides": list(overrides), "ranks": k,
              "placement": base.dist.placement, "rows": []}
    for name, sets in VARIANTS:
        cfg = load(None, sets, base=base)
        cfg_path = out / name / "config.toml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(to_toml(cfg))
        job = Job(["decoupled", "train", "--config", str(cfg_path), "--out", str(out / name / "run")], k)
        err = run(job, out / name / "train.log", timeout)
        row = {"mode": name, "cmd": describe(job)}
        if err:
            row["error"] = err
        else:
            s = json.loads((out / name / "run" / "summary.json").read_text())
            n = s["layers"][0]["train_samples"]  # the source rank trains every sample of every epoch once
            row.update(wall_s=s["wall_s"], samples_per_s=n / max(r["train_s"] for r in s["ranks"]),
                       test_acc=[l["test_acc"] for l in s["layers"]], ensemble_test_acc=s["ensemble_test_acc"],
                       ranks=[rank_facts(r) for r in s["ranks"]])
        result["rows"].append(row)
        print(f"  {name:15s} " + (f"wall {row['wall_s']:.1f}s, acc {row['test_acc'][-1]:.4f}" if "wall_s" in row
                                  else f"FAILED: {row['error']}"), flush=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    (out / "straggler.json").write_text(json.dumps(result, indent=2))
    (out / "straggler.md").write_text(markdown(result))
    return result


def fmt(v, p: int = 2) -> str:
    """A table cell: the number to p decimals, or "-" when unknown."""
    return "-" if v is None else f"{v:.{p}f}"


def markdown(result: dict) -> str:
    f = fmt
    lines = [f"placement {result['placement']} on {result['ranks']} ranks", "",
             "| run | wall s | samples/s | test acc per block | ensemble | per rank: steps / dropped / blocked share |",
             "|---|---:|---:|---|---:|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed | | | | {r['error'][:150]} |")
            continue
        per = "; ".join(f"r{x['rank']}: {x['steps']} / {x['dropped'] if x['dropped'] is not None else '-'} / "
                        f"{f(x['blocked_share'])}" for x in r["ranks"])
        lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | {r['samples_per_s']:.0f} | "
                     f"{' / '.join(f(a, 4) for a in r['test_acc'])} | {f(r['ensemble_test_acc'], 4)} | {per} |")
    return "\n".join(lines) + "\n"
