"""The rows of `decoupled bench`: the config every row runs, each row's process, and reading a row's
numbers back from its run directory (metrics.jsonl stamps and counters, summary.json)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..job import ConfigError, JobConfig, load, to_toml
from .curve import epoch_seconds, pipeline_curve, seed_summary, single_process_curve, time_to_target
from .knobs import Knobs, to_args
from .report import chart, markdown
from .launcher import Job, describe, launcher, run
from .resume import finished, keep, setup_of
from .runner import machine, median, read_jsonl, timed
from .strategies import STRATEGIES
from .tune import Tune, read_val_acc, tune_row
from .worker import data_order_sha, run_fields

from ..plan.model import best_split

E2E = ("train.mode=e2e", "train.probe_epochs=0")  # no probes: the e2e network's output only


@dataclass(frozen=True)
class Row:
    """A row of the bench, in one place: how its process runs and how its numbers are read back.
    kind "single": `decoupled train` in one process with the --set overrides `sets` (`k_threads`: the
    bench's --ranks as its threads), read from its run folder; "engine": the decoupled engine on K
    torchrun ranks (`sets`: train.mode and the row's overrides), read from metrics.jsonl and
    summary.json; "dataparallel": bench/dataparallel.py's worker (bench/strategies.py wraps it and names
    the bench flags it reads); "pipeline": bench/gpipe.py's. The two workers write their row (and its
    curve) themselves, as OUT/<row>.json."""
    name: str
    kind: Literal["single", "engine", "dataparallel", "pipeline"]
    sets: tuple[str, ...] = ()
    k_threads: bool = False
    curve: bool = True  # --curve evaluates it after every epoch (sequential: no output before its last block)
    default: bool = True  # in --rows' default

    @property
    def worker(self) -> bool:
        return self.kind in ("dataparallel", "pipeline")

    @property
    def knobs(self) -> tuple[str, ...]:
        """The bench flags it reads (knobs.py): a data-parallel row's strategy's."""
        return STRATEGIES[self.name].knobs if self.kind == "dataparallel" else ()


REGISTRY: dict[str, Row] = {r.name: r for r in (
    Row("e2e", "single", E2E),
    Row("e2e-Kthreads", "single", E2E, k_threads=True),
    Row("e2e-checkpoint", "single", (*E2E, "train.activation_checkpointing=true")),  # the memory bar
    Row("sequential", "single", ("train.mode=sequential",), curve=False),
    Row("sync", "engine", ("train.mode=sync",)),
    # split: replicas split each batch as DDP's ranks do (Note [split replicas], groups.py), so the row
    # keeps every other row's global batch and optimizer steps per epoch
    Row("sync-auto", "engine", ("train.mode=sync", 'dist.placement="auto"', 'dist.replicas="auto"',
                                'dist.replica_batch="split"')),
    # int8 activations on the wire (engine/wire.py): a quarter of sync's bytes per sample. Not in the
    # default: it answers one question (what the int8 wire costs and saves beside fp32 `sync`) at the
    # price of another sync run: `--rows sync,sync-int8`
    Row("sync-int8", "engine", ("train.mode=sync", 'dist.wire_dtype="int8"'), default=False),
    # async: note [fresh budget] (engine/ranks/budget.py): measured on Fashion-MNIST (2 seeds), "steps"
    # froze the last rank at 38-40 % of the stream and it ended below sync; "fresh" trained it to the
    # end (2.4-2.6 draws per fresh batch) and ended above
    Row("async", "engine", ("train.mode=async", 'replay.budget="fresh"')),
    # the e2e network on K ranks (dataparallel.py, strategies.py). The slow-link rows are not in the
    # default: they answer where links are slow (docs/benchmarking.md), `--rows ddp,ddp-powersgd,...`
    Row("ddp", "dataparallel"),
    Row("ddp-bf16", "dataparallel", default=False),
    Row("ddp-powersgd", "dataparallel", default=False),
    Row("localsgd", "dataparallel", default=False),
    Row("fsdp", "dataparallel"),
    # the e2e network through torch.distributed.pipelining (gpipe.py)
    Row("gpipe", "pipeline"),
    Row("1f1b", "pipeline"),
)}
ROWS = tuple(REGISTRY)
DEFAULT_ROWS = tuple(r.name for r in REGISTRY.values() if r.default)


@dataclass
class Curve:
    """--curve: every curve row trains `epochs` epochs with the test accuracy after each (curve.py);
    `target` (--target-acc) gives time_to_target_s; `seeds` (--seeds) repeats the curve rows."""
    epochs: int | None = None  # None: the config's train.epochs
    target: float | None = None
    seeds: int = 1
    eval_every_steps: int = 0  # --eval-every-steps: train.eval_every_steps of every curve row
    eval_subset: int = 0  # --eval-subset: train.eval_subset (0: the whole test set)
MICROBATCHES = (2, 4, 8)  # the pipelines' microbatch sweep (--microbatches)


def bound(stage_s: list[float]) -> float:
    """Ideal pipeline speed-up over running the stages one after another: sum(t_k) / max(t_k)."""
    return sum(stage_s) / max(stage_s)


def bound_samples_per_s(n: int, stage_s: list[float]) -> float:
    """A pipeline is as fast as its slowest stage: n samples per max(t_k) seconds."""
    return n / max(stage_s)


def rank_row(r: dict, window: dict | None = None) -> dict:
    """A summary.json rank entry in the bench schema; compute/comm/idle are seconds per timed epoch."""
    out = {"rank": r["rank"], "blocks": r.get("blocks"), "peak_mem_bytes": r["peak_mem_bytes"],
           "eval_peak_mem_bytes": r.get("eval_peak_mem_bytes"), "mem_method": r.get("mem_method"),
           "exact_train_mem_bytes": r.get("exact_train_mem_bytes"),
           "exact_mem": r.get("exact_mem")}
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
    """sync / async on K ranks: epoch-end stamps and cumulative counters per rank from
    metrics.jsonl. The network's epoch time is the slowest rank's mean epoch over the timed window
    (in sync every rank's; in async under a steps budget a rank replays, so a fast last rank's own
    epochs say nothing of the flow), and a rank computes only between its own stamps, so the bound
    n / max_k(compute_k) over the same window is never exceeded.

    A rank's epochs are its own: under replay.budget="steps" an async rank's epoch is its budget of
    steps (`own_epoch_end` stamps), not the spacing of upstream's markers. Throughput is the n
    training samples that enter the pipeline per epoch over that time; async ranks may train on
    fewer fresh samples (drops) and more draws (replays) than n, so each rank also reports the
    samples that entered it and the fresh samples it trained on per second, and the row the fresh
    samples that reached the last block per second of its whole loop (`last_block_fresh_samples_per_s`)."""
    summary = json.loads((out / "summary.json").read_text())
    records = read_jsonl(out / "metrics.jsonl")
    ranks, stamps = [], []
    for r in summary["ranks"]:
        e = _epoch_ends(records, r["rank"])
        k = max(len(e) - 1, 1)  # timed epochs
        per = lambda key: (e[-1].get(key, 0.0) - e[0].get(key, 0.0)) / k  # noqa: E731  (per timed epoch)
        row = rank_row(r, {"compute_s": per("compute_s"), "comm_s": per("comm_s"), "idle_s": per("idle_s")})
        row["steps_per_epoch"] = per("steps")
        if "optimizer_steps" in e[-1]:  # per block of the rank (cumulative counters; one epoch: its own count)
            first = e[0]["optimizer_steps"] if len(e) > 1 else [0] * len(e[-1]["optimizer_steps"])
            row["optimizer_steps_per_epoch"] = [(b - a) / k for a, b in zip(first, e[-1]["optimizer_steps"])]
        span = e[-1]["time_s"] - e[0]["time_s"]
        row["epoch_s"] = span / k
        # what it put on its links per wall second (training and evaluation, padding included): on a link
        # that sets the pace, the link's own rate (bench --nodes: link_share)
        row["sent_bytes_per_s"] = (e[-1].get("bytes_sent", 0) - e[0].get("bytes_sent", 0)) / span if span > 0 else None
        recv = "train_samples_recv" if "train_samples_recv" in e[-1] else "samples_recv"  # older runs: all
        entered = per("samples_trained") if 0 in r["blocks"] else per(recv)
        row["entered_samples_per_s"] = _entered_per_s(r)
        fresh = entered
        if "replay" in e[-1]:  # async: batches received, evicted before ever being trained on, draws
            rp = lambda key: (e[-1]["replay"].get(key, 0) - e[0].get("replay", {}).get(key, 0)) / k  # noqa: E731
            row["received_batches_per_epoch"] = rp("received")
            row["dropped_batches_per_epoch"] = rp("dropped")
            row["draws_per_epoch"] = rp("draws")
            fresh = rp("fresh_draws") * batch  # full batches: the last batch of an epoch may be smaller
        row["fresh_samples_per_s"] = fresh * k / span if span > 0 else None
        row["wire_bytes_per_sample"] = _per_sample(r.get("train_bytes_sent", 0), r.get("train_samples_sent", 0))
        ranks.append(row)
        stamps.append([m["time_s"] for m in e])
    slowest = max(range(len(ranks)), key=lambda i: ranks[i]["epoch_s"])
    epoch_s = ranks[slowest]["epoch_s"]
    return {"mode": mode, "samples_per_s": n / epoch_s, "epoch_s": epoch_s,
            "last_block_fresh_samples_per_s": _fresh_per_s(summary["ranks"][-1], batch),
            # async: the last rank's draws per fresh batch (1: no replay), beside its accuracy
            "replay_draws_per_fresh": _draws_per_fresh(summary["ranks"][-1]),
            "epochs_timed": timed(stamps[slowest]), "ranks": ranks,
            # every link's training messages (headers, labels, ids, padding included) per training sample
            # they carried: what a step costs the links (evaluation traffic apart: bytes_sent has all)
            "wire_bytes_per_sample": _per_sample(sum(r.get("train_bytes_sent", 0) for r in summary["ranks"]),
                                                 sum(r.get("train_samples_sent", 0) for r in summary["ranks"])),
            # the layout the run trained on (sync-auto chooses it at start-up): blocks and ranks per stage group
            "placement": summary.get("placement"), "replicas": summary.get("replicas"),
            "replica_batch": summary.get("replica_batch"),
            "backend": summary.get("backend")}


def _per_sample(nbytes: int, samples: int) -> float | None:
    return nbytes / samples if samples else None  # None: nothing sent (a last rank, or one process)


def _fresh_per_s(r: dict, batch: int) -> float | None:
    """Fresh samples the last block trained on per second of its whole loop. Over the whole run, not a
    timed window: a replaying async rank may draw no fresh batch between two of its own epoch ends."""
    fresh = r["replay"]["fresh_draws"] * batch if r.get("replay") else r.get("samples_trained", 0)
    return fresh / r["train_s"] if r.get("train_s") else None


def _entered_per_s(r: dict) -> float | None:
    """Training samples that entered the rank per second of its whole loop: a source-group rank (a
    replica too) reads them from the loader, any other receives them. Over the whole loop, not the
    timed window, for the reason of `_fresh_per_s`: an async rank's buffer may have taken in a whole
    epoch before the window opened (seen under load: 0.0 for a rank that trained on every sample)."""
    if not r.get("train_s"):
        return None
    if 0 in r["blocks"]:  # samples_trained sums over the rank's blocks
        return r.get("samples_trained", 0) / max(len(r["blocks"]), 1) / r["train_s"]
    return r.get("train_samples_recv", r.get("samples_recv", 0)) / r["train_s"]


def _draws_per_fresh(r: dict) -> float | None:
    rep = r.get("replay") or {}
    return rep["draws"] / rep["fresh_draws"] if rep.get("draws") is not None and rep.get("fresh_draws") else None


def _epoch_ends(records: list[dict], rank: int) -> list[dict]:
    """A rank's own epoch ends: `own_epoch_end` where it stamps them (async, replay.budget="steps"),
    else `epoch_end`."""
    own = [m for m in records if m.get("kind") == "own_epoch_end" and m.get("rank") == rank]
    ends = own or [m for m in records if m.get("kind") == "epoch_end" and m.get("rank") == rank]
    return sorted(ends, key=lambda m: m["epoch"])


# ---------------------------------------------------------------------------- the benchmark

def prepare(config: str | None, overrides: list[str], repeats: int,
            curve: Curve | None = None) -> tuple[JobConfig, int]:
    """The config every row runs: the user's, then the bench's timing knobs. Returns (cfg, n_train).
    --curve: the curve's epochs (the config's by default), each evaluated on the test set."""
    from ..data import build_data
    base = load(config, overrides)
    data = build_data(base.data, base.train.seed)  # only for the training-set size
    n = len(data.train)
    steps = -(-n // base.data.batch_size)
    epochs = (curve.epochs or base.train.epochs) if curve else 1 + repeats  # epoch 0 is warm-up
    steps_eval = [f"train.eval_every_steps={curve.eval_every_steps}", f"train.eval_subset={curve.eval_subset}"] \
        if curve and curve.eval_every_steps else []
    if steps_eval and curve.eval_subset > len(data.test):  # before any row runs
        raise ConfigError(f"bench: --eval-subset {curve.eval_subset} is more than the {len(data.test)} test samples; "
                          f"give at most {len(data.test)} (or 0: the whole test set)")
    _TEST_SIZE[_size_key(base)] = len(data.test)
    cfg = load(None, [f"train.epochs={epochs}", f"train.eval_every={1 if curve else 0}", *steps_eval,
                      "train.checkpoint=false",
                      f"train.log_every={steps}",  # one `step` record per block per epoch: its end stamp
                      f"data.eval_batch_size={base.data.batch_size}"],  # the peak is training's, not eval's
               base=base)
    _TRAIN_SIZE[_size_key(cfg)] = n
    return cfg, n


def microbatch_candidates(microbatches, batch: int, ranks: int) -> list[int]:
    """The pipelines' sweep: counts that divide the batch and give every stage a microbatch (>= K;
    Schedule1F1B requires it, and fewer leaves a stage idle in GPipe too)."""
    return [m for m in microbatches if batch % m == 0 and m >= ranks]


def bench(config: str | None, overrides: list[str], ranks: int, out: Path, repeats: int = 3,
          microbatches=MICROBATCHES, rows: tuple[str, ...] = DEFAULT_ROWS, timeout: float = 900.0,
          mmap_threshold: int = 0, curve: Curve | None = None, tune: Tune | None = None,
          knobs: Knobs = Knobs()) -> dict:
    """`tune` (--tune, tune.py): every row the setting acts on (a config key: every row; a bench flag:
    the rows that read it) first picks its value of the grid, then runs with it; the overrides then hold
    data.val_fraction (cli.py adds it: Note [tuning split]). `knobs`: the data-parallel rows' bench flags."""
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    cfg, n = prepare(config, overrides, repeats, curve)
    cfg_path = out / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    B = cfg.data.batch_size

    print(f"bench: {n} training samples, batch {B}, {ranks} ranks, " +
          (f"{cfg.train.epochs} epochs each evaluated, {curve.seeds} seed(s) per curve row" if curve else
           f"{repeats} timed epochs (+1 warm-up) per row"))
    result: dict = {"rows": [], "machine": info, "config": str(config), "overrides": list(overrides),
                    "n_train": n, "batch_size": B, "ranks": ranks, "repeats": repeats,
                    "microbatches": list(microbatches), "knobs": dataclasses.asdict(knobs),
                    "malloc_mmap_threshold": mmap_threshold or "glibc default (dynamic)"}
    where = launcher()
    if where.link:  # --nodes: the emulated nodes and their link, its rate as a raw TCP stream measured it
        result["cluster"] = where.record
    plain = cfg_path  # rows without a curve (and the stages) run as without --curve: no evaluation
    if curve:
        result["curve"] = {"epochs": cfg.train.epochs, "target_acc": curve.target, "seeds": curve.seeds,
                           "rows": [m for m in rows if REGISTRY[m].curve]}
        plain = out / "config_no_eval.toml"
        plain.write_text(to_toml(load(None, ["train.eval_every=0", "train.eval_every_steps=0", "train.eval_subset=0"],
                                      base=cfg)))
        if curve.eval_every_steps:  # the mid-epoch points' test subset, the same for every row and seed
            m = cfg.train.eval_subset or _TEST_SIZE[_size_key(cfg)]
            p = curve.target if curve.target is not None else 0.5  # without a target: the largest error
            result["curve"].update(eval_every_steps=curve.eval_every_steps, eval_subset=m,
                                   eval_subset_se=math.sqrt(p * (1 - p) / m), eval_subset_se_at=p)

    # 1. each rank's stages alone: the bound; and the e2e network's block costs
    measured = measure_stages(plain, out, n, B, ranks, timeout, mmap_threshold)
    if measured.get("reused"):
        result["stages_reused"] = True
    if measured.get("error") is None:
        result["stages"] = measured["stages"]
        stage_s = [s["epoch_s"] for s in result["stages"]]
        result["bound"] = bound(stage_s)
        result["bound_samples_per_s"] = bound_samples_per_s(n, stage_s)
    else:
        result["stages_error"] = measured["error"]
    split = None  # the pipelines' own best split of the e2e network, from its measured block costs
    if measured.get("e2e_block_costs"):
        result["e2e_block_costs"] = measured["e2e_block_costs"]
        if len(result["e2e_block_costs"]) >= ranks:
            split = best_split(result["e2e_block_costs"], ranks)
            result["pipeline_split"] = split

    tuned_rows = [m for m in rows if tune and tune.applies(REGISTRY[m].knobs)]
    if tune:
        result["tune"] = {"key": tune.key, "grid": tune.values, "val_fraction": tune.val_fraction, "epochs": 1,
                          "seed": cfg.train.seed, "score": "final validation accuracy of the last block's head",
                          "rows": tuned_rows}

    for mode in rows:
        t0 = time.perf_counter()
        kind = REGISTRY[mode].kind
        sent = where.tx_bytes()
        row_cfg, row_plain, row_knobs, tuned = cfg, plain, knobs, None
        cands = microbatch_candidates(microbatches, B, ranks)
        if mode in tuned_rows and (cands or kind != "pipeline"):  # a pipeline without a count fails as untuned
            first = (cands or [0])[0]  # the pipelines train the same at any microbatch count: the first

            def score(cfg_path: Path, d: Path, text: str, mode=mode, first=first) -> dict:
                return tuning_score(mode, cfg_path, d, ranks, first, split, timeout, mmap_threshold,
                                    tune.knobs(knobs, text))
            tuned = tune_row(mode, tune, cfg, out, score, {k: getattr(knobs, k) for k in REGISTRY[mode].knobs})
            print(f"  {mode:13s} {tune.key}: " + ", ".join(
                f"{c['text']} -> {'failed' if c.get('val_acc') is None else format(c['val_acc'], '.4f')}"
                for c in tuned["candidates"]) + f"; chosen {tuned['chosen_text']}", flush=True)
            if tuned["chosen"] is not None and tune.knob:
                row_knobs = tune.knobs(knobs, tuned["chosen_text"])
            elif tuned["chosen"] is not None:
                row_cfg = load(None, tune.overrides(tuned["chosen_text"]), base=cfg)
                row_plain = out / "tune" / f"{mode}-chosen.toml"
                row_plain.write_text(to_toml(load(None, ["train.eval_every=0"], base=row_cfg) if curve else row_cfg))
        if tuned is not None and tuned["chosen"] is None:
            row = {"mode": mode, "samples_per_s": None, "ranks": [],
                   "error": f"--tune: every value of {tune.key} failed (logs/tune-{mode}-*.log)"}
        elif kind == "pipeline":
            row = pipeline_baseline_row(mode, row_plain, out, B, ranks, microbatches, split, timeout, mmap_threshold)
            if curve and row.get("samples_per_s"):  # the curve at the sweep's fastest microbatch count
                sweep = {k: row[k] for k in ("microbatch_sweep", "split_searched")}
                row = {**curve_row(mode, row_cfg, out, n, ranks, timeout, mmap_threshold, curve,
                                   row["microbatches"], split), **sweep}
        elif curve and REGISTRY[mode].curve:
            row = curve_row(mode, row_cfg, out, n, ranks, timeout, mmap_threshold, curve, knobs=row_knobs)
        else:
            row = run_row(mode, row_plain, out, n, B, ranks, 0, timeout, mmap_threshold, knobs=row_knobs)
        if tuned is not None:
            row["tune"] = tuned
        if kind == "engine" and row.get("samples_per_s"):
            # The bound from the row's own stages as the engine ran them (each rank's compute per
            # epoch, Stage.train_step timed in the run): stages timed in another process drift from
            # the run (1.05 and 1.11 "of the bound" once), and a bound that is exceeded is no bound.
            slowest = max(r["compute_s"] for r in row["ranks"])
            row["bound_samples_per_s"] = n / slowest if slowest > 0 else None
            row["of_bound"] = row["samples_per_s"] / row["bound_samples_per_s"] if slowest > 0 else None
        row.setdefault("wire_bytes_per_sample", None)  # None: no activation link of the engine's (one process, ddp...)
        if where.link:  # what each node sent on its link during the row (every run of it, reused ones excepted)
            row["link"] = where.link
            row["link_tx_bytes"] = [b - a for a, b in zip(sent, where.tx_bytes())]
            # the busiest sender's bytes per wall second over the raw TCP stream's: near 1 where the link
            # sets the pace (issue 30's goal: >= 0.9), lower where compute or a slower rank does
            busiest = max((r.get("sent_bytes_per_s") or 0 for r in row["ranks"]), default=0)
            row["link_share"] = busiest / where.record["tcp_bytes_per_s"] if busiest else None
        row["bench_wall_s"] = time.perf_counter() - t0
        row["loadavg_1min_after"] = os.getloadavg()[0]  # other users' load skews a row: keep the evidence
        result["rows"].append(row)
        sps = row.get("samples_per_s")
        print(f"  {mode:13s} " + (f"{sps:9.1f} samples/s" if sps else f"FAILED: {row['error']}")
              + f"  ({row['bench_wall_s']:.0f}s{', reused' if row.get('reused') else ''})", flush=True)

    info["loadavg_end"] = list(os.getloadavg())
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown(result))
    chart(result, out / "bench.png")
    return result


def measure_stages(plain: Path, out: Path, n: int, B: int, ranks: int, timeout: float, mmap_threshold: int) -> dict:
    """The stages worker's `stages` and `e2e_block_costs` (or `error`). A measurement made in this folder
    under the same setup is read back (Note [finished rows]): the pipelines' split, and so their runs'
    setups, come from its block costs."""
    d = out / "stages"
    setup = setup_of("stages", plain, n, B, ranks, 0, None, mmap_threshold, launcher().where)
    done = finished(d, setup)
    if done is not None:
        return done
    for stale in ("stages.json", "e2e_block_costs.json"):
        (out / stale).unlink(missing_ok=True)
    err = run(Job(["decoupled.bench.stages", str(plain), str(ranks), str(out / "stages.json")]),
              out / "logs" / "stages.log", timeout, mmap_threshold)
    if err is not None:
        return {"error": err}
    got = {"stages": json.loads((out / "stages.json").read_text())}
    if (out / "e2e_block_costs.json").exists():
        got["e2e_block_costs"] = json.loads((out / "e2e_block_costs.json").read_text())
    keep(d, setup, got)
    return got


def tuning_score(mode: str, cfg_path: Path, d: Path, ranks: int, microbatches: int, split, timeout: float,
                 mmap_threshold: int, knobs: Knobs) -> dict:
    """One tuning candidate (tune.py): the row's process on `cfg_path` with `knobs` in `d`, and its final
    validation accuracy."""
    err = run(row_command(mode, cfg_path, d, ranks, microbatches, split, knobs),
              d.parent.parent / "logs" / f"tune-{d.name}.log", timeout, mmap_threshold)
    if err is None:
        try:
            return {"val_acc": read_val_acc(mode, d, REGISTRY[mode].worker)}
        except (OSError, KeyError, ValueError, IndexError) as e:
            err = f"could not read the validation accuracy: {e!r}"
    return {"val_acc": None, "error": err}


def row_command(mode: str, cfg_path: Path, d: Path, ranks: int, microbatches: int,
                split: list[int] | None = None, knobs: Knobs = Knobs()) -> Job:
    """The job of one row: its process (or torchrun ranks) and thread count."""
    row = REGISTRY[mode]
    train = ["decoupled", "train", "--config", str(cfg_path), "--out", str(d)]
    sets = [a for o in row.sets for a in ("--set", o)]
    if row.kind == "single":
        return Job([*train, *sets], threads=ranks if row.k_threads else 1)
    if row.kind == "engine":
        return Job(train + sets, ranks)
    if row.kind == "dataparallel":
        return Job(["decoupled.bench.dataparallel", str(cfg_path), str(d / f"{mode}.json"), mode,
                    *to_args(knobs, row.knobs)], ranks)
    args = ["decoupled.bench.gpipe", str(cfg_path), str(d / f"{mode}.json"), str(microbatches), mode]
    return Job(args + ([",".join(map(str, split))] if split else []), ranks)


def pipeline_baseline_row(mode: str, cfg_path: Path, out: Path, B: int, ranks: int, microbatches, split,
                          timeout: float, mmap_threshold: int) -> dict:
    """gpipe / 1f1b on their own best split, at the best microbatch count of the sweep (each count a
    fresh torchrun job in OUT/<mode>-m<M>); the row is the fastest, with every count's throughput."""
    cands = microbatch_candidates(microbatches, B, ranks)
    if not cands:
        return {"mode": mode, "samples_per_s": None, "ranks": [],
                "error": f"no microbatch count in {list(microbatches)} divides data.batch_size={B} and is "
                         f">= {ranks} stages"}
    tried = [{**run_row(mode, cfg_path, out, 0, B, ranks, m, timeout, mmap_threshold, split, name=f"{mode}-m{m}"),
              "microbatches": m} for m in cands]
    ok = [r for r in tried if r.get("samples_per_s")]
    best = dict(max(ok, key=lambda r: r["samples_per_s"]) if ok else tried[0])
    best["microbatch_sweep"] = [{"microbatches": r.get("microbatches"), "samples_per_s": r.get("samples_per_s"),
                                 **({"error": r["error"]} if "error" in r else {}),
                                 **({"reused": True} if r.get("reused") else {})} for r in tried]
    best["split_searched"] = split is not None  # False: even split (no block costs measured)
    return best


def run_row(mode: str, cfg_path: Path, out: Path, n: int, B: int, ranks: int, microbatches: int, timeout: float,
            mmap_threshold: int, split: list[int] | None = None, name: str | None = None,
            knobs: Knobs = Knobs()) -> dict:
    """Run one row's process (in OUT/<name>, the mode's name by default) and read its numbers; a row
    with `error` when either fails. A run that finished in this folder under the same setup is read
    back instead (Note [finished rows], resume.py)."""
    d = out / (name or mode)
    kind = REGISTRY[mode].kind
    job = row_command(mode, cfg_path, d, ranks, microbatches, split, knobs)
    setup = setup_of(mode, cfg_path, n, B, ranks, microbatches, split, mmap_threshold, launcher().where,
                     to_args(knobs, REGISTRY[mode].knobs))
    done = finished(d, setup)
    if done is not None:
        return done
    err = run(job, out / "logs" / f"{name or mode}.log", timeout, mmap_threshold)
    row = None
    if err is None:
        try:
            if kind == "engine":
                row = pipeline_row(mode, d, n, B)
            elif REGISTRY[mode].worker:
                row = json.loads((d / f"{mode}.json").read_text())
            else:
                row = single_process_row(mode, d, n)
        except (OSError, KeyError, ValueError, ZeroDivisionError) as e:
            err = f"could not read the run: {e!r}"
    if row is None:
        row = {"mode": mode, "error": err, "samples_per_s": None, "ranks": []}
    if err is None and not REGISTRY[mode].worker:  # the workers record their own, as they trained
        try:
            add_run_fields(row, mode, cfg_path)
        except (OSError, KeyError, ValueError) as e:
            row["run_fields_error"] = repr(e)
    if mode == "e2e-Kthreads":
        row["threads"] = ranks
    row["cmd"] = describe(job)
    keep(d, setup, row)
    return row


_TRAIN_SIZE: dict[tuple, int] = {}  # (data settings, seed) -> training samples (prepare fills the bench's)
_TEST_SIZE: dict[tuple, int] = {}  # the same -> test samples (prepare fills it)


def _size_key(cfg: JobConfig) -> tuple:
    return repr(dataclasses.replace(cfg.data, eval_batch_size=0)), cfg.train.seed


def train_size(cfg: JobConfig) -> int:
    """The training split's size under this config's data settings and seed (data.limit_train's subset and
    the validation hold-out are seeded), built once per distinct (data, seed)."""
    key = _size_key(cfg)
    if key not in _TRAIN_SIZE:
        from ..data import build_data
        _TRAIN_SIZE[key] = len(build_data(cfg.data, cfg.train.seed).train)
    return _TRAIN_SIZE[key]


def add_run_fields(row: dict, mode: str, cfg_path: Path) -> None:
    """bench/worker.run_fields for a row the e2e trainer or the engine trained, from the config it ran:
    global batch, schedule and precision as configured; data_order_sha of the first epoch as
    data.batches draws it (every such row, and every rank of the engine, trains in that order: the
    order depends on the split's size, the batch and train.seed only); optimizer steps per epoch one
    per batch (e2e, sequential: per block), or as the engine counted them (sync / async: the most any
    block took per timed epoch; each rank's per block in ranks[]). Where a row differs from the e2e
    row by construction, `declared_differences` says how."""
    # as the row ran it: the bench's config and the row's own overrides; validated when it ran
    kind = REGISTRY[mode].kind
    cfg = load(cfg_path, list(REGISTRY[mode].sets), validate_now=False)
    n = train_size(cfg)
    B, o = cfg.data.batch_size, cfg.optim
    steps: float = -(-n // B)
    declared = []
    if kind == "single" and cfg.train.patience:
        declared.append(f"train.patience={cfg.train.patience}: early stopping may end training before "
                        "train.epochs")
    if (mode == "sequential" or kind == "engine") and o.block_lr_decay != 1.0:
        declared.append(f"optim.block_lr_decay={o.block_lr_decay}: block j trains at optim.lr x "
                        f"{o.block_lr_decay}^j (the e2e network, one optimizer, at optim.lr)")
    if kind == "engine":
        measured = [s for r in row["ranks"] for s in r.get("optimizer_steps_per_epoch") or []]
        if measured:
            steps = max(measured)
            steps = int(steps) if float(steps).is_integer() else steps
        if any(r > 1 for r in row.get("replicas") or []) and cfg.dist.replica_batch == "alternate":
            declared.append(f"dist.replicas={row['replicas']}: a stage group of R ranks averages R batches "
                            "(R x global_batch samples) per optimizer step, so its blocks take about 1/R of the "
                            "optimizer steps per epoch (ranks[].optimizer_steps_per_epoch)")
        if mode == "async":
            r = cfg.replay
            declared.append(f"async: blocks after the first train on batches drawn from a replay buffer "
                            f"(replay.policy={r.policy!r}, max_reuse={r.max_reuse}, budget={r.budget!r}): their "
                            "order and number of steps per epoch are the buffer's; data_order_sha is the order "
                            "the data enters the first block")
    row.update(run_fields(cfg, steps, data_order_sha(n, B, cfg.train.seed), declared))


def curve_row(mode: str, cfg: JobConfig, out: Path, n: int, ranks: int, timeout: float, mmap_threshold: int,
              curve: Curve, microbatches: int = 0, split: list[int] | None = None, knobs: Knobs = Knobs()) -> dict:
    """A curve row: the row once per seed (train.seed, train.seed + 1, ...; seed i > 0 in OUT/seed<i>),
    each with its curve, time to target and throughput from its training epochs alone; the row is the
    first seed's, with every seed's figures and their mean and std."""
    runs = []
    for i in range(curve.seeds):
        where = out if i == 0 else out / f"seed{i}"
        where.mkdir(parents=True, exist_ok=True)
        path = where / "config.toml"
        path.write_text(to_toml(load(None, [f"train.seed={cfg.train.seed + i}"], base=cfg)))
        row = run_row(mode, path, where, n, cfg.data.batch_size, ranks, microbatches, timeout, mmap_threshold, split,
                      knobs=knobs)
        if row.get("samples_per_s"):
            try:
                add_curve(row, mode, where / mode, n, curve.target, -(-n // cfg.data.batch_size))
            except (OSError, KeyError, ValueError, StopIteration) as e:
                row.update(error=f"could not read the curve: {e!r}", samples_per_s=None)
        row["seed"] = cfg.train.seed + i
        runs.append(row)
    first = runs[0]
    if curve.seeds > 1:
        first["seeds"] = [{k: r.get(k) for k in ("seed", "samples_per_s", "final_acc", "time_to_target_s", "curve",
                                                   "error", "reused")} for r in runs]
        first.update(seed_summary(runs, curve.target))  # a crashed seed counts as never, not dropped
    return first


def add_curve(row: dict, mode: str, d: Path, n: int, target: float | None, steps_per_epoch: int) -> None:
    """The row's curve (curve.py; the data-parallel and pipeline workers write their own), final accuracy,
    time to target, and its throughput over its training epochs alone (the first dropped as warm-up;
    the pipelines train no partial last batch)."""
    if REGISTRY[mode].kind == "single":
        row["curve"] = single_process_curve(d, steps_per_epoch)
    elif REGISTRY[mode].kind == "engine":
        last = json.loads((d / "summary.json").read_text())["layers"][-1]["block"]
        row["curve"] = pipeline_curve(d, last, steps_per_epoch)
    if not row.get("curve"):
        raise ValueError(f"no evaluated epoch in {d}")
    row["final_acc"] = row["curve"][-1]["test_acc"]
    row["time_to_target_s"] = time_to_target(row["curve"], target)
    row["epoch_s"] = epoch_seconds(row["curve"])
    row["samples_per_s"] = (n - row.get("dropped_samples_per_epoch", 0)) / row["epoch_s"]
