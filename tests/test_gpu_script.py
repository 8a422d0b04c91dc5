"""tests/gpu/run.sh, the one command for a GPU machine, stays runnable before a GPU is ever lent: its dry
run (every step in a CPU form: collect-only tests, one rank over gloo, the comparison of sync with
simultaneous, `decoupled bench --help`) exits 0 and writes a summary that names every step."""
from __future__ import annotations

import subprocess

import pytest

from torchrun_utils import REPO, env

STEPS = ["gpu-tests", "engine-gpu-test", "sync-1rank", "async-1rank", "sync-2rank", "async-2rank", "sync-3rank",
         "async-3rank", "simultaneous", "compare", "guard"]


@pytest.mark.torchrun  # the script's jobs launch torchrun (decoupled train --nproc-per-node 1)
@pytest.mark.slow  # ~40 s on the 2-core machine: nine Python processes, three of them training
def test_gpu_script_dry_run(tmp_path):
    e = {**env(), "OUT": str(tmp_path)}
    e.pop("GPU_SCRIPT_DRY_RUN", None)
    p = subprocess.run(["bash", "tests/gpu/run.sh", "--dry-run"], env=e, cwd=REPO, capture_output=True, text=True,
                       timeout=240)
    summary = tmp_path / "gpu-summary.md"
    text = summary.read_text() if summary.exists() else ""
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}\n{text}"
    assert text.startswith("# GPU check") and "DRY RUN" in text
    table = text.split("| step | result |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]  # the steps' table
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table}
    assert list(rows) == STEPS, rows
    # what a CPU can run passes; the multi-rank NCCL jobs are skipped with their reason
    assert all(rows[s] == "pass" for s in STEPS if "2rank" not in s and "3rank" not in s), rows
    assert all(rows[s] == "skip" for s in STEPS if "2rank" in s or "3rank" in s), rows
    assert "Duplicate GPU detected" in text and "equal bit for bit" in text
    assert (tmp_path / "gpu-logs" / "sync-1rank.log").exists()
