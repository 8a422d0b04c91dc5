"""Local multi-rank launching, shared by `decoupled train --nproc-per-node N` and `decoupled bench`
(its sync / async / gpipe rows): torch's own elastic launcher (torch.distributed.run), with the
semantics and environment of `torchrun --standalone --nproc-per-node N`. On a cluster, call torchrun
yourself (docs/distributed.md: Launching) with node_flags' flags, as the bench's emulated nodes do."""
from __future__ import annotations

import os
import sys

FLAG = "--nproc-per-node"


def torchrun_args(nproc: int, module_args: list[str], node: list[str] = ()) -> list[str]:
    """torch.distributed.run's arguments for N local ranks running `python -m MODULE_ARGS...`.
    --standalone: the agent picks its own free port, so concurrent jobs never race for one. `node`:
    instead, one agent of a job across machines (node_flags)."""
    return [*(node or ["--standalone"]), f"{FLAG}={nproc}", "-m", *module_args]


def node_flags(nnodes: int, node_rank: int, master_addr: str, master_port: int) -> list[str]:
    """One agent of a job across `nnodes` machines: torchrun's static rendezvous on node 0's address
    (what the bench's emulated nodes run, bench/cluster.py, and what to run on real machines)."""
    return [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
            f"--master-port={master_port}"]


def torchrun_command(nproc: int, module_args: list[str], node: list[str] = ()) -> list[str]:
    """The same as a subprocess command line (the bench runs every row as a fresh process)."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(nproc, module_args, node)]


def strip_flag(argv: list[str], flag: str = FLAG) -> list[str]:
    """argv without `flag N` / `flag=N` (and argparse's underscore spelling): what the workers get."""
    names = {flag, flag.replace("-", "_").replace("__", "--")}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif a.split("=", 1)[0] in names and "=" in a:
            continue
        else:
            out.append(a)
    return out


def launch(nproc: int, module_args: list[str]) -> tuple[int, str]:
    """Run N local ranks of `python -m MODULE_ARGS...` under the elastic agent, in this process.
    Returns (exit code, message): 0 and "" on success, else the failed ranks and their messages."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets for N > 1, without its warning
    try:
        torchrun_main(torchrun_args(nproc, module_args))
    except ChildFailedError as e:
        # A worker that fails through decoupled's own error path has printed "decoupled: ..." on its
        # stderr already; torch's placeholder message ("To enable traceback see ...") adds nothing.
        by_code: dict[int, list[str]] = {}
        whys = []
        for rank, f in sorted(e.failures.items()):
            by_code.setdefault(f.exitcode, []).append(str(rank))
            why = f.message if isinstance(f.message, str) else (f.message or {}).get("message", "")
            why = str(why).strip()
            if why and "To enable traceback" not in why and why not in whys:
                whys.append(why.splitlines()[-1])
        parts = [f"rank(s) {', '.join(ranks)} exited with code {code}" for code, ranks in sorted(by_code.items())]
        code = next((c for c in sorted(by_code) if c and c > 0), 1)
        detail = "; ".join(whys) if whys else "their messages are above"
        return code, f"{len(e.failures)} of {nproc} local rank(s) failed: {'; '.join(parts)} ({detail})"
    return 0, ""
