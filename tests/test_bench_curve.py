"""Issue 23: time to accuracy against DDP and FSDP, and exact memory. The ddp / fsdp / sync-auto rows
under --curve, time to target on a hand-made curve and on rows that reach it and one that never does,
sync-auto's replicated layout as the row records it, the exact memory of a tiny MLP stage against the
sum from its shapes, and the ddp row on one rank against the e2e row's losses."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from decoupled import metrics
from decoupled.bench.curve import epoch_seconds, median_time_to_target, seed_summary, time_to_target
from decoupled.bench.report import markdown
from decoupled.memory import ExactMemory

from test_memory import _clear_refs_writable
from torchrun_utils import MLP, REPO, env, sets

# Two classes: the blobs are far apart, so a row that trains is at 0.94-0.97 after 2 epochs (seed 0) and
# one that does not (optim.lr=1e-6) stays where its initialization puts it (0.34): TARGET lies between,
# well above chance (0.5), and not at the first epoch for the deterministic rows (0.44-0.53 there).
TINY = {"data.name": "synthetic", "data.synthetic_shape": [3, 8, 8], "data.synthetic_train": 128,
        "data.synthetic_test": 32, "data.synthetic_classes": 2, "data.batch_size": 32, "model.name": "vgg",
        "model.hierarchy": [1, 1], "model.width": 4, "train.device": "cpu"}
TARGET = 0.75


def test_time_to_target_on_a_hand_made_curve():
    curve = [{"epoch": 1, "train_s": 2.0, "test_acc": 0.90}, {"epoch": 2, "train_s": 4.5, "test_acc": 0.97},
             {"epoch": 3, "train_s": 7.0, "test_acc": 0.96}, {"epoch": 4, "train_s": 9.0, "test_acc": 0.99}]
    assert time_to_target(curve, 0.97) == 4.5  # the first epoch at or above the target
    assert time_to_target(curve, 0.985) == 9.0  # a dip below does not matter once reached
    assert time_to_target(curve, 0.995) is None  # never reached
    assert time_to_target(curve, None) is None and time_to_target([], 0.5) is None
    assert epoch_seconds(curve) == 2.5  # epochs of 2.5, 2.5, 2.0 after the first (warm-up) one
    s = seed_summary([{"curve": curve, "time_to_target_s": 4.0, "samples_per_s": 10.0},
                      {"curve": curve[:2], "time_to_target_s": None, "samples_per_s": 14.0}], 0.97)
    assert s["samples_per_s_mean"] == 12.0 and s["samples_per_s_std"] == 2.0
    assert s["final_acc_mean"] == pytest.approx(0.98) and s["final_acc_std"] == pytest.approx(0.01)
    assert s["time_to_target_mean_s"] == 4.0 and s["reached_target"] == 1 and s["n_seeds"] == 2


def _reaching(at: float | None, final: float = 0.99) -> list[dict]:
    """A seed's curve that first reaches 0.98 at `at` seconds (None: never; it ends below, at 0.97)."""
    if at is None:
        return [{"epoch": 1, "train_s": 10.0, "test_acc": 0.90}, {"epoch": 2, "train_s": 20.0, "test_acc": 0.97}]
    return [{"epoch": 1, "train_s": at / 2, "test_acc": 0.90}, {"epoch": 2, "train_s": at, "test_acc": final}]


def test_median_time_to_target_counts_seeds_that_never_reach_it_as_never():
    """Issue 31: a seed that never reaches the target is a failure (+inf), not dropped: the median over
    all seeds is a time when more than half reached it, else never (None)."""
    assert median_time_to_target([10.0, 30.0, None]) == 30.0
    assert median_time_to_target([10.0, None, None]) is None  # two of three never
    assert median_time_to_target([None, None, None]) is None and median_time_to_target([]) is None
    assert median_time_to_target([30.0, 10.0, 20.0, None]) == 25.0  # 3 of 4: between the 2nd and 3rd
    assert median_time_to_target([10.0, None]) is None  # half is not more than half
    assert median_time_to_target([7.0]) == 7.0


def test_seed_summary_over_per_seed_curves_counts_failures():
    """seed_summary from the seeds' curves alone (the time read from each curve when a run carries none):
    reaching at 10 s, 30 s and never gives median 30 and 2 of 3; the mean, std, min and max stay over
    the seeds that reached it; a run without a curve (it failed) is a seed that never reached it."""
    rows = [{"curve": _reaching(10.0, 0.99)}, {"curve": _reaching(30.0, 0.985)}, {"curve": _reaching(None)}]
    s = seed_summary(rows, 0.98)
    assert s["time_to_target_median_s"] == 30.0
    assert s["time_to_target_reached"] == s["reached_target"] == 2
    assert s["time_to_target_seeds"] == s["n_seeds"] == 3
    assert s["time_to_target_mean_s"] == 20.0 and s["time_to_target_std_s"] == 10.0  # over the 2 that reached it
    assert (s["time_to_target_min_s"], s["time_to_target_max_s"]) == (10.0, 30.0)
    assert (s["final_acc_min"], s["final_acc_max"]) == (0.97, 0.99)
    assert s["final_acc_mean"] == pytest.approx((0.99 + 0.985 + 0.97) / 3)
    s = seed_summary([{"curve": _reaching(10.0)}, {"curve": _reaching(None)}, {"curve": _reaching(None)}], 0.98)
    assert s["time_to_target_median_s"] is None and s["time_to_target_reached"] == 1
    assert s["time_to_target_mean_s"] == 10.0  # the mean alone would hide the two failures
    failed = {"error": "row timed out", "samples_per_s": None}
    s = seed_summary([{"curve": _reaching(10.0)}, {"curve": _reaching(20.0)}, failed], 0.98)
    assert (s["time_to_target_median_s"], s["time_to_target_reached"], s["time_to_target_seeds"]) == (20.0, 2, 3)
    assert s["final_acc_max"] == 0.99 and s["samples_per_s_mean"] is None  # the failed run has no figures
    s = seed_summary([{"curve": _reaching(10.0)}], None)  # no --target-acc: nothing to reach
    assert s["time_to_target_median_s"] is None and s["time_to_target_reached"] == 0


def _curve_result(seeds: int, rows: dict[str, list[float | None]], target: float | None = 0.98) -> dict:
    """A bench result by hand: each mode's seeds first reaching 0.98 at the given seconds (None: never)."""
    out = []
    for mode, ats in rows.items():
        runs = [{"curve": _reaching(at), "samples_per_s": 100.0} for at in ats]
        row = {"mode": mode, "samples_per_s": 100.0, "final_acc": runs[0]["curve"][-1]["test_acc"],
               "time_to_target_s": time_to_target(runs[0]["curve"], target), "curve": runs[0]["curve"],
               "ranks": [{"compute_s": 1.0, "comm_s": 0.0, "idle_s": 0.0, "exact_train_mem_bytes": 2 ** 20,
                          "peak_mem_bytes": 2 ** 21, "eval_peak_mem_bytes": None}]}
        if seeds > 1:
            row.update(seed_summary(runs, target))
        out.append(row)
    out.append({"mode": "sequential", "samples_per_s": 100.0, "ranks": out[0]["ranks"]})  # no curve
    return {"n_train": 128, "batch_size": 32, "ranks": 2, "repeats": 3, "rows": out,
            "machine": {"torch": "x", "cpu_count": 2, "loadavg_start": [0.0, 0.0, 0.0]},
            "curve": {"epochs": 2, "target_acc": target, "seeds": seeds, "rows": list(rows)}}


def test_bench_md_shows_failed_seeds_as_never_with_the_count_and_the_spread():
    """bench.md with --seeds 3: the mean column as before (over the seeds that reached it, with the
    count), min–max of the time and the final accuracy, and the median over all seeds: "never" with the
    count when at most half reached it."""
    res = _curve_result(3, {"sync": [10.0, 30.0, None], "async": [10.0, None, None], "ddp": [None, None, None],
                            "e2e": [40.0, 20.0, 30.0]})
    md = markdown(res)
    table = _table(md)
    assert table["sync"]["time to 0.98 (s)"] == "20.0 ± 10.0 (2/3)"  # the existing column keeps its meaning
    assert table["sync"]["median time to 0.98 (s)"] == "30.0 (2/3)"
    assert table["sync"]["time to 0.98 min–max (s)"] == "10.0–30.0"
    assert table["sync"]["final acc min–max"] == "0.9700–0.9900"
    assert table["async"]["time to 0.98 (s)"] == "10.0 ± 0.0 (1/3)"
    assert table["async"]["median time to 0.98 (s)"] == "never (1/3)"  # two of three never
    assert table["ddp"]["time to 0.98 (s)"] == table["ddp"]["median time to 0.98 (s)"] == "never (0/3)"
    assert table["ddp"]["final acc"] == "0.9700 ± 0.0000"
    assert table["e2e"]["median time to 0.98 (s)"] == "30.0 (3/3)"
    assert table["sequential"]["final acc"] == "(no curve)" and table["sequential"]["median time to 0.98 (s)"] == ""
    assert len({len(cells) for cells in table.values()}) == 1  # every row fills every column
    assert "counting as never" in md
    # one seed: the two columns as before, "never" where it did not reach the target
    table = _table(markdown(_curve_result(1, {"sync": [10.0], "ddp": [None]})))
    assert list(table["sync"]) == ["row", "samples/s", "vs e2e", "of bound", "exact train MiB", "process train MiB",
                                   "process eval MiB", "final acc", "time to 0.98 (s)", "wire B/sample",
                                   "per rank: compute / comm / idle s/epoch"]
    assert table["sync"]["time to 0.98 (s)"] == "10.0" and table["ddp"]["time to 0.98 (s)"] == "never"
    # no --target-acc: nothing to reach, no "never"
    table = _table(markdown(_curve_result(3, {"sync": [None, None, None]}, target=None)))
    assert table["sync"]["median time to target (s)"] == "-" and table["sync"]["time to target (s)"] == "-"


def test_pipeline_curve_cuts_evaluations_and_reads_a_final_point_without_epoch_end(tmp_path):
    """A sink's stamps by hand (Note [evaluation windows]): evaluation time is cut out, and the last
    evaluation of a steps budget, after an extra epoch the sources stopped mid-way (no epoch_end),
    ends its training at the rank's last epoch stamp before it."""
    from decoupled.bench.curve import pipeline_curve
    recs = [{"kind": "train_start", "rank": 1, "time_s": 10.0},
            {"kind": "epoch_end", "rank": 1, "epoch": 0, "time_s": 14.0},
            {"kind": "eval", "rank": 1, "epoch": 0, "time_s": 15.0, "tested": 10, "test_acc": {"2": 0.5}},
            {"kind": "epoch_end", "rank": 1, "epoch": 1, "time_s": 19.0},
            {"kind": "eval", "rank": 1, "epoch": 1, "time_s": 20.0, "tested": 10, "test_acc": {"2": 0.7}},
            {"kind": "own_epoch_end", "rank": 1, "epoch": 2, "time_s": 23.0},
            {"kind": "eval", "rank": 1, "epoch": 2, "time_s": 26.0, "tested": 10, "test_acc": {"2": 0.9}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    curve = pipeline_curve(tmp_path, 2, 10)  # 10 source steps an epoch
    assert curve == [{"epoch": 1, "step": 10, "train_s": 4.0, "test_acc": 0.5},
                     {"epoch": 2, "step": 20, "train_s": 8.0, "test_acc": 0.7},
                     {"epoch": 3, "step": 30, "train_s": 11.0, "test_acc": 0.9}]
    assert epoch_seconds([curve[0], curve[2]]) == 3.5  # one point after two epochs: 7 s over 2


def test_exact_memory_of_a_tiny_mlp_stage_is_the_sum_of_its_shapes():
    """One engine stage (Flatten, Linear 6->8, ReLU; k=1 head Linear 8->3; cross-entropy), SGD with
    momentum, batch 5, two steps: every figure from the shapes by hand."""
    from decoupled.job import load
    from decoupled.engine.build import build_stages
    cfg = load(None, ["data.name=synthetic", "data.synthetic_shape=[6]", "model.name=mlp", "model.widths=[8]",
                      "train.device=cpu", "optim.momentum=0.9", "train.mode=simultaneous"])
    (s,) = build_stages(cfg, (6,), 3, torch.device("cpu"))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with ExactMemory(s.parameters(), torch.device("cpu")) as m:
        for _ in range(2):
            s.train_step(x, y)
    f32, i64 = 4, 8
    params = (6 * 8 + 8 + 8 * 3 + 3) * f32
    activations = (5 * 6 * f32  # the block's input, saved by Linear 6->8 for its weight's gradient
                   + 5 * 8 * f32  # ReLU's output: saved by ReLU and by the head's Linear (one storage, once)
                   + 5 * 3 * f32  # log_softmax's output (cross-entropy)
                   + 5 * i64 + f32)  # nll_loss: the targets and its total weight (a scalar)
    r = m.report()["exact_mem"]
    assert r == {"params_bytes": params, "grads_bytes": params, "optimizer_bytes": params,  # momentum: one per param
                 "activations_bytes": activations, "held_bytes": 0, "total_bytes": 3 * params + activations}
    assert m.live == 0 and not m.refs  # every saved tensor was released with its graph


@pytest.mark.slow
def test_ddp_on_one_rank_equals_the_e2e_row(tmp_path):
    """Same network, seed, batch and data order: the ddp worker on one rank makes the e2e trainer's
    losses, step for step (dropout included: one RNG stream in both)."""
    cfg = {**MLP, "train.mode": "e2e", "train.log_every": 1, "train.eval_every": 1, "train.device": "cpu"}
    p = subprocess.run([sys.executable, "-m", "decoupled", "train", *sets(cfg), "--out", str(tmp_path / "e2e")],
                       env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    e2e = [m["loss"] for m in map(json.loads, (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines())
           if m.get("kind") == "step"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "decoupled.bench.dataparallel", str(tmp_path / "e2e" / "config.toml"), str(tmp_path / "ddp.json"),
           "ddp"]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads((tmp_path / "ddp.json").read_text())
    assert len(e2e) == len(row["losses"]) == 2 * 10
    assert row["losses"] == e2e
    summary = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    assert row["curve"][-1]["test_acc"] == summary["layers"][-1]["test_acc"]


def _bench(out, rows: str, ranks: int, cfg: dict) -> dict:
    cmd = [sys.executable, "-m", "decoupled", "bench", "--curve", "--epochs", "2", "--target-acc", str(TARGET),
           "--rows", rows, "--microbatches", "2", "--ranks", str(ranks), "--out", str(out), "--timeout", "150",
           *sets(cfg)]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())


def _table(md: str) -> dict[str, dict[str, str]]:
    """bench.md's table: row name (its first word) -> {column: cell}."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    return {cells[0].split()[0]: dict(zip(head, cells)) for cells in rows}


def _time_cell(row: dict) -> str:
    """What bench.md says of a row's time to TARGET: "never", or the seconds."""
    t = row["time_to_target_s"]
    return "never" if t is None else f"{t:.1f}"


@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.timeout(900)  # six rows, five of them torchrun jobs: minutes on a loaded 2-core machine
def test_curve_rows_ddp_fsdp_and_pipelines(tmp_path):
    """--curve: one point per epoch per row (async under its steps budget too), time to target from the
    curve, exact memory and the training and evaluation peaks per rank; `decoupled report` draws
    accuracy against training time. Every row but async is deterministic on CPU with a fixed seed
    (sync equals simultaneous; ddp / fsdp / gpipe reduce over 2 ranks): each of them reaches TARGET."""
    out = tmp_path / "bench"
    res = _bench(out, "e2e,sync,async,ddp,fsdp,gpipe", 2, TINY)
    assert [r["mode"] for r in res["rows"]] == ["e2e", "sync", "async", "ddp", "fsdp", "gpipe"]
    assert res["curve"]["target_acc"] == TARGET
    apart = metrics._proc_status_kib("VmHWM") is not None and _clear_refs_writable()
    table = _table((out / "bench.md").read_text())
    for row in res["rows"]:
        assert "error" not in row, row
        epochs = [c["epoch"] for c in row["curve"]]
        if row["mode"] == "async":  # the last evaluation may follow epochs streamed on for a slow rank
            assert len(epochs) == 2 and epochs[0] == 1 and epochs[1] >= 2, epochs
        else:
            assert epochs == [1, 2], row["mode"]
        assert 0 < row["curve"][0]["train_s"] < row["curve"][1]["train_s"]
        assert row["time_to_target_s"] == time_to_target(row["curve"], TARGET)  # the first point at or above
        if row["mode"] != "async":  # async's accuracy depends on scheduling
            assert row["final_acc"] >= TARGET and row["time_to_target_s"] is not None, row["curve"]
        assert table[row["mode"]][f"time to {TARGET} (s)"] == _time_cell(row)
        assert row["final_acc"] == row["curve"][-1]["test_acc"]
        assert len(row["ranks"]) == (1 if row["mode"] == "e2e" else 2)
        assert row["samples_per_s"] == pytest.approx(128 / epoch_seconds(row["curve"])), row["mode"]
        for r in row["ranks"]:
            assert r["exact_train_mem_bytes"] > 0 and r["peak_mem_bytes"] > 0 and r["compute_s"] > 0
            assert r["exact_mem"]["params_bytes"] > 0 and r["exact_mem"]["activations_bytes"] > 0
            assert (r["eval_peak_mem_bytes"] is not None) is apart, r
    sync, ddp, fsdp, gpipe = (next(r for r in res["rows"] if r["mode"] == m) for m in ("sync", "ddp", "fsdp", "gpipe"))
    assert sync["placement"] == [[0], [1]] and sync["replicas"] == [1, 1]  # the layout it trained on, recorded
    assert gpipe["microbatches"] == 2 and gpipe["microbatch_sweep"][0]["microbatches"] == 2
    assert ddp["ranks"][0]["comm_s"] > 0 and ddp["per_rank_batch"] == [16, 16]
    # FSDP shards parameters, gradients and momentum over the 2 ranks; DDP holds all of them
    assert fsdp["ranks"][0]["exact_mem"]["params_bytes"] < ddp["ranks"][0]["exact_mem"]["params_bytes"]
    assert ddp["losses"] == pytest.approx(fsdp["losses"], rel=1e-5)  # the same training, sharded or not
    md = (out / "bench.md").read_text()
    assert "| fsdp |" in md and "exact train MiB" in md and "process eval MiB" in md
    p = subprocess.run([sys.executable, "-m", "decoupled", "report", str(out), "--out", str(tmp_path / "rep")],
                       env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "rep" / "accuracy_vs_time.png").stat().st_size > 0


@pytest.mark.torchrun
@pytest.mark.slow
def test_sync_auto_row_is_replicated_and_a_row_that_does_not_learn_never_reaches_the_target(tmp_path):
    """sync-auto on 3 ranks and a 2-block network: every layout the search can choose has a stage group
    held by 2+ ranks (at most 2 groups for 3 ranks), and the row records the one it trained on. Its
    learning rate is 1e-6, so its accuracy stays at its initialization's, below TARGET: time to target
    null, "never" in bench.md (against the rows of the test above, which reach it)."""
    out = tmp_path / "bench"
    res = _bench(out, "sync-auto", 3, {**TINY, "optim.lr": 1e-6})
    (row,) = res["rows"]
    assert "error" not in row, row
    placement, replicas = row["placement"], row["replicas"]
    assert len(placement) == len(replicas) and sum(replicas) == 3 and max(replicas) >= 2, (placement, replicas)
    assert [b for group in placement for b in group] == [0, 1]  # consecutive blocks, each in one group
    # each rank holds its group's blocks: the groups' ranks in order (groups.Layout.ranks)
    assert [r["blocks"] for r in row["ranks"]] == [g for g, n in zip(placement, replicas) for _ in range(n)]
    assert [c["epoch"] for c in row["curve"]] == [1, 2]
    assert row["final_acc"] < TARGET and row["time_to_target_s"] is None
    cells = _table((out / "bench.md").read_text())["sync-auto"]
    assert cells[f"time to {TARGET} (s)"] == "never"
    assert f"ranks {replicas}" in cells["row"]  # bench.md names the layout


def test_curve_options_need_curve(tmp_path, capsys):
    from decoupled.cli import main
    assert main(["bench", "--seeds", "3", "--out", str(tmp_path)]) == 2
    assert "add --curve" in capsys.readouterr().err
    assert main(["bench", "--curve", "--target-acc", "98", "--out", str(tmp_path)]) == 2
    assert "(0, 1]" in capsys.readouterr().err
