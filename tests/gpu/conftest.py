from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    """Every test in tests/gpu/ is a `gpu` test (`-m "not gpu"` leaves them out; without CUDA they skip)."""
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
