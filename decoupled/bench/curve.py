"""Time to accuracy (`decoupled bench --curve`): each row's test accuracy after every epoch against its
cumulative training time, evaluation excluded, read from the row's run directory.

A point is {epoch, step, train_s, test_acc}: `step` source steps (the data loader's batches, across
epochs) are trained, `epoch` = step / steps per epoch (1-based at an epoch's end, a fraction between:
train.eval_every_steps, whose points also carry `tested`, the test samples scored: train.eval_subset).
The accuracy is the network's output: the last block's head (for every row, decoupled or not).
train_s counts from the loop's start (the run's `train_start` record) to the end of the training
before that evaluation, minus every evaluation before it.

Note [evaluation windows]: the engine evaluates inside its training loop (train.eval_every), so an
evaluation's time is cut out from stamps on both sides of it: single-process modes stamp the last
step of an epoch (`step` with train.log_every = one epoch of steps) and the evaluated epoch
(`epoch`); a torchrun rank stamps the end of an epoch (`epoch_end`) and of the evaluation that
follows it (`eval`). Ranks time on their own clocks, so every figure is one rank's: the last stage
group's (the sink, which scores the last head), whose evaluation window spans the whole pipeline's
evaluation (it waits for every evaluation batch from upstream). With replicas in the last group, the
slowest replica's time and the test-set-weighted accuracy. What an upstream rank trains while the
sink still evaluates (at most the pipeline's depth in batches) counts as training.
An async row under replay.budget="steps" evaluates after every epoch of the stream as well, and once
more when every block has made its budget: that last point may come after extra epochs the sources
streamed for a slow rank (engine/ranks/sources.py), and when they stopped mid-epoch it has no
`epoch_end` stamp: its training ends at the rank's last epoch stamp before it (its budget's end).
A mid-epoch evaluation (train.eval_every_steps) has no epoch stamp before it: its `step_eval` record
carries the end of the training before it (`train_end_s`; a rank: its newest batch trained before the
first evaluation batch came, so what an async rank draws between evaluation batches counts as
evaluation) and is itself stamped at the evaluation's end.
"""
from __future__ import annotations

import math
from pathlib import Path

from .runner import median, read_jsonl


def time_to_target(curve: list[dict] | None, target: float | None) -> float | None:
    """train_s of the first point at or above `target`; None when never reached (or no curve)."""
    if not curve or target is None:
        return None
    return next((p["train_s"] for p in curve if p["test_acc"] >= target), None)


def point(step: int, steps_per_epoch: int, train_s: float, acc: float, tested: int | None = None) -> dict:
    whole = step % steps_per_epoch == 0
    p = {"epoch": step // steps_per_epoch if whole else round(step / steps_per_epoch, 4), "step": step,
         "train_s": train_s, "test_acc": acc}
    return p if tested is None else {**p, "tested": tested}


def single_process_curve(out: Path, steps_per_epoch: int) -> list[dict]:
    """e2e / e2e-checkpoint / e2e-Kthreads from their metrics.jsonl (Note [evaluation windows])."""
    records = read_jsonl(out / "metrics.jsonl")
    start = next(m["time_s"] for m in records if m.get("kind") == "train_start")
    ends: dict[int, float] = {}
    for m in records:
        if m.get("kind") == "step":
            ends[m["epoch"]] = max(ends.get(m["epoch"], 0.0), m["time_s"])  # the epoch's last logged step
    curve, evaluating = [], 0.0
    for m in records:  # in time order: mid-epoch evaluations come before their epoch's own
        if m.get("kind") == "epoch" and m.get("block") is None and m["epoch"] in ends:
            end = ends[m["epoch"]]
            curve.append(point((m["epoch"] + 1) * steps_per_epoch, steps_per_epoch, end - start - evaluating,
                                m["test_acc"][-1]))
            evaluating += m["time_s"] - end
        elif m.get("kind") == "step_eval":
            end = m["train_end_s"]
            curve.append(point(m["step"], steps_per_epoch, end - start - evaluating, m["test_acc"][-1], m["tested"]))
            evaluating += m["time_s"] - end
    return curve


def pipeline_curve(out: Path, last_block: int, steps_per_epoch: int) -> list[dict]:
    """sync / async / sync-auto from their metrics.jsonl: the sink ranks' (Note [evaluation windows])."""
    records = read_jsonl(out / "metrics.jsonl")
    key = str(last_block)
    sinks = sorted({m["rank"] for m in records if m.get("kind") == "eval" and key in m.get("test_acc", {})})
    per_rank = {r: _rank_points(records, r, key, steps_per_epoch) for r in sinks}
    curve = []
    for step in sorted(set.intersection(*(set(p) for p in per_rank.values()))) if per_rank else []:
        pts = [per_rank[r][step] for r in sinks]
        tested = sum(p[2] for p in pts)
        curve.append(point(step, steps_per_epoch, max(p[0] for p in pts),
                            sum(p[1] * p[2] for p in pts) / max(tested, 1), tested if pts[0][3] else None))
    return curve


def _rank_points(records: list[dict], rank: int, key: str, steps_per_epoch: int) -> dict[int, tuple]:
    """source step -> (train_s, accuracy of the last head, samples tested, mid-epoch) of one rank."""
    mine = [m for m in records if m.get("rank") == rank]
    start = next(m["time_s"] for m in mine if m.get("kind") == "train_start")
    ends = {m["epoch"]: m["time_s"] for m in mine if m.get("kind") == "epoch_end"}
    stamps = sorted(m["time_s"] for m in mine if m.get("kind") in ("epoch_end", "own_epoch_end"))
    points, evaluating = {}, 0.0
    for m in sorted((m for m in mine if m.get("kind") in ("eval", "step_eval")), key=lambda m: m["time_s"]):
        mid = m["kind"] == "step_eval"
        if mid:
            end, step = m["train_end_s"], m["step"]
        else:
            before = [t for t in stamps if t <= m["time_s"]]
            end, step = ends.get(m["epoch"], before[-1] if before else None), (m["epoch"] + 1) * steps_per_epoch
        if end is None:
            continue
        points[step] = (end - start - evaluating, m["test_acc"][key], m["tested"], mid)
        evaluating += m["time_s"] - end
    return points


def epoch_seconds(curve: list[dict]) -> float:
    """A curve's median seconds per training epoch, the first interval dropped as warm-up when there are
    more. A point may follow several epochs (train.eval_every > 1): its interval is divided by them.
    Mid-epoch points (train.eval_every_steps) are left out: the epochs' ends alone time the epochs."""
    per, last_s, last_epoch = [], 0.0, 0
    for p in (p for p in curve if float(p["epoch"]).is_integer()):
        per.append((p["train_s"] - last_s) / max(p["epoch"] - last_epoch, 1))
        last_s, last_epoch = p["train_s"], p["epoch"]
    return median(per[1:] or per)


def mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and (population) standard deviation of the values that exist; (None, None) if none does."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def median_time_to_target(times: list[float | None]) -> float | None:
    """The median time to target over every seed, a seed that never reached it (None) counting as never
    (+inf) rather than dropped: a number when more than half the seeds reached the target, else None
    (never; with an even count, half reaching it is never too: the median's upper half is never)."""
    if not times:
        return None
    m = median([math.inf if t is None else t for t in times])
    return None if math.isinf(m) else m


def seed_summary(rows: list[dict], target: float | None) -> dict:
    """One row's figures over its seeds' runs (each {curve, time_to_target_s, samples_per_s}; a run
    without a curve, one that failed, counts as a seed that never reached the target): final accuracy,
    time to target and samples/s, mean and std, and min and max of the first two; how many seeds reached
    the target (the time's mean, std, min and max are over those); and the median time to target over
    all seeds, a seed that never reached it counting as never (median_time_to_target)."""
    finals = [r["curve"][-1]["test_acc"] if r.get("curve") else None for r in rows]
    times = [r["time_to_target_s"] if "time_to_target_s" in r else time_to_target(r.get("curve"), target)
             for r in rows]
    fm, fs = mean_std(finals)
    tm, ts = mean_std(times)
    sm, ss = mean_std([r.get("samples_per_s") for r in rows])
    reached = [t for t in times if t is not None]
    acc = [f for f in finals if f is not None]
    return {"final_acc_mean": fm, "final_acc_std": fs, "time_to_target_mean_s": tm, "time_to_target_std_s": ts,
            "reached_target": len(reached), "n_seeds": len(rows),
            "samples_per_s_mean": sm, "samples_per_s_std": ss,
            "final_acc_min": min(acc, default=None), "final_acc_max": max(acc, default=None),
            "time_to_target_min_s": min(reached, default=None), "time_to_target_max_s": max(reached, default=None),
            "time_to_target_median_s": median_time_to_target(times) if target is not None else None,
            "time_to_target_reached": len(reached), "time_to_target_seeds": len(rows)}
