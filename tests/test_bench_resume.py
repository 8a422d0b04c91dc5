"""Issue 30 item 5: a bench into a folder that holds finished rows and seeds reuses them (Note [finished
rows], bench/resume.py), so a long run cut short goes on where it stopped; a failed run, or one under
another setup, runs again."""
from __future__ import annotations

import json

import pytest

from decoupled.bench import resume
from decoupled.bench import rows as bench_rows

from torchrun_utils import overrides

# 2 blocks of one conv each on 3x8x8 blobs (test_bench.py's TINY): seconds per row
TINY = {"data.name": "synthetic", "data.synthetic_shape": [3, 8, 8], "data.synthetic_train": 128,
        "data.synthetic_test": 32, "data.batch_size": 32, "model.name": "vgg", "model.hierarchy": [1, 1],
        "model.width": 4, "train.device": "cpu"}


def test_a_run_is_reused_only_under_its_own_setup_and_only_when_it_finished(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[train]\nseed = 1\n")
    setup = resume.setup_of("sync", cfg, 128, 32, 2, 0, None, 0, {"nodes": 2, "link": "100mbit"})
    d = tmp_path / "sync"
    assert resume.finished(d, setup) is None
    resume.keep(d, setup, {"mode": "sync", "samples_per_s": None, "error": "exit code 1"})
    assert not (d / resume.RECORD).exists()  # a failed run runs again
    resume.keep(d, setup, {"mode": "sync", "samples_per_s": 10.0})
    assert resume.finished(d, setup) == {"mode": "sync", "samples_per_s": 10.0, "reused": True}
    # another link, or another config, is another measurement: it runs, and the stale record goes first
    other = {**setup, "where": {"nodes": 2, "link": "1gbit"}}
    assert resume.finished(d, other) is None and not (d / resume.RECORD).exists()
    resume.keep(d, setup, {"mode": "sync", "samples_per_s": 10.0})
    cfg.write_text("[train]\nseed = 2\n")
    changed = resume.setup_of("sync", cfg, 128, 32, 2, 0, None, 0, {"nodes": 2, "link": "100mbit"})
    assert resume.finished(d, changed) is None


def test_reused_names_rows_seeds_and_microbatch_counts():
    rows = [{"mode": "e2e", "reused": True},
            {"mode": "sync", "seeds": [{"seed": 0}, {"seed": 1, "reused": True}]},
            {"mode": "gpipe", "reused": True, "microbatch_sweep": [{"microbatches": 2, "reused": True},
                                                                  {"microbatches": 4}]}]
    assert resume.reused(rows) == ["e2e", "sync seed 1", "gpipe m2"]


@pytest.mark.timeout(300)
def test_a_bench_cut_short_goes_on_with_the_rows_it_finished(tmp_path, monkeypatch):
    """The first bench ran e2e only (as if cut short after it); the same bench into the same folder
    with e2e and sequential runs sequential alone, reads e2e back, and says so."""
    out = tmp_path / "bench"
    first = bench_rows.bench(None, overrides(TINY), 2, out, repeats=1, rows=("e2e",), timeout=150)
    assert not first["rows"][0].get("reused")
    jobs = []
    real = bench_rows.run
    monkeypatch.setattr(bench_rows, "run", lambda job, *a, **k: jobs.append(job) or real(job, *a, **k))
    again = bench_rows.bench(None, overrides(TINY), 2, out, repeats=1, rows=("e2e", "sequential"), timeout=150)
    ran = [j.module_args[0] if j.module_args[0] != "decoupled" else j.module_args[-1] for j in jobs]
    assert ran == ["train.mode=sequential"], ran  # the stages' measurement is read back too
    e2e, seq = again["rows"]
    assert e2e["reused"] and e2e["samples_per_s"] == first["rows"][0]["samples_per_s"]
    assert not seq.get("reused") and seq["samples_per_s"] > 0
    page = (out / "bench.md").read_text()
    assert "Read back from an earlier bench into this folder (the same config, link and row; measured then, " \
           "bench/resume.py): e2e" in page and again["stages_reused"]
    assert json.loads((out / "bench.json").read_text())["rows"][0]["reused"] is True
