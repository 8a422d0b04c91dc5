"""decoupled: parallel layer-wise (decoupled) training for PyTorch.

    import decoupled
    cfg = decoupled.load_config("launch/configs/quickstart.toml", overrides=["train.epochs=1"])
    summary = decoupled.train(cfg, out="runs/quick")
"""
__version__ = "0.1.0"


def train(config=None, overrides=(), out=None, resume=False):
    """Train a job and return its summary: decoupled/api.py `train` (imported on use: torch)."""
    from .api import train as _train
    return _train(config, overrides, out, resume)


def load_config(config=None, overrides=(), base=None, validate=True):
    """A validated JobConfig: decoupled/api.py `load_config`."""
    from .api import load_config as _load_config
    return _load_config(config, overrides, base, validate)
