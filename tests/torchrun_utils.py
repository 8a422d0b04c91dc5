"""Launch real torchrun jobs from tests, always under a timeout so a bug fails instead of hanging."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, args: list[str], timeout: float = 240, extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *extra,
           "-m", "decoupled", "train", *args]
    return subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def check(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
    return p


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def overrides(cfg: dict) -> list[str]:
    """{"train.epochs": 2, "model.name": "vgg"} -> ["train.epochs=2", "model.name=vgg"]"""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in cfg.items()]


def sets(cfg: dict) -> list[str]:
    """The same as command-line flags: ["--set", "train.epochs=2", ...]"""
    return [a for o in overrides(cfg) for a in ("--set", o)]


def torchrun_popen(nproc: int, args: list[str], extra: list[str] = ()) -> subprocess.Popen:
    """A torchrun job in the background (for killing or stopping its workers)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *extra,
           "-m", "decoupled", "train", *args]
    return subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def workers(agent: subprocess.Popen) -> dict[int, "psutil.Process"]:
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
