"""summary.json: what a finished run reports (docs/outputs.md). Per block: accuracy, samples,
epochs, parameters, training and inference FLOPs; per rank: measured memory, time and traffic."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from . import exits
from .job import JobConfig, plugin_code
from .flops import inference_flops, train_flops
from .metrics import PeakMemory


def layers(stages, layer_acc: dict[int, float], val_acc: dict[int, float] | None = None) -> list[dict]:
    """Per block; val_acc (accuracy on the data.val_fraction hold-out) when a validation split exists."""
    return [{"block": s.index, "test_acc": layer_acc[s.index],
             **({"val_acc": val_acc[s.index]} if val_acc is not None else {}),
             "train_samples": s.stats.samples, "epochs": s.stats.epochs_done,
             "epoch_samples": s.stats.epoch_samples, "params": sum(p.numel() for p in s.parameters()),
             "out_shape": list(s.out_shape), **s.stats.info} for s in stages]


def costs(cfg: JobConfig, stages, layer_rows: list[dict], end_to_end: bool = False) -> dict:
    """Training FLOPs per block and in total, inference FLOPs per exit (flops.py), into `layer_rows`.
    end_to_end: the stages trained as one network (the trainer's capability, flops.train_flops)."""
    per_block = train_flops(stages, end_to_end, len(stages), cfg.data.batch_size)
    per_exit = inference_flops(stages, [exits.uses_commitment(s) for s in stages], cfg.data.batch_size)
    for layer, t, i in zip(layer_rows, per_block, per_exit):
        layer.update(train_flops=t, inference_flops=i)
    return {"train_flops": sum(per_block)}


def exit_curve(cfg: JobConfig, stages, test, device, out: Path, layer_rows: list[dict],
               thresholds=None, fallback: str | None = None) -> dict:
    """The early-exit curve of a network held in one process (every block in `stages`)."""
    return exit_fields(cfg, exits.collect(stages, test, cfg.data.eval_batch_size, device),
                       exits.block_costs(stages, cfg.data.batch_size), out, layer_rows, thresholds, fallback)


def exit_fields(cfg: JobConfig, outs: exits.ExitOutputs, costs: list[tuple], out: Path, layer_rows: list[dict],
                thresholds=None, fallback: str | None = None) -> dict:
    """The early-exit curve (exits.py) of every exit's test answers `outs` and the blocks' costs
    (exits.block_costs) into summary fields, and exit_curve.png; one process or joined ranks alike."""
    thresholds = thresholds or (*exits.THRESHOLDS, *cfg.objective.exit_thresholds())
    fallback = fallback or cfg.objective.exit_fallback
    curve, per_exit = exits.report(outs, costs, thresholds, fallback, [layer["test_acc"] for layer in layer_rows],
                                   out / "exit_curve.png",
                                   f"{cfg.objective.name} / {cfg.model.name} on {cfg.data.name} (fallback: {fallback})")
    for layer, flops in zip(layer_rows, per_exit):
        layer["inference_flops"] = flops
    return {"exit_fallback": fallback, "exit_curve": curve}


def joined_exit_fields(cfg: JobConfig, parts: list[tuple], out: Path, layer_rows: list[dict]) -> dict:
    """A distributed run's early-exit curve: each rank's (exit answers, exits.block_costs), ranks in
    block order, joined into one network's."""
    return exit_fields(cfg, exits.concat([outs for outs, _ in parts]), [c for _, costs in parts for c in costs],
                       out, layer_rows)


def rank_report(rank: int, stages, memory: PeakMemory, train_s: float, extra: dict) -> dict:
    samples = sum(s.stats.samples for s in stages) / len(stages)  # network samples its blocks trained on
    return {"rank": rank, "blocks": [s.index for s in stages], **memory.report(),
            "samples_per_s": samples / train_s if train_s > 0 else 0.0, "train_s": train_s,
            "compute_s": sum(s.stats.compute_s for s in stages), **extra}


def save_rank_report(out: Path, rank: int, report: dict) -> None:
    """RUN/reports/rank{r}.json, written atomically as soon as a rank is done."""
    folder = out / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(folder / f"rank{rank}.json")


def merge_rank_layers(groups: list[list[dict]]) -> list[dict]:
    """Every stage group's layers in block order, each block once: a group's replicas each trained on
    and scored a share of the data, so samples, training FLOPs and test counts add up over them.
    A sample reaching an exit in group g went through every earlier group's blocks, so inference
    FLOPs accumulate across groups."""
    out, offset = [], 0.0
    for replicas in groups:
        first = replicas[0]
        tested = sum(r["tested"] for r in replicas)
        for k, layer in enumerate(first["layers"]):
            rows = [r["layers"][k] for r in replicas]
            layer["test_acc"] = sum(r["correct"][layer["block"]] for r in replicas) / max(tested, 1)
            if "val_acc" in layer:  # data.val_fraction > 0: the validation split, shared out the same way
                val = sum(r["val_correct"][layer["block"]] for r in replicas)
                layer["val_acc"] = val / max(sum(r["val_tested"] for r in replicas), 1)
            for key in ("train_samples", "train_flops"):
                layer[key] = sum(row[key] for row in rows)
            layer["epoch_samples"] = [sum(e) for e in zip(*(row["epoch_samples"] for row in rows))]
            layer["inference_flops"] += offset
        offset = first["layers"][-1]["inference_flops"]
        out += first["layers"]
    return out


def params_sha(stages) -> str:
    """A hash of the blocks' parameters (and heads'): the replicas of a stage group must agree."""
    h = hashlib.sha256()
    for s in stages:
        for p in s.parameters():
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write(cfg: JobConfig, out: Path, world_size: int, device, t_start: float, layer_rows, ensemble, ranks,
          **extra) -> dict:
    summary = {"mode": cfg.train.mode, "objective": cfg.objective.name, "model": cfg.model.name,
               "dataset": cfg.data.name, "run_dir": str(out), "world_size": world_size, "device": str(device),
               "wall_s": time.perf_counter() - t_start, "layers": layer_rows, "ensemble_test_acc": ensemble,
               "ranks": ranks, **extra}
    code = plugin_code(cfg)
    if code:  # which plug-in code ran (file and hash): every rank checked it imports the same
        summary["plugins"] = code
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
