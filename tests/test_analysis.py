"""analysis/ablate.py (grid, skip, CSV), analysis/plots.py (PNGs), analysis/table.py, and the paper configs."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from decoupled.job import load

from torchrun_utils import REPO, env

sys.path.insert(0, str(REPO / "analysis"))
import ablate  # noqa: E402

TINY = ["--set", "model.widths=[8,8]", "--set", "train.epochs=1", "--set", "data.limit_train=100",
        "--set", "data.limit_test=50"]


def run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_grid_parsing():
    assert ablate.split_values("1,2,3") == ["1", "2", "3"]
    assert ablate.split_values("[1,1,2,2],[2,2,2,2]") == ["[1,1,2,2]", "[2,2,2,2]"]
    grid = ablate.parse_grid(["objective.k=1,2", "model.hierarchy=[1,1],[2,2]"])
    pts = ablate.points(grid)
    assert len(pts) == 4 and pts[0] == ["objective.k=1", "model.hierarchy=[1,1]"]
    assert ablate.point_name(pts[0]) == "objective.k=1__model.hierarchy=1-1"
    with pytest.raises(ValueError, match="expected section.key"):
        ablate.parse_grid(["k=1,2"])


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate")
    p = run(["analysis/ablate.py", "--grid", "objective.k=1,2", *TINY, "--out", str(out)])
    return out, p


def test_ablate_runs_every_point_then_skips_done_ones(ablation):
    out, first = ablation
    assert first.stdout.count("running") == 2
    runs = sorted(out.glob("*/seed0/summary.json"))
    assert [r.parent.parent.name for r in runs] == ["objective.k=1", "objective.k=2"]
    rows = read_csv(out / "ablation.csv")
    assert len(rows) == 4  # 2 runs x 2 blocks, long format
    assert {r["objective.k"] for r in rows} == {"1", "2"} and {r["block"] for r in rows} == {"0", "1"}
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    stamps = [r.stat().st_mtime_ns for r in runs]
    again = run(["analysis/ablate.py", "--grid", "objective.k=1,2", *TINY, "--out", str(out)])
    assert again.stdout.count("skipped") == 2 and "running" not in again.stdout
    assert [r.stat().st_mtime_ns for r in runs] == stamps
    assert len(read_csv(out / "ablation.csv")) == 4


def test_ablate_rejects_a_bad_value_before_running(tmp_path):
    p = subprocess.run([sys.executable, "analysis/ablate.py", "--grid", "objective.k=1,zero", "--out", str(tmp_path)],
                       env=env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "objective.k must be int" in p.stderr
    assert not list(tmp_path.glob("*/seed0"))


@pytest.mark.torchrun
def test_ablate_on_torchrun_ranks(tmp_path):
    run(["analysis/ablate.py", "--grid", "replay.capacity=2", *TINY, "--ranks", "2", "--out", str(tmp_path)])
    (row,) = {r["run_dir"]: r for r in read_csv(tmp_path / "ablation.csv")}.values()
    assert row["mode"] == "sync" and row["world_size"] == "2"


def test_plots_write_pngs(ablation, tmp_path):
    out, _ = ablation
    bench = tmp_path / "bench"  # a fake bench folder next to the real runs
    bench.mkdir()
    rank = {"rank": 0, "peak_mem_bytes": 2 ** 20, "compute_s": 1.0, "comm_s": 0.0, "idle_s": 0.0}
    (bench / "bench.json").write_text(json.dumps({"ranks": 2, "rows": [
        {"mode": "e2e", "samples_per_s": 100.0, "ranks": [rank]},
        {"mode": "sync", "samples_per_s": 180.0, "ranks": [rank, {**rank, "rank": 1}]},
        {"mode": "gpipe", "error": "boom", "samples_per_s": None, "ranks": []}]}))
    run(["analysis/plots.py", str(out), str(bench), "--out", str(tmp_path / "png")], timeout=120)
    for name in ("layer_accuracy", "samples_per_block", "exit_curves", "memory_per_rank", "throughput_vs_ranks"):
        assert (tmp_path / "png" / f"{name}.png").stat().st_size > 1000, name


PAPER_CONFIGS = ["simcnn_k1_cifar10", "simcnn_k2_cifar10", "simcnn_k3_cifar10", "cascade_vgg_cifar10",
                 "cascade_allcnn_cifar10", "ma2020_vgg11_cifar10", "ma2020_vgg8b_cifar10", "ma2020_resnet18_cifar10",
                 "quicknet_fashion_mnist", "quicknet_cifar10_vgg11", "bench_cpu", "bench_gpu"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_load_and_say_what_they_aim_at(name):
    path = REPO / "launch" / "configs" / f"{name}.toml"
    synthetic = 'name = "synthetic"' in path.read_text()  # data.download only applies to torchvision data
    cfg = load(path, [] if synthetic else ["data.download=true"])  # validates all but the dataset folder
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "decoupled " in header and f"{name}.toml" in header  # the command that runs it
    if not name.startswith("bench"):
        assert re.search(r"\d+\.\d+ ?%", header), "the paper number it aims at"
    assert cfg.model.name in ("vgg", "simcnn", "allcnn", "resnet", "mlp")


def test_table_pivots_seeds_into_mean_and_std(tmp_path):
    """analysis/table.py: one cell per (objective, mode), the last block's mean ± population std over the
    seeds found, khidden labelled with its k; a pair without runs stays empty."""
    import table

    def fake(where: str, name: str, mode: str, seed: int, accs: list[float], k: int = 1) -> None:
        d = tmp_path / where / f"seed{seed}"
        d.mkdir(parents=True)
        extra = f"k = {k}\n" if name == "khidden" else ""
        d.joinpath("config.toml").write_text(f'[objective]\nname = "{name}"\n{extra}[train]\nmode = "{mode}"\n'
                                             f"seed = {seed}\n")
        d.joinpath("summary.json").write_text(json.dumps({"layers": [{"test_acc": a} for a in accs]}))

    fake("a", "khidden", "simultaneous", 0, [0.5, 0.8])
    fake("a", "khidden", "simultaneous", 1, [0.5, 0.6])
    fake("b", "khidden", "e2e", 0, [0.9], k=2)
    fake("c", "cascade", "async", 0, [0.4, 0.7])
    text = table.table([tmp_path])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.split("\n\n")[0].splitlines()}
    assert rows["objective"] == "| objective | e2e | simultaneous | async |"
    assert "| 0.7000 ± 0.1000 (2) |" in rows["khidden k=1"] and rows["khidden k=2"].startswith("| khidden k=2 | 0.9000")
    assert rows["cascade"] == "| cascade |  |  | 0.7000 ± 0.0000 (1) |"
    assert "| khidden k=1 | simultaneous | 0.5000 / 0.7000 |" in text
