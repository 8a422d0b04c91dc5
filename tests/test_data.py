"""Data: loaders, seeded subsets, and batches as a pure function of (seed, epoch)."""
from pathlib import Path

import pytest
import torch

from decoupled.config import DataConfig
from decoupled.data import Augment, Split, augment_batch, batches, build_data, num_batches, resolve_augment
from decoupled.rng import generator

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _same(a, b) -> bool:
    return torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y) and \
        torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)


def test_digits():
    d = build_data(DataConfig(), seed=0)
    assert d.name == "digits" and d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.train) + len(d.test) == 1797 and len(d.test) == 1797 // 5
    assert d.train.x.shape == (len(d.train), 1, 8, 8) and d.train.x.dtype == torch.float32
    assert d.train.y.dtype == torch.int64 and set(d.train.y.tolist()) == set(range(10))
    # normalised with the training statistics
    assert abs(float(d.train.x.mean())) < 1e-4 and abs(float(d.train.x.std()) - 1) < 1e-2
    assert _same(d, build_data(DataConfig(), seed=0))  # deterministic
    # the test split never depends on the job seed
    other = build_data(DataConfig(), seed=5)
    assert torch.equal(d.test.x, other.test.x) and torch.equal(d.test.y, other.test.y)


def test_limit_train_is_fixed_seeded_subset():
    cfg = DataConfig(limit_train=200, limit_test=50)
    a, b, c = build_data(cfg, 0), build_data(cfg, 0), build_data(cfg, 1)
    assert len(a.train) == 200 and len(a.test) == 50
    assert _same(a, b)
    assert not torch.equal(a.train.y, c.train.y) or not torch.equal(a.train.x, c.train.x)
    # a limit at or above the size is a no-op
    full = build_data(DataConfig(), 0)
    assert len(build_data(DataConfig(limit_train=10**6), 0).train) == len(full.train)


@pytest.mark.parametrize("shape", [[64], [3, 8, 8]])
def test_synthetic(shape):
    cfg = DataConfig(name="synthetic", synthetic_shape=shape, synthetic_classes=4, synthetic_train=100,
                     synthetic_test=30)
    d = build_data(cfg, 0)
    assert d.input_shape == tuple(shape) and d.num_classes == 4
    assert d.train.x.shape == (100, *shape) and d.test.x.shape == (30, *shape)
    assert int(d.train.y.min()) >= 0 and int(d.train.y.max()) < 4
    assert torch.isfinite(d.train.x).all()
    assert _same(d, build_data(cfg, 0))
    assert not torch.equal(d.train.x, build_data(cfg, 1).train.x)


def _split(n=200, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g))


def _order(split, **kw):
    return [(b.step, b.ids.clone(), b.x.clone(), b.y.clone()) for b in batches(split, 64, **kw)]


def test_batches_pure_function_of_seed_and_epoch():
    split = _split()
    a = _order(split, seed=3, epoch=2)
    b = _order(split, seed=3, epoch=2)
    assert len(a) == len(b) == num_batches(200, 64) == 4
    for (sa, ia, xa, ya), (sb, ib, xb, yb) in zip(a, b):
        assert sa == sb and torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(ya, yb)
    ids = torch.cat([i for _, i, _, _ in a])
    assert sorted(ids.tolist()) == list(range(200))  # every sample exactly once per epoch
    assert [len(i) for _, i, _, _ in a] == [64, 64, 64, 8]  # last batch smaller
    assert [s for s, _, _, _ in a] == [0, 1, 2, 3]
    for _, i, x, y in a:  # batches hold the samples their ids name
        assert torch.equal(x, split.x[i]) and torch.equal(y, split.y[i])
    other_epoch = torch.cat([i for _, i, _, _ in _order(split, seed=3, epoch=3)])
    other_seed = torch.cat([i for _, i, _, _ in _order(split, seed=4, epoch=2)])
    assert not torch.equal(ids, other_epoch) and not torch.equal(ids, other_seed)
    # iterating other epochs in between does not change an epoch's batches (no hidden state)
    again = torch.cat([i for _, i, _, _ in _order(split, seed=3, epoch=2)])
    assert torch.equal(ids, again)


def test_batches_no_shuffle():
    split = _split(130)
    ids = torch.cat([b.ids for b in batches(split, 64, shuffle=False)])
    assert torch.equal(ids, torch.arange(130))


def test_augment_keeps_shape_and_is_deterministic():
    split = _split(100, (3, 8, 8))
    a = _order(split, seed=1, epoch=0, augment=True)
    b = _order(split, seed=1, epoch=0, augment=True)
    plain = _order(split, seed=1, epoch=0)
    for (_, ia, xa, ya), (_, ib, xb, _), (_, ip, xp, yp) in zip(a, b, plain):
        assert xa.shape == xp.shape and torch.equal(xa, xb)
        assert torch.equal(ia, ip) and torch.equal(ya, yp)  # same order and labels as without augment
    assert any(not torch.equal(xa, xp) for (_, _, xa, _), (_, _, xp, _) in zip(a, plain))
    other = _order(split, seed=1, epoch=1, augment=True)
    assert any(not torch.equal(x, split.x[i]) for _, i, x, _ in other)
    # the split itself is never modified
    assert torch.equal(split.x, _split(100, (3, 8, 8)).x)


def test_augment_batch():
    x = torch.randn(16, 2, 6, 6)
    out = augment_batch(x, generator(0, "t"))
    assert out.shape == x.shape
    assert torch.equal(out, augment_batch(x, generator(0, "t")))
    # crops are shifted/flipped copies: no value appears that was not in the sample or the zero padding
    for i in range(16):
        vals = set(x[i].flatten().tolist()) | {0.0}
        assert set(out[i].flatten().tolist()) <= vals
    flat = torch.randn(8, 64)  # flat data cannot be cropped: an error, never a silent no-op
    with pytest.raises(ValueError, match="data.augment"):
        augment_batch(flat, generator(0, "t"))


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion-mnist", "synthetic"])
def test_auto_augment_never_flips_digits(name):
    aug = resolve_augment(DataConfig(name=name, augment="auto"))
    assert aug == Augment(pad=2, flip=False)
    # a batch of left-right asymmetric images: with pad 0 the only change a flip could make is a mirror
    x = torch.arange(64 * 4 * 4, dtype=torch.float32).reshape(64, 1, 4, 4)
    out = augment_batch(x, generator(0, "t"), pad=0, flip=aug.flip)
    assert torch.equal(out, x)
    assert not torch.equal(augment_batch(x, generator(0, "t"), pad=0, flip=True), x)  # the test can fail


def test_augment_modes_resolve():
    assert resolve_augment(DataConfig(name="cifar10", augment="auto")) == Augment(4, True)
    assert resolve_augment(DataConfig(name="cifar10", augment="crop")) == Augment(4, False)
    assert resolve_augment(DataConfig(name="mnist", augment="crop-flip")) == Augment(2, True)
    assert resolve_augment(DataConfig(name="digits", augment="none")) is None


def test_augment_acts_on_mlp_inputs():
    """The MLP flattens inside its first block, so the data stays (N,C,H,W) and is augmented."""
    from decoupled.job import load
    cfg = load(None, ["data.augment=auto"])  # digits + mlp, the default job
    data = build_data(cfg.data, 0)
    assert data.train.x.ndim == 4
    plain = next(batches(data.train, 32, seed=0, epoch=0))
    aug = next(batches(data.train, 32, seed=0, epoch=0, augment=resolve_augment(cfg.data)))
    assert torch.equal(plain.ids, aug.ids) and not torch.equal(plain.x, aug.x)


@pytest.mark.skipif(not (SHARED_DATA / "MNIST").is_dir(), reason="../shared/data/MNIST not present")
def test_mnist():
    d = build_data(DataConfig(name="mnist", root=str(SHARED_DATA)), seed=0)
    assert len(d.train) == 60000 and len(d.test) == 10000
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert set(d.test.y.unique().tolist()) == set(range(10))


def test_mnist_idx_files(tmp_path):
    """torchvision's MNIST loader on idx files written here (tests/idx_fixture.py): sizes, shape,
    classes, and the pixels and labels as written, scaled to [0, 1] and normalised on the training split."""
    from idx_fixture import write_mnist
    xtr, ytr, xte, yte = write_mnist(tmp_path, n_train=50, n_test=20)
    d = build_data(DataConfig(name="mnist", root=str(tmp_path)), seed=0)
    assert d.name == "mnist" and d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert len(d.train) == 50 and len(d.test) == 20
    assert d.train.y.tolist() == ytr.tolist() and d.test.y.tolist() == yte.tolist()
    raw = torch.tensor(xtr, dtype=torch.float32).unsqueeze(1) / 255
    mean, std = raw.mean(), raw.std()
    assert torch.allclose(d.train.x, (raw - mean) / std, atol=1e-5)
    assert torch.allclose(d.test.x, (torch.tensor(xte, dtype=torch.float32).unsqueeze(1) / 255 - mean) / std, atol=1e-5)
    sub = build_data(DataConfig(name="mnist", root=str(tmp_path), limit_train=30, limit_test=10), seed=0)
    assert len(sub.train) == 30 and len(sub.test) == 10
    assert resolve_augment(DataConfig(name="mnist", root=str(tmp_path), augment="auto")) == Augment(2, False)


def test_trains_on_mnist_idx_files(tmp_path, mnist_root):
    """A whole single-process run on data.name=mnist: the conv and MLP paths take 28 x 28 inputs."""
    from decoupled.job import load
    from decoupled.run_job import train
    for model in (["model.widths=[32,32]"], ["model.name=vgg", "model.hierarchy=[1,1]", "model.width=4"]):
        s = train(load(None, ["data.name=mnist", f"data.root={mnist_root}", "train.epochs=1", "train.quiet=true",
                              "data.batch_size=16", *model]), tmp_path / model[0])
        assert s["dataset"] == "mnist" and len(s["layers"]) == 2
        assert all(layer["train_samples"] == 60 for layer in s["layers"])


def test_missing_torchvision_dataset_names_root(tmp_path):
    from decoupled.config import ConfigError
    with pytest.raises(ConfigError, match=r"data\.root"):
        build_data(DataConfig(name="mnist", root=str(tmp_path)), seed=0)


def test_imagefolder(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (6, 6, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(folder / f"{i}.png")
    d = build_data(DataConfig(name="imagefolder", root=str(tmp_path)), seed=0)
    assert d.input_shape == (3, 6, 6) and d.num_classes == 2
    assert len(d.train) == 6 and len(d.test) == 4
    assert sorted(d.train.y.tolist()) == [0, 0, 0, 1, 1, 1]
    from decoupled.config import ConfigError
    (tmp_path / "test").rename(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"data\.root"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)), seed=0)
