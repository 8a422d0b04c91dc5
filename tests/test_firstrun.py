"""What a user sees: `decoupled train --nproc-per-node N`, live per-epoch lines, TensorBoard scalars,
`decoupled report`, and the guide to adding an objective, docs/extending.md (its template, trained)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from decoupled.cli import main
from decoupled.job import load
from decoupled.launch import strip_flag, torchrun_command
from decoupled.run_job import train

from torchrun_utils import REPO, env

TINY = ["--set", "model.widths=[16,16]", "--set", "train.epochs=2", "--set", "data.limit_train=256",
        "--set", "data.limit_test=128"]


def decoupled(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    e = env()
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(var, None)
    return subprocess.run([sys.executable, "-m", "decoupled", *args], env=e, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_strip_flag_and_the_shared_command():
    argv = ["train", "--nproc-per-node", "3", "--config", "c.toml", "--nproc-per-node=2", "--set", "a.b=1"]
    assert strip_flag(argv) == ["train", "--config", "c.toml", "--set", "a.b=1"]
    cmd = torchrun_command(2, ["decoupled", "train"])  # what bench's sync/async rows run
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "decoupled", "train"]
    from decoupled.bench.launcher import Job, Local
    assert Local().render(Job(["decoupled", "train"], 2))[0].argv == cmd


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    p = decoupled(["train", "--nproc-per-node", "2", "--set", "train.mode=sync", *TINY, "--out", str(out)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p


def test_nproc_per_node_runs_two_ranks_with_live_lines(two_ranks):
    out, p = two_ranks
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["mode"] == "sync" and [r["rank"] for r in s["ranks"]] == [0, 1]
    # a non-interactive log: one line per rank and epoch, with loss, accuracy, throughput, shares,
    # all before the summary
    for rank, block in ((0, 0), (1, 1)):
        for epoch in (1, 2):
            line = re.search(rf"^\[rank {rank}\] epoch {epoch}/2  test_acc b{block}=\S+.*loss b{block}=(\S+)  "
                             r"\d+ samples/s  compute \d+%  blocked \d+%  idle \d+%", p.stdout, re.M)
            assert line, p.stdout
            assert float(line.group(1)) > 0
            assert line.start() < p.stdout.index("block 0: test_acc")


def test_nproc_per_node_refuses_a_single_process_mode():
    p = decoupled(["train", "--nproc-per-node", "2", *TINY])  # default train.mode: simultaneous
    assert p.returncode == 2 and "train.mode=sync" in p.stderr and "Traceback" not in p.stderr


def test_failed_workers_exit_non_zero_with_their_message(tmp_path):
    p = decoupled(["train", "--nproc-per-node", "3", "--set", "train.mode=sync", *TINY, "--out", str(tmp_path)])
    assert p.returncode == 2, p.stderr
    assert "every rank needs a block" in p.stderr and "3 of 3 local rank(s) failed" in p.stderr
    assert "Traceback" not in p.stderr


def test_single_process_lines_and_quiet(tmp_path, capsys):
    cfg = load(None, ["model.widths=[16,16]", "train.epochs=2", "data.limit_train=256", "train.checkpoint=false"])
    train(cfg, tmp_path / "a")
    out = capsys.readouterr().out
    assert re.search(r"^epoch 2/2  loss b0=\S+ b1=\S+  test_acc b0=\S+ b1=\S+ \(ensemble \S+\)  \d+ samples/s",
                     out, re.M)
    train(load(None, ["model.widths=[16,16]", "train.epochs=2", "data.limit_train=256", "train.quiet=true"]),
          tmp_path / "b")
    assert capsys.readouterr().out == ""


def test_terminal_progress_bar_shows_the_losses(tmp_path, monkeypatch, capsys):
    """Every redraw shows every block's latest loss, however fast the epoch runs: the bar reads the
    losses when it draws (tqdm's own time throttle is taken away here, so every step redraws)."""
    import decoupled.engine.run
    import decoupled.metrics
    monkeypatch.setattr(decoupled.metrics, "interactive", lambda: True)  # as on a terminal
    bars = []

    def progress(total, desc, postfix=None):
        bar = decoupled.metrics.progress(total, desc, postfix)
        bar.mininterval = 0  # redraw at every update: what is drawn no longer depends on the clock
        bars.append(bar)
        return bar
    monkeypatch.setattr(decoupled.engine.run, "progress", progress)
    train(load(None, ["model.widths=[16,16]", "train.epochs=1", "data.batch_size=4", "train.checkpoint=false",
                      "train.quiet=true"]), tmp_path)
    err = capsys.readouterr().err
    assert len(bars) == 1
    drawn = re.findall(r"loss (b0=\d\.\d{3} b1=\d\.\d{3})", err)
    assert len(drawn) > 100, err[-2000:]  # 1438 / 4 steps, each drawn with both blocks' losses
    assert len(set(drawn)) > 1  # the latest losses, not the first ones


def test_tensorboard_missing_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    assert main(["train", *TINY, "--set", "log.tensorboard=true", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "log.tensorboard" in err and "pip install -e '.[tb]'" in err
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing trained


def _tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"]), acc


def test_tensorboard_scalars_single_process(tmp_path):
    pytest.importorskip("tensorboard")
    train(load(None, ["model.widths=[16,16]", "train.epochs=2", "data.limit_train=256", "log.tensorboard=true",
                      "train.quiet=true"]), tmp_path)
    tags, acc = _tags(tmp_path / "tb" / "rank0")
    assert {"loss/block0", "loss/block1", "test_acc/block0", "test_acc/block1", "test_acc/ensemble",
            "throughput/samples_per_s", "lr/block0", "memory/peak_mib"} <= tags, tags
    assert [e.step for e in acc.Scalars("loss/block1")] == [1, 2]


def test_tensorboard_scalars_async_ranks(tmp_path):
    pytest.importorskip("tensorboard")
    p = decoupled(["train", "--nproc-per-node", "2", "--set", "train.mode=async", "--set", "log.tensorboard=true",
                   *TINY, "--out", str(tmp_path)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"^\[rank 1\] epoch 1/2 .* buffer \S+ \(max \d+\)  dropped \d+  staleness", p.stdout,
                     re.M), p.stdout
    tags0, _ = _tags(tmp_path / "tb" / "rank0")
    tags1, _ = _tags(tmp_path / "tb" / "rank1")
    assert {"loss/block0", "time/compute_s", "time/comm_s", "time/idle_s", "test_acc/block0"} <= tags0, tags0
    assert {"replay/occupancy_mean", "replay/dropped", "replay/staleness_mean", "test_acc/ensemble"} <= tags1, tags1


def test_report_writes_figures_and_page(two_ranks, tmp_path):
    run, _ = two_ranks
    p = decoupled(["report", str(run), "--out", str(tmp_path / "rep")], timeout=120)
    assert p.returncode == 0, p.stderr
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "| block | test acc." in page and "| rank | blocks | peak memory" in page and "![layer_accuracy]" in page
    for name in ("layer_accuracy", "memory_per_rank", "throughput_vs_ranks"):
        assert (tmp_path / "rep" / f"{name}.png").stat().st_size > 1000
    assert decoupled(["report", str(tmp_path / "nothing-here")]).returncode == 2


# ---------------------------------------------------------------------------- the extension guide
def _guide_code() -> str:
    """The objective file of docs/extending.md "Adding an objective" (its first ```python block)."""
    text = (REPO / "docs" / "extending.md").read_text()
    section = text[text.index("## Adding an objective"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_objective_template_from_the_guide_trains(tmp_path, monkeypatch):
    # the guide's file, as decoupled/objectives/smoothed.py
    module = types.ModuleType("decoupled.objectives.smoothed")
    module.__package__ = "decoupled.objectives"
    exec(compile(_guide_code(), "decoupled/objectives/smoothed.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    # the guide's registry line
    from decoupled.objectives import OBJECTIVES, ObjectiveSpec
    monkeypatch.setitem(OBJECTIVES, "smoothed", ObjectiveSpec(module.Smoothed))
    cfg = load(None, ["objective.name=smoothed", "model.widths=[16,16]", "train.epochs=1", "data.limit_train=256",
                      "train.quiet=true"])
    s = train(cfg, tmp_path)
    assert s["objective"] == "smoothed" and len(s["layers"]) == 2
    assert all(0.0 <= layer["test_acc"] <= 1.0 for layer in s["layers"])
