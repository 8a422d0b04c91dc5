"""`decoupled bench`: the bound arithmetic, reading runs, and one real tiny bench (every row,
torchrun jobs included) and depth sweep under timeouts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from decoupled.bench import DEFAULT_ROWS, bound, bound_samples_per_s, median, parse_lists, pipeline_row, timed
from decoupled.cli import main

from torchrun_utils import REPO, env, sets

# 2 blocks of one conv each on 3x8x8 blobs: seconds per row
TINY = {"data.name": "synthetic", "data.synthetic_shape": [3, 8, 8], "data.synthetic_train": 128,
        "data.synthetic_test": 32, "data.batch_size": 32, "model.name": "vgg", "model.hierarchy": [1, 1],
        "model.width": 4, "train.device": "cpu"}  # aux_width: no hidden layer at k=1


def targets(result: dict) -> dict:
    """The bench targets (docs/results/2026-11-26-bench-cpu.md) from a bench.json, against the best
    baseline of each kind: sync >= 0.85 of its bound; sync >= 1.3x the faster pipeline (gpipe or 1f1b,
    each on its own best split and microbatch count); the largest rank's peak <= 0.6x e2e's and <=
    e2e-checkpoint's (>= 3 blocks)."""
    rows = {r["mode"]: r for r in result["rows"] if r.get("samples_per_s")}
    peak = lambda row: max(r["peak_mem_bytes"] for r in row["ranks"])  # noqa: E731
    sync, e2e = rows["sync"], rows["e2e"]
    pipeline = max((rows[m] for m in ("gpipe", "1f1b") if m in rows), key=lambda r: r["samples_per_s"])
    bar = min(peak(e2e), peak(rows.get("e2e-checkpoint", e2e)))
    return {"sync_of_bound": sync["of_bound"] >= 0.85,
            "sync_over_best_pipeline": sync["samples_per_s"] / pipeline["samples_per_s"] >= 1.3,
            "max_rank_peak_over_e2e_peak": peak(sync) / max(peak(e2e), 1) <= 0.6,
            "max_rank_peak_within_checkpointing": peak(sync) <= bar}


def test_bound_and_timing_arithmetic():
    # stages of 2, 1 and 1 s per epoch: sequential takes 4 s, a pipeline at best 2 s
    assert bound([2.0, 1.0, 1.0]) == 2.0
    assert bound_samples_per_s(1000, [2.0, 1.0, 1.0]) == 500.0
    assert bound([3.0, 3.0]) == 2.0  # balanced: K
    assert timed([10.0, 12.0, 15.0]) == [2.0, 3.0]  # the first stamp closes the warm-up epoch
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0]) == 2.5
    assert parse_lists("[1,1,2],[2]") == [[1, 1, 2], [2]]


def test_pipeline_row_reads_epoch_stamps_and_counters(tmp_path):
    """Per-rank compute/comm/idle are per timed epoch (cumulative counters differenced from the
    warm-up epoch's end); throughput is n over the last rank's median epoch; async drops are per rank."""
    summary = {"placement": [[0], [1]], "backend": "gloo",
               "ranks": [{"rank": 0, "blocks": [0], "peak_mem_bytes": 100},
                         {"rank": 1, "blocks": [1], "peak_mem_bytes": 50}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    lines = []
    for epoch, t0, t1 in [(0, 5.0, 5.5), (1, 7.0, 7.5), (2, 9.0, 9.7)]:
        lines.append({"kind": "epoch_end", "rank": 0, "epoch": epoch, "time_s": t0, "compute_s": 2.0 * (epoch + 1),
                      "comm_s": 0.1 * epoch, "idle_s": 0.0, "steps": 4 * (epoch + 1)})
        lines.append({"kind": "epoch_end", "rank": 1, "epoch": epoch, "time_s": t1, "compute_s": 1.5 * (epoch + 1),
                      "comm_s": 0.0, "idle_s": 0.5 * epoch, "steps": 4 * (epoch + 1),
                      "replay": {"dropped": epoch, "received": 4 * (epoch + 1)}})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    row = pipeline_row("async", tmp_path, n=128, batch=32)
    assert row["epoch_s"] == pytest.approx(2.1)  # last rank: 2.0 and 2.2 s
    # n samples enter the pipeline per epoch; a drop on one rank is that rank's number, not the row's
    assert row["samples_per_s"] == pytest.approx(128 / 2.1)
    r0, r1 = row["ranks"]
    assert r0["compute_s"] == pytest.approx(2.0) and r0["comm_s"] == pytest.approx(0.1)
    assert r1["idle_s"] == pytest.approx(0.5) and r1["dropped_batches_per_epoch"] == pytest.approx(1.0)
    assert r0["peak_mem_bytes"] == 100 and r0["steps_per_epoch"] == pytest.approx(4.0)


def test_pipeline_row_times_a_ranks_own_epochs(tmp_path):
    """replay.budget="steps": a rank stamps its own epoch ends; the row times those, not the spacing
    of upstream's markers (which, for a rank that replayed through its budget first, held 0 s of
    compute), and counts fresh samples apart from the samples that entered."""
    summary = {"ranks": [{"rank": 0, "blocks": [0], "peak_mem_bytes": 100},
                         {"rank": 1, "blocks": [1], "peak_mem_bytes": 50, "train_s": 8.0,
                          "replay": {"fresh_draws": 10}, "train_samples_recv": 384}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    lines = []
    for epoch in range(3):
        lines.append({"kind": "epoch_end", "rank": 0, "epoch": epoch, "time_s": 1.0 + epoch,
                      "compute_s": 0.5 * (epoch + 1),
                      "comm_s": 0.0, "idle_s": 0.0, "steps": 4 * (epoch + 1), "samples_trained": 128 * (epoch + 1)})
        # the marker-driven stamps of rank 1: its budget was spent before them (no compute between)
        lines.append({"kind": "epoch_end", "rank": 1, "epoch": epoch, "time_s": 9.0 + epoch, "compute_s": 6.0,
                      "comm_s": 0.0, "idle_s": 0.0, "steps": 12, "samples_recv": 128 * (epoch + 1)})
        lines.append({"kind": "own_epoch_end", "rank": 1, "epoch": epoch, "time_s": 2.0 * (epoch + 1),
                      "compute_s": 2.0 * (epoch + 1), "comm_s": 0.0, "idle_s": 0.0, "steps": 4 * (epoch + 1),
                      "samples_recv": 96 * (epoch + 1),
                      "replay": {"dropped": epoch, "received": 3 * (epoch + 1), "fresh_draws": 2 * (epoch + 1)}})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    row = pipeline_row("async", tmp_path, n=128, batch=32)
    r1 = row["ranks"][1]
    assert r1["compute_s"] == pytest.approx(2.0) and row["epoch_s"] == pytest.approx(2.0)
    # samples that entered it over its whole loop (an async buffer may take in a window's epoch before it)
    assert r1["entered_samples_per_s"] == pytest.approx(384 / 8.0)
    assert r1["fresh_samples_per_s"] == pytest.approx(2 * 32 / 2.0)  # in its timed window
    assert row["last_block_fresh_samples_per_s"] == pytest.approx(10 * 32 / 8.0)  # over its whole loop


@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.timeout(900)  # eleven rows, most of them torchrun jobs
def test_bench_writes_every_row(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "decoupled", "bench", "--ranks", "2", "--repeats", "1", "--microbatches", "2",
           "--out", str(out), "--timeout", "150", *sets(TINY)]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "bench.json").read_text())
    assert [r["mode"] for r in res["rows"]] == list(DEFAULT_ROWS)
    for row in res["rows"]:
        assert "error" not in row, row
        assert isinstance(row["samples_per_s"], float) and row["samples_per_s"] > 0
        want = 2 if row["mode"] in ("sync", "sync-auto", "async", "ddp", "fsdp", "gpipe", "1f1b") else 1
        assert len(row["ranks"]) == want, row
        # activations cross a link iff the layout has a stage boundary: sync and async split the blocks;
        # sync-auto's layout is chosen at start-up from measured costs, and may be one replicated group
        split = row["mode"] in ("sync", "async") or (row["mode"] == "sync-auto" and len(row["placement"]) > 1)
        assert (row["wire_bytes_per_sample"] is None) == (not split), row
        for r in row["ranks"]:
            assert set(r) >= {"rank", "peak_mem_bytes", "compute_s", "comm_s", "idle_s"}
            # every rank's epochs are its own (async: own_epoch_end stamps), so each timed epoch
            # holds that rank's training, whatever the spacing of upstream's markers
            assert r["peak_mem_bytes"] > 0 and r["compute_s"] > 0, (row["mode"], r)
    for mode in ("sync", "async"):
        row = next(r for r in res["rows"] if r["mode"] == mode)
        # the bound: the row's slowest rank's compute per epoch, as the engine ran it
        slowest = max(r["compute_s"] for r in row["ranks"])
        assert row["bound_samples_per_s"] == pytest.approx(res["n_train"] / slowest)
        assert row["last_block_fresh_samples_per_s"] > 0 and row["ranks"][-1]["entered_samples_per_s"] > 0
    # the pipelines: their own best split of the measured e2e block costs, the best microbatch count
    assert len(res["e2e_block_costs"]) == 2 and res["pipeline_split"] == [1, 1]
    for mode in ("gpipe", "1f1b"):
        row = next(r for r in res["rows"] if r["mode"] == mode)
        assert row["split"] == [1, 1] and row["microbatches"] == 2 and row["split_searched"]
        assert [m["microbatches"] for m in row["microbatch_sweep"]] == [2]
    # e2e with activation checkpointing: the memory bar, a measured single-process row
    assert next(r for r in res["rows"] if r["mode"] == "e2e-checkpoint")["ranks"][0]["peak_mem_bytes"] is not None
    assert len(res["stages"]) == 2 and res["bound"] == pytest.approx(bound([s["epoch_s"] for s in res["stages"]]))
    assert {"cpu_count", "torch", "loadavg_start", "loadavg_end"} <= set(res["machine"])
    # the targets are computable from every bench (they live in docs/results/, not the library)
    assert set(targets(res)) == {"sync_of_bound", "sync_over_best_pipeline", "max_rank_peak_over_e2e_peak",
                                 "max_rank_peak_within_checkpointing"}
    assert "| sync |" in (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 0


@pytest.mark.torchrun
@pytest.mark.slow
def test_sweep_depth_writes_points(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "decoupled", "bench", "--sweep", "depth", "--hierarchies", "[1,1]", "--out", str(out),
           "--timeout", "150", *sets(TINY)]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (pt,) = json.loads((out / "sweep.json").read_text())["points"]
    assert pt["blocks"] == 2 and len(pt["rank_peak_bytes"]) == 2
    assert pt["ratio"] == pytest.approx(max(pt["rank_peak_bytes"]) / pt["e2e_peak_bytes"])
    assert (out / "sweep.png").stat().st_size > 0 and (out / "sweep.md").exists()


def test_microbatch_candidates_divide_the_batch_and_cover_the_stages():
    from decoupled.bench.rows import microbatch_candidates
    assert microbatch_candidates([2, 4, 8], 32, 2) == [2, 4, 8]
    assert microbatch_candidates([2, 4, 8], 12, 3) == [4]  # 2 < 3 stages (1F1B needs >= stages), 8 does not divide
    assert microbatch_candidates([2, 4, 8], 10, 4) == []


def test_bench_refuses_unknown_rows(tmp_path, capsys):
    assert main(["bench", "--rows", "e2e,pipedream", "--out", str(tmp_path)]) == 2
    assert "--rows must be among" in capsys.readouterr().err


@pytest.mark.torchrun
@pytest.mark.slow
def test_sweep_layouts_compares_even_auto_and_replicas(tmp_path):
    """--sweep layouts: the same sync job laid out evenly, by auto placement, with auto replicas and
    with the config's replicas; each row reports its layout, predictions beside measurements, shares."""
    out = tmp_path / "layouts"
    cmd = [sys.executable, "-m", "decoupled", "bench", "--sweep", "layouts", "--ranks", "2", "--out", str(out),
           "--timeout", "150", *sets({**TINY, "train.epochs": 1, "dist.replicas": [2]})]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "layouts.json").read_text())
    rows = {r["layout"]: r for r in res["rows"]}
    assert list(rows) == ["even", "auto", "auto+replicas", "auto+replicas=[2]"]
    assert rows["even"]["placement"] == [[0], [1]] and rows["even"]["predicted_stage_s"] is None
    assert rows["auto+replicas=[2]"]["replicas"] == [2] and rows["auto+replicas=[2]"]["placement"] == [[0, 1]]
    for r in rows.values():
        assert "error" not in r, r
        assert r["samples_per_s"] > 0 and sum(r["replicas"]) == 2 and len(r["ranks_facts"]) == 2
        assert len(r["measured_stage_s"]) == len(r["placement"])
        if r["layout"] != "even":
            assert len(r["predicted_stage_s"]) == len(r["placement"])
    assert "| auto+replicas |" in (out / "layouts.md").read_text()
    # `decoupled report` draws the layouts into throughput_vs_ranks.png and lists their table
    p = subprocess.run([sys.executable, "-m", "decoupled", "report", str(out), "--out", str(tmp_path / "rep")],
                       env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "rep" / "throughput_vs_ranks.png").stat().st_size > 0
    assert "| auto+replicas |" in (tmp_path / "rep" / "report.md").read_text()


def test_guard_verdicts_and_the_sync_figure_from_stamps(tmp_path):
    """bench --guard (a benchmark, never timed in pytest): each figure against its committed threshold;
    sync_of_bound from the engine's own stamps is the slowest rank's compute over the slowest window."""
    from decoupled.bench import guard
    assert set(guard.THRESHOLDS) == {"async_blocked_upstream", "async_blocked_steps", "sync_of_bound", "e2e_overhead",
                                     "wire_bytes_per_sample", "recv_cost", "int8_wire_bytes",
                                     "slow_link_sync_over_ddp"}
    assert guard.verdict("async_blocked_steps", {"value": 0.05})["ok"]
    # a figure this machine cannot measure (no namespaces) is skipped with its reason, not a miss
    skipped = guard.verdict("slow_link_sync_over_ddp", {"value": None, "skipped": "needs CAP_NET_ADMIN"})
    assert skipped["ok"] and skipped["detail"] == "skipped: needs CAP_NET_ADMIN"
    assert not guard.verdict("int8_wire_bytes", {"value": 0.41})["ok"]
    assert not guard.verdict("async_blocked_steps", {"value": 0.5})["ok"]
    assert not guard.verdict("sync_of_bound", {"value": 0.5})["ok"]
    assert not guard.verdict("recv_cost", {"value": None, "error": "timed out"})["ok"]
    # rank 0 computes 1.5 s per 2 s epoch, rank 1 1.0 s: the figure is 1.5 / 2.0
    lines = [{"kind": "epoch_end", "rank": r, "epoch": e, "time_s": 1.0 + 2.0 * e + r,
              "compute_s": (1.5 - r / 2) * (e + 1)}
             for e in range(4) for r in (0, 1)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    fig = guard.sync_figure(tmp_path, 100)
    assert fig["value"] == pytest.approx(0.75) and "50 samples/s" in fig["detail"]


def test_a_source_replica_counts_the_samples_it_reads(tmp_path):
    """Split replicas of the source group read their parts from the loader: the second replica's
    entered samples are the ones it trained on, not the nothing it received over a link (was 0.0)."""
    summary = {"ranks": [{"rank": r, "blocks": [0, 1], "peak_mem_bytes": 1, "train_s": 4.0,
                          "samples_trained": 2 * 96} for r in (0, 1)]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    lines = [{"kind": "epoch_end", "rank": r, "epoch": e, "time_s": 1.0 + e, "compute_s": 0.5 * (e + 1),
              "comm_s": 0.0, "idle_s": 0.0, "steps": 2 * (e + 1), "samples_trained": 32 * (e + 1)}
             for e in range(3) for r in (0, 1)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    row = pipeline_row("sync", tmp_path, n=64, batch=64)
    assert [r["entered_samples_per_s"] for r in row["ranks"]] == [pytest.approx(96 / 4.0)] * 2
