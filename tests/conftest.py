import os
from pathlib import Path

import pytest
import torch

# 2-core CI: one thread per process keeps tests fast and distributed tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Note [torchrun marker] (tests/markers.py): mark the tests that launch torchrun."""
    from markers import launching
    for item in items:
        found = launching(Path(str(item.fspath)))
        if item.originalname in found or found & set(item.fixturenames):
            item.add_marker(pytest.mark.torchrun)


def _key(cfg: dict) -> str:
    """Configs that resolve to the same job are one job (explicit defaults or not)."""
    from decoupled.job import load, to_toml
    from torchrun_utils import overrides
    return to_toml(load(None, overrides(cfg)))


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """shared_run(world, cfg) -> (run folder, completed process): one torchrun job per resolved config
    and world size for the whole session, so tests that assert different things of one job launch it
    once. The folder is shared: a test that resumes or damages it works on copy_run(folder, ...)."""
    from torchrun_utils import check, sets, torchrun
    done: dict = {}

    def get(world: int, cfg: dict):
        key = (world, _key(cfg))
        if key not in done:
            out = tmp_path_factory.mktemp("shared-run") / "run"
            done[key] = (out, check(torchrun(world, ["--out", str(out), *sets(cfg)])))
        return done[key]
    return get


@pytest.fixture(scope="session")
def shared_reference(tmp_path_factory):
    """shared_reference(cfg) -> (run folder, summary): the single-process simultaneous trainer on cfg,
    run once per resolved config for the whole session (read-only)."""
    from decoupled.job import load
    from decoupled.run_job import train
    from torchrun_utils import overrides
    done: dict = {}

    def get(cfg: dict):
        cfg = {**cfg, "train.mode": "simultaneous"}
        key = _key(cfg)
        if key not in done:
            out = tmp_path_factory.mktemp("shared-ref") / "ref"
            done[key] = (out, train(load(None, overrides(cfg)), out))
        return done[key]
    return get


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """data.root of a tiny MNIST in torchvision's layout (tests/idx_fixture.py): 60 train, 20 test."""
    from idx_fixture import write_mnist
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root)
    return root
