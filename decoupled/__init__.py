"""decoupled: parallel layer-wise (decoupled) training for PyTorch.

    import decoupled
    cfg = decoupled.load_config("launch/configs/quickstart.toml", overrides=["train.epochs=1"])
    summary = decoupled.train(cfg, out="runs/quick")
"""
import sys
import types

__version__ = "0.1.0"
_API = ("train", "load_config")


def train(config=None, overrides=(), out=None, resume=False):
    """Train a job and return its summary: decoupled/api.py `train` (imported on use: torch)."""
    from .api import train as _train
    return _train(config, overrides, out, resume)


def load_config(config=None, overrides=(), base=None, validate=True):
    """A validated JobConfig: decoupled/api.py `load_config`."""
    from .api import load_config as _load_config
    return _load_config(config, overrides, base, validate)


class _Package(types.ModuleType):
    # Note [decoupled.train]: importing the submodule decoupled/train.py binds it to this package's
    # `train` attribute; the function above must stay what `decoupled.train` is, so that binding is
    # refused (the submodule stays importable by name: `from decoupled.train import train`).
    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
