"""Which tests launch torchrun, read from the test files' source (conftest.py marks them `torchrun`)."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

# Note [torchrun marker]: a test is marked `torchrun` when it, a fixture it requests or a helper of its
# file that it calls launches torchrun: a call of torchrun_utils' torchrun / torchrun_popen / the
# shared_run fixture, or "torch.distributed.run" / "--nproc-per-node" in a function that starts a
# subprocess. Read from the file's source, so a new test needs no decorator. A test that launches
# torchrun from inside another command (`decoupled bench`, `analysis/ablate.py --ranks`, the README's
# main line) carries @pytest.mark.torchrun itself. tests/test_markers.py checks both ways.
LAUNCHERS = {"torchrun", "torchrun_popen", "torchrun_cmd", "shared_run"}
LAUNCH_WORDS = ("torch.distributed.run", "--nproc-per-node")


def _facts(fn: ast.AST) -> tuple[set, bool, bool]:
    """(names it calls, whether it names a torchrun launch, whether it starts a subprocess itself)."""
    calls, local = set(), set()
    says_launch = spawns = False
    for node in ast.walk(fn):
        if isinstance(node, ast.ImportFrom) and node.module != "torchrun_utils":
            local |= {a.asname or a.name for a in node.names}  # e.g. launch.torchrun_command builds a command only
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            calls.add(node.func.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            spawns |= isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            says_launch |= node.value.startswith(LAUNCH_WORDS)
    calls -= local
    return calls, says_launch or bool(calls & LAUNCHERS), spawns


@functools.lru_cache(maxsize=None)
def launching(path: Path) -> frozenset:
    """Names of the file's top-level functions (tests, fixtures, helpers) that launch torchrun."""
    defs = {n.name: _facts(n) for n in ast.parse(path.read_text()).body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    spawners = {name for name, (_, _, spawns) in defs.items() if spawns}
    launching = {name for name, (calls, says, spawns) in defs.items()
                 if calls & {"torchrun", "torchrun_popen", "shared_run"} or (says and (spawns or calls & spawners))}
    while True:  # a helper that calls a launching helper launches
        more = {name for name, (calls, _, _) in defs.items() if calls & launching} - launching
        if not more:
            return frozenset(launching | {"shared_run"})
        launching |= more
