"""A user's plug-in module (model, objective, dataset), written to a temporary folder by the tests
(test_plugins.py) and imported from there: on sys.path in-process, on PYTHONPATH for torchrun's ranks."""
PLUGIN = '''
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from decoupled.config import knob
from decoupled.objectives import Objective, ObjectiveConfig
from decoupled.objectives.base import masked_mean


def build(cfg, input_shape, num_classes):
    """Three units: an MLP on the flattened input; [model.args] width."""
    w = int(cfg.args.get("width", 16))
    f = int(torch.tensor(input_shape).prod())
    return [nn.Sequential(nn.Flatten(), nn.Linear(f, w), nn.ReLU(), nn.Dropout(0.1)),
            nn.Sequential(nn.Linear(w, w), nn.ReLU()),
            nn.Sequential(nn.Linear(w, w), nn.Tanh())]


class Smoothed(Objective):
    """Cross-entropy with label smoothing: its own [objective] key, objective.smoothing."""

    @dataclass
    class Config(ObjectiveConfig):
        smoothing: float = knob(0.1, ge=0.0, lt=1.0)  # label smoothing of the cross-entropy

    def loss(self, h, logits, y, mask):
        eps = self.cfg.smoothing
        return masked_mean(F.cross_entropy(logits, y, reduction="none", label_smoothing=eps), mask)


class Plain(Objective):
    """No Config of its own: the base's keys (objective.head, k, ...)."""


def load(cfg, seed):
    """Four Gaussian blobs of [data.args] dim features: train as tensors, test as a Dataset."""
    d = int(cfg.args.get("dim", 12))
    g = torch.Generator().manual_seed(1234)
    protos = 2 * torch.randn(4, d, generator=g)
    def draw(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return protos[y] + torch.randn(n, d, generator=g), y
    xtr, ytr = draw(256)
    xte, yte = draw(96)
    return (xtr, ytr), torch.utils.data.TensorDataset(xte, yte), 4


def wrong_build(cfg, input_shape):
    return []


class NotAnObjective(nn.Module):
    pass
'''

# A tiny installed distribution registering the same code under bare names (entry points).
DIST_INFO = {
    "METADATA": "Metadata-Version: 2.1\nName: myplug-dist\nVersion: 0.1\n",
    "entry_points.txt": "[decoupled.models]\nmynet = myplug:build\n\n[decoupled.objectives]\nsmoothed = "
                        "myplug:Smoothed\n\n[decoupled.datasets]\nblobs = myplug:load\n",
}

# The plug-in job: model, objective and dataset from the module; the model and dataset read their
# [*.args] tables, the objective its own key.
SETS = ["model.name=myplug:build", "model.args.width=16", "objective.name=myplug:Smoothed",
        "objective.smoothing=0.05", "data.name=myplug:load", "data.args.dim=12", "data.batch_size=32",
        "train.epochs=2", "train.device=cpu"]


def write(folder) -> None:
    (folder / "myplug.py").write_text(PLUGIN)
    info = folder / "myplug_dist-0.1.dist-info"
    info.mkdir(exist_ok=True)
    for name, text in DIST_INFO.items():
        (info / name).write_text(text)
