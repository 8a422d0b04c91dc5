"""Datasets as in-memory tensors, and a deterministic batch iterator over them.

Everything is loaded once into (N, C, H, W) float tensors, normalised with the training set's
per-channel statistics. Batches are cut from a seeded permutation per epoch and augmented with a
seeded generator, so a batch is a pure function of (seed, epoch, step): the single-process and the
distributed trainers see the same data in the same order without sharing any state.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .config import ConfigError, DataConfig
from .data_plugin import plugin_loader
from .device import accel
from .plugins import resolve
from .rng import generator


@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) or (N, F), float32, normalised
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Data:
    name: str
    train: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    val: Split | None = None  # data.val_fraction > 0: held out of the training set (docs/configuration.md: validation)

    @property
    def class_counts(self) -> torch.Tensor:
        """|T_0 ∩ c|: the training set's class sizes, which QuickNet's class balancing weights by."""
        return torch.bincount(self.train.y, minlength=self.num_classes)


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor  # sample indices into the split: lets later stages track samples
    step: int  # index of the batch within its epoch


# ---------------------------------------------------------------------------- loaders

def _digits_arrays():
    """sklearn's digits.csv.gz read directly (what load_digits reads), without importing sklearn:
    that import costs seconds, more than the quick-start job's training; load_digits if the file moved."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images, d.target


def _digits(cfg: DataConfig, seed: int):
    # scikit-learn ships the 1797 8x8 UCI digits inside the package: real data, no download.
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.int64)
    # fixed seeded 80/20 split (seed 0 always, so the test set never depends on the job seed)
    perm = torch.randperm(len(y), generator=generator(0, "digits-split"))
    n_test = len(y) // 5
    te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
    return x[tr], y[tr], x[te], y[te], 10


def _torchvision(cls_name: str):
    def load(cfg: DataConfig, seed: int):
        import torchvision
        cls = getattr(torchvision.datasets, cls_name)
        try:
            tr = cls(root=cfg.root, train=True, download=cfg.download)
            te = cls(root=cfg.root, train=False, download=cfg.download)
        except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True ..."
            raise ConfigError(f"data.root={cfg.root!r} has no {cls_name} dataset ({e}); point data.root "
                              "at the folder that holds it or set data.download=true") from None

        def tensors(ds):
            x = torch.as_tensor(np.asarray(ds.data))
            x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # HWC -> CHW
            return x.float() / 255.0, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

        (xtr, ytr), (xte, yte) = tensors(tr), tensors(te)
        return xtr, ytr, xte, yte, len(tr.classes)
    return load


def _imagefolder(cfg: DataConfig, seed: int):
    import torchvision
    from torchvision.transforms import functional as TF
    root = Path(cfg.root)
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise ConfigError(f"data.root={cfg.root!r} must hold train/ and test/ (or val/) folders of "
                          "class sub-folders for data.name='imagefolder'")

    def tensors(folder):
        ds = torchvision.datasets.ImageFolder(str(folder))
        xs = [TF.pil_to_tensor(ds.loader(p)) for p, _ in ds.samples]
        shapes = {tuple(t.shape) for t in xs}
        if len(shapes) != 1:
            raise ConfigError(f"data.root={cfg.root!r}: images have different sizes {sorted(shapes)[:3]}; "
                              "resize them to one size first")
        return torch.stack(xs).float() / 255.0, torch.tensor([c for _, c in ds.samples]), ds.classes

    xtr, ytr, classes = tensors(root / "train")
    xte, yte, test_classes = tensors(test_dir)
    if test_classes != classes:
        raise ConfigError(f"data.root={cfg.root!r}: train/ and {test_dir.name}/ have different classes")
    return xtr, ytr, xte, yte, len(classes)


def _synthetic(cfg: DataConfig, seed: int):
    # Gaussian blobs around one random prototype per class: learnable, any shape, no files.
    shape, c = tuple(cfg.synthetic_shape), cfg.synthetic_classes
    g = generator(seed, "synthetic")
    protos = torch.randn((c, *shape), generator=g)

    def draw(n):
        y = torch.randint(0, c, (n,), generator=g)
        return protos[y] + 1.5 * torch.randn((n, *shape), generator=g), y

    (xtr, ytr), (xte, yte) = draw(cfg.synthetic_train), draw(cfg.synthetic_test)
    return xtr, ytr, xte, yte, c


LOADERS = {
    "digits": _digits,
    "mnist": _torchvision("MNIST"),
    "fashion-mnist": _torchvision("FashionMNIST"),
    "cifar10": _torchvision("CIFAR10"),
    "cifar100": _torchvision("CIFAR100"),
    "imagefolder": _imagefolder,
    "synthetic": _synthetic,
}


def loader_for(name: str) -> Callable | None:
    """The loader data.name names: built-in or a plug-in (import path or entry point); None when neither."""
    if name in LOADERS:
        return LOADERS[name]
    load = resolve("dataset", name)
    return None if load is None else plugin_loader(name, load)


def _subset(x, y, limit: int, seed: int, name: str):
    if not limit or limit >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=generator(seed, "subset", name))[:limit].sort().values
    return x[idx], y[idx]


def stratified_holdout(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, validation ids), sorted and disjoint: from every class, round(fraction * its count)
    samples (at least one when the class has two or more), drawn by a generator seeded by (seed, class),
    so the hold-out of a class does not depend on the other classes."""
    val = []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        perm = torch.randperm(len(idx), generator=generator(seed, "val-split", c))
        val.append(idx[perm[:k]])
    val_ids = torch.cat(val).sort().values if val else torch.zeros(0, dtype=torch.int64)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val_ids] = False
    return keep.nonzero().flatten(), val_ids


def build_data(cfg: DataConfig, seed: int) -> Data:
    load = loader_for(cfg.name)
    if load is None:
        raise ConfigError(f"data.name={cfg.name!r} is unknown; choose one of {sorted(LOADERS)} or a plug-in "
                          "\"package.module:load\"")
    xtr, ytr, xte, yte, num_classes = load(cfg, seed)
    xtr, ytr = _subset(xtr, ytr, cfg.limit_train, seed, "train")
    xva = yva = None
    if cfg.val_fraction > 0:  # held out before normalising: its statistics stay unseen, like the test set's
        tr, va = stratified_holdout(ytr, cfg.val_fraction, seed)
        xtr, ytr, xva, yva = xtr[tr], ytr[tr], xtr[va], ytr[va]
    xte, yte = _subset(xte, yte, cfg.limit_test, 0, "test")  # the test set never depends on the job seed
    for split, y in (("train", ytr), ("test", yte)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ConfigError(f"data.name={cfg.name!r}: {split} labels outside [0, {num_classes}); "
                              "the dataset is corrupt or its classes do not match")
    # normalise with the training set's per-channel statistics
    dims = [0] + list(range(2, xtr.ndim))
    mean, std = xtr.mean(dims, keepdim=True), xtr.std(dims, keepdim=True).clamp_min(1e-6)
    xtr, xte = ((xtr - mean) / std).contiguous(), ((xte - mean) / std).contiguous()
    val = Split(((xva - mean) / std).contiguous(), yva) if xva is not None else None
    return Data(cfg.name, Split(xtr, ytr), Split(xte, yte), tuple(xtr.shape[1:]), num_classes, val)


# ---------------------------------------------------------------------------- batches

@dataclass(frozen=True)
class Augment:
    """A resolved data.augment: a zero-padded random crop of `pad` pixels, and a random horizontal
    flip only where a mirrored image is the same class (never on digits: a flipped 2 is no 2)."""
    pad: int
    flip: bool


CIFAR = Augment(pad=4, flip=True)  # the standard CIFAR recipe (pad 4, crop 32, flip)
# data.augment="auto" per dataset: natural images get CIFAR's crop + flip; digits and clothes get the
# pad-2 crop without flip that the reference (Nokland & Eidnes' local-loss code) uses on MNIST.
AUGMENT_AUTO = {"cifar10": CIFAR, "cifar100": CIFAR, "imagefolder": CIFAR,
                "mnist": Augment(2, False), "fashion-mnist": Augment(2, False),
                "digits": Augment(2, False), "synthetic": Augment(2, False)}


PLUGIN_CROP = Augment(2, False)  # data.augment="crop" / "crop-flip" on a plug-in dataset: pad 2


def resolve_augment(cfg: DataConfig) -> Augment | None:
    """data.augment for data.name: None = no augmentation. "crop" and "crop-flip" keep the dataset's
    crop padding (4 on natural images, 2 on digits) and set the flip explicitly."""
    if cfg.augment == "none" or (cfg.augment == "auto" and cfg.name not in AUGMENT_AUTO):
        return None  # a plug-in dataset: whether cropping or mirroring keeps its classes is unknown
    auto = AUGMENT_AUTO.get(cfg.name, PLUGIN_CROP)
    return auto if cfg.augment == "auto" else Augment(auto.pad, flip=cfg.augment == "crop-flip")


def augment_draws(n: int, g: torch.Generator, pad: int, flip: bool):
    """The random numbers one augmented batch of n samples takes from `g`: offsets dy, dx, flips."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    return dy, dx, (torch.rand(n, generator=g) < 0.5) if flip else None


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Zero-padded random crop (and random horizontal flip) of a (N, C, H, W) batch, for all samples
    at once by index arithmetic. Draws dy, dx, then the flips from `g`: a pure function of g's state."""
    if x.ndim != 4:
        raise ValueError(f"data.augment crops (N, C, H, W) images, got a batch of shape {tuple(x.shape)}; "
                         "set data.augment='none' for flat features")
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx, mirror = (t.to(x.device) if t is not None else None for t in augment_draws(n, g, pad, flip))
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H): the crop's rows in the padded image
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W)
    if flip:
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    idx = torch.arange(n, device=x.device)[:, None, None, None]
    ch = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[idx, ch, rows[:, None, :, None], cols[:, None, None, :]]


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def batches(split: Split, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
            augment: Augment | bool | None = None, keep: Callable[[int], bool] | None = None) -> Iterator[Batch]:
    """augment: a resolved data.augment (resolve_augment); True = the CIFAR recipe, False/None = none.
    keep(step): only those batches are gathered and yielded (a stage group's replica); the others
    still take their random numbers, so every batch is the same whoever yields it."""
    if augment is True:
        augment = CIFAR
    n = len(split)
    order = torch.randperm(n, generator=generator(seed, "order", epoch)) if shuffle else torch.arange(n)
    # data on a device (the async hand-off's cache): index it with device ids, sent up once per epoch
    # from pinned memory; host ids would cost a synchronising copy per gather (on the host: the same ids)
    order = accel(split.y.device).upload(order)[0]
    g = generator(seed, "augment", epoch)
    for step, start in enumerate(range(0, n, batch_size)):
        ids = order[start:start + batch_size]
        if keep is not None and not keep(step):
            if augment:
                augment_draws(len(ids), g, augment.pad, augment.flip)
            continue
        x = split.x[ids]
        if augment:
            x = augment_batch(x, g, augment.pad, augment.flip)
        yield Batch(x, split.y[ids], ids, step)
