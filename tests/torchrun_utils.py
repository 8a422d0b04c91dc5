"""Launch real torchrun jobs from tests, always under a timeout so a bug fails instead of hanging."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from configs import MLP  # noqa: F401  (named configs live in configs.py; tests also import MLP from here)

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port that was free a moment ago, for a rendezvous two agents must share (--nnodes=2); it is
    closed before torchrun binds it, so another process may take it first. Single-agent jobs use
    --standalone, whose store binds port 0 itself."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun_cmd(nproc: int, args: list[str], extra: list[str] = ()) -> list[str]:
    """One agent on this machine: --standalone (a c10d store on a port the OS picks; no port race)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
            "-m", "decoupled", "train", *args]


def torchrun(nproc: int, args: list[str], timeout: float = 240, extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(nproc, args, extra)
    return subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def check(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
    return p


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A private copy of a shared run folder, for a test that resumes or damages it."""
    import shutil
    shutil.copytree(run_dir, dest)
    return dest


def assert_same_states(ref_dir: Path, dist_dir: Path, world: int, epoch: int) -> None:
    """Every block's weights, buffers, head and RNG state after `epoch` equal the reference's, bit for
    bit, and the ranks together hold exactly the reference's blocks."""
    import torch
    from decoupled import checkpoint
    ref = checkpoint.load(checkpoint.path(ref_dir, 0, epoch))["stages"]
    got = [s for r in range(world) for s in checkpoint.load(checkpoint.path(dist_dir, r, epoch))["stages"]]
    assert [s["index"] for s in got] == [s["index"] for s in ref]
    for a, b in zip(ref, got):
        for part in ("block", "objective"):
            assert sorted(a[part]) == sorted(b[part]), f"block {a['index']} {part}: other entries"
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), f"block {a['index']} {part}.{k} differs"
        assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])


def assert_same_results(ref: dict, got: dict) -> None:
    key = lambda s: [(l["block"], l["test_acc"], l["train_samples"], l["epochs"]) for l in s["layers"]]  # noqa
    assert key(got) == key(ref)
    assert got["ensemble_test_acc"] == ref["ensemble_test_acc"]


def overrides(cfg: dict) -> list[str]:
    """{"train.epochs": 2, "model.name": "vgg"} -> ["train.epochs=2", "model.name=vgg"]"""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in cfg.items()]


def sets(cfg: dict) -> list[str]:
    """The same as command-line flags: ["--set", "train.epochs=2", ...]"""
    return [a for o in overrides(cfg) for a in ("--set", o)]


def torchrun_popen(nproc: int, args: list[str], extra: list[str] = ()) -> subprocess.Popen:
    """A torchrun job in the background (for killing or stopping its workers)."""
    cmd = torchrun_cmd(nproc, args, extra)
    return subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def workers(agent: subprocess.Popen) -> dict:
    """The agent's worker processes by RANK."""
    import psutil
    out = {}
    for p in psutil.Process(agent.pid).children(recursive=True):
        try:
            rank = p.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "decoupled" in " ".join(p.cmdline()):
            out[int(rank)] = p
    return out


def wait_for(predicate, timeout: float, what: str) -> None:
    import time
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def kill_tree(agent: subprocess.Popen) -> None:
    """Leave nothing behind, even after a failed assertion (SIGCONT first: a stopped process
    ignores SIGTERM)."""
    import os
    import signal
    try:
        os.killpg(agent.pid, signal.SIGCONT)
        os.killpg(agent.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    agent.wait(timeout=30)
