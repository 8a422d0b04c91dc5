"""The package's import graph, read from the source (AST: every import statement, the ones inside
functions included, relative ones resolved): config/ is a leaf, and no module imports itself back
through a chain of others (no cycle)."""
import ast
import importlib
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "decoupled"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports: `from X import y` counts X.y when that is a module, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `g` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str):
        state[m] = 1
        path.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_graph_sees_function_level_and_relative_imports():
    g = graph()
    assert "decoupled.config.schema" in g["decoupled.config.parse"]  # from .schema import ...
    assert "decoupled.job" in g["decoupled.engine.build"]  # from ..job import JobConfig
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"] and _cycle({"a": {"b"}, "b": set()}) is None


def test_config_is_a_leaf():
    """config/ imports nothing else from the package: by its source, and when imported alone."""
    for name, deps in graph().items():
        if name.startswith("decoupled.config"):
            assert all(d.startswith("decoupled.config") for d in deps), (name, deps)
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "decoupled" or m.startswith("decoupled.")}
    try:
        for name in _modules():
            if name.startswith("decoupled.config"):
                importlib.import_module(name)
        loaded = [m for m in sys.modules if m.startswith("decoupled.")]
        assert all(m.startswith("decoupled.config") for m in loaded), loaded
    finally:
        for m in [m for m in sys.modules if m == "decoupled" or m.startswith("decoupled.")]:
            del sys.modules[m]
        sys.modules.update(saved)


def test_no_import_cycle():
    assert _cycle(graph()) is None, " -> ".join(_cycle(graph()))


def test_api_names_are_not_shadowed_by_submodules():
    """`decoupled.train` and `decoupled.load_config` stay the API functions after the training-run
    module is imported: no submodule shares their names, so the package swaps no module class."""
    import decoupled
    import decoupled.run_job  # the one training run (formerly decoupled/train.py)
    for name in ("train", "load_config"):
        assert f"decoupled.{name}" not in _modules(), name
        assert callable(getattr(decoupled, name)) and not isinstance(getattr(decoupled, name), type(decoupled))
    assert decoupled.run_job.train is not decoupled.train
    assert "__class__" not in (PACKAGE / "__init__.py").read_text()
