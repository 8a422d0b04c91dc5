"""The entry points, as a user runs them: python -m, the console script, launch/train.py, torchrun,
config errors (exit 2, message on stderr) and the README's main quick-start command."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["--set", "train.epochs=1", "--set", "data.limit_train=200", "--set", "model.widths=[16,16]"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the console script of this environment
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run(cmd, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120, **kw)


def check_run(proc: subprocess.CompletedProcess, out: Path, blocks: int = 2) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["layers"]) == blocks
    assert all(0.0 <= layer["test_acc"] <= 1.0 for layer in summary["layers"])
    assert "test_acc" in proc.stdout and str(out) in proc.stdout  # the console summary
    return summary


def test_python_m(tmp_path):
    out = tmp_path / "run"
    check_run(run([sys.executable, "-m", "decoupled", "train", *TINY, "--out", str(out)], tmp_path), out)


def test_console_script(tmp_path):
    script = BIN / "decoupled"
    assert script.is_file(), f"console script missing next to {sys.executable}"
    out = tmp_path / "run"
    check_run(run([str(script), "train", *TINY, "--out", str(out)], tmp_path), out)


def test_launch_script_and_config_file(tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text("[train]\nepochs = 1\n[model]\nwidths = [16, 16, 16]\n[data]\nlimit_train = 200\n")
    out = tmp_path / "run"
    proc = run([sys.executable, str(REPO / "launch" / "train.py"), "train", "--config", str(cfg),
                "--out", str(out)], tmp_path)
    check_run(proc, out, blocks=3)


def test_torchrun_one_process(tmp_path):
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                "-m", "decoupled", "train", *TINY, "--out", str(out)], tmp_path)
    summary = check_run(proc, out)
    assert summary["world_size"] == 1


def test_config_error_exit_2(tmp_path):
    proc = run([sys.executable, "-m", "decoupled", "train", "--set", "trian.epochs=1",
                "--out", str(tmp_path / "run")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "trian" in proc.stderr and "config error" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.torchrun
@pytest.mark.slow
def test_readme_main_command(tmp_path):
    """The README's quick-start `... && decoupled train ...   # main job` line runs, as written, on a
    fresh clone (cwd = a folder holding the repository's launch/), writing runs/<timestamp>/: the
    decoupled engine on 3 local ranks, per-epoch lines before the summary, per-block accuracies that
    do not fall with depth, and the end-to-end baseline beside them."""
    lines = [ln for ln in (REPO / "README.md").read_text().splitlines()
             if "decoupled train" in ln and re.search(r"#\s*main job", ln)]
    assert lines, "README has no quick-start line with `decoupled train  # main job`"
    cmd = lines[0].split("#", 1)[0].split("&&")[-1].strip()
    assert shlex.split(cmd)[:2] == ["decoupled", "train"]
    (tmp_path / "launch").symlink_to(REPO / "launch")
    proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd!r} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    summaries = list((tmp_path / "runs").glob("*/summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["dataset"] == "digits" and summary["mode"] in ("sync", "async") and summary["world_size"] > 1
    accs = [layer["test_acc"] for layer in summary["layers"]]
    assert accs == sorted(accs) and accs[-1] > 0.95, accs  # deeper blocks do not do worse
    out = proc.stdout
    assert out.index("[rank 0] epoch 1/") < out.index("block 0: test_acc")  # live lines, then the summary
    assert "compare:" in out and "end-to-end backprop" in out
    assert summary["e2e_baseline"]["test_acc"] > 0.9


@pytest.mark.parametrize("args,names", [
    (["--set", "train.epoch=1"], "train.epoch"),
    (["--set", "train.mode=pipeline"], "train.mode"),
    (["--config", "no-such-file.toml"], "no-such-file.toml"),
    (["--set", "model.name=vgg", "--set", "model.hierarchy=[1,1,1,1,1]"], "model.hierarchy"),
    (["--set", "data.name=mnist", "--set", "data.root=."], "data.root"),  # folder exists, MNIST does not
])
def test_config_errors_in_process(tmp_path, monkeypatch, capsys, args, names):
    """Errors found at validation, at model build and at data load all exit 2 naming the field."""
    from decoupled.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("decoupled: config error:") and names in err
    assert not (tmp_path / "run" / "summary.json").exists()
