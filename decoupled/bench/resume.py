"""Note [finished rows]: a bench into a folder that already holds finished rows goes on from there, so
a long run cut short (a timeout, Ctrl-C, a lost machine) is continued by running the same command again.

Every run of a row (each seed of a curve row and each microbatch count of a pipeline's sweep is a run
of its own: rows.run_row) writes RECORD into its run folder once it has finished without an error: its
figures and the setup they were measured under (the row, the sha of the config it ran, the training
set's size and the batch, ranks, microbatch count and split, the malloc threshold, and where it ran:
the emulated nodes and link, or this machine). A later bench into the same folder reads a run back
instead of running it when its setup is the same; a run that failed, or ran under another setup, runs
again (its old record is removed first, so a run cut short is never mistaken for a finished one).
A reused row says so (`reused`: true in bench.json, a line in bench.md): its figures were measured
then, under that run's machine load. The stages worker's measurement is reused the same way (the
pipelines' split, and so their setups, come from its block costs), and so are tuning candidates
(tune.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

RECORD = "bench_row.json"


def setup_of(mode: str, cfg_path: Path, n: int, batch: int, ranks: int, microbatches: int, split, mmap_threshold: int,
             where: dict | None, knobs: list[str] = ()) -> dict:
    """What a run's numbers depend on besides the code: its config, size, layout, where it ran, and the
    bench flags its worker reads (`knobs`, e.g. --powersgd-rank 4)."""
    return {"mode": mode, "config_sha": hashlib.sha256(cfg_path.read_bytes()).hexdigest()[:16], "n_train": n,
            "batch_size": batch, "ranks": ranks, "microbatches": microbatches, "split": split,
            "malloc_mmap_threshold": mmap_threshold, "where": where, "knobs": list(knobs)}


def finished(d: Path, setup: dict) -> dict | None:
    """The run's row as it finished under `setup`, marked reused; None (and any stale record removed)
    when it has to run."""
    path = d / RECORD
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        before = None
    if before and before.get("setup") == setup and not before["row"].get("error"):
        return {**before["row"], "reused": True}
    path.unlink(missing_ok=True)
    return None


def keep(d: Path, setup: dict, row: dict) -> None:
    """Record a run that finished without an error (a failed one runs again next time)."""
    if not row.get("error"):
        d.mkdir(parents=True, exist_ok=True)
        (d / RECORD).write_text(json.dumps({"setup": setup, "row": row}, indent=2))


def reused(rows: list[dict]) -> list[str]:
    """The runs of a bench's rows that were read back: "e2e", "sync seed 1", ..."""
    out = []
    for r in rows:
        # a pipeline's row without a curve is its sweep's fastest run: listed with the sweep
        seeds = r.get("seeds") or ([] if "microbatch_sweep" in r and "curve" not in r else [r])
        for s in seeds:
            if s.get("reused"):
                out.append(r["mode"] + (f" seed {s['seed']}" if r.get("seeds") else ""))
        out += [f"{r['mode']} m{m['microbatches']}" for m in r.get("microbatch_sweep", []) if m.get("reused")]
    return out
