"""A tiny MNIST in torchvision's on-disk layout (root/MNIST/raw/*-ubyte, the idx format), written by
the tests so the torchvision loader runs on a fresh clone, without the real 60k images."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def _idx(path: Path, data: np.ndarray) -> None:
    """idx: magic (0, 0, type 0x08 = unsigned byte, number of dimensions), each dimension as a
    big-endian int32, then the bytes."""
    path.write_bytes(struct.pack(">BBBB", 0, 0, 0x08, data.ndim) + struct.pack(f">{data.ndim}I", *data.shape)
                     + data.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Every class in both splits; each image a noisy bar whose position is its label (learnable).
    Returns (train images, train labels, test images, test labels) as written."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 + 2 * c: 4 + 2 * c, 4:24] = 255
        _idx(raw / f"{split}-images-idx3-ubyte", x)
        _idx(raw / f"{split}-labels-idx1-ubyte", y)
        out += [x.astype(np.uint8), y]
    return tuple(out)
