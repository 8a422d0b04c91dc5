"""dist.wire_dtype's codecs (engine/wire.py, note [row scales]): error bounds, zeros, non-finite rows
caught with the block named, every row operation the engine applies keeping a row's scale, one
transfer per message, the replay buffer's byte bound, the single-process modes, and sync equal to
simultaneous bit for bit on 2 ranks."""
from __future__ import annotations

import json
import subprocess
import sys
import typing

import pytest
import torch

from decoupled import checkpoint
from decoupled.config.schema import DistConfig
from decoupled.device import accel
from decoupled.engine.precision import WIRE, NonFiniteError, Precision
from decoupled.engine.ranks.groups import join_tensors, split_tensors
from decoupled.engine.ranks.replay import Entry, ReplayBuffer
from decoupled.engine.ranks.transport import DTYPES, HEADER_BYTES, Kind, Message, header_meta, pack, unpack
from decoupled.engine.wire import CODECS, SCALE_BYTES, decode
from decoupled.job import ConfigError, load
from decoupled.objectives.router import Rebatcher
from decoupled.run_job import train

from configs import MLP
from torchrun_utils import REPO, assert_same_results, assert_same_states, env, overrides, sets, summary, torchrun

SCALED = [c for c in CODECS.values() if c.scaled]
SHAPE = (3, 4, 5)


def rows_of_every_magnitude(n_per: int = 2) -> torch.Tensor:
    """Rows from 1e-3 to 1e5 (and a zero row): one scale per row keeps each row's relative precision."""
    g = torch.Generator().manual_seed(0)
    mags = torch.tensor([0.0, 1e-3, 1.0, 10.0, 1e3, 1e5]).repeat_interleave(n_per)
    return torch.randn((len(mags), *SHAPE), generator=g) * mags.view(-1, 1, 1, 1)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of two wire tensors (torch.equal does not cover every float8 op on CPU)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_the_config_literal_the_transport_and_precision_are_the_registry():
    assert typing.get_args(typing.get_type_hints(DistConfig)["wire_dtype"]) == tuple(CODECS)
    assert WIRE is CODECS
    assert all(c.dtype in DTYPES for c in CODECS.values())
    assert len({c.dtype for c in CODECS.values()}) == len(CODECS)  # the dtype slot names the codec


@pytest.mark.parametrize("codec", SCALED, ids=lambda c: c.name)
def test_round_trip_within_the_codes_rounding(codec):
    """int8: at most half a step (scale / 2) per element; float8: round to nearest in the dtype, i.e.
    half an ulp of the scaled value (eps / 2 relative), subnormals at most half the smallest step."""
    h = rows_of_every_magnitude()
    x = codec.encode(h)
    assert x.dtype == codec.dtype and x.shape == (len(h), 60 + SCALE_BYTES)
    assert codec.row_bytes(60) == x[0].numel() * x.element_size()
    d = codec.decode(x, SHAPE)
    assert d.dtype == torch.float32 and d.shape == h.shape
    amax = h.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / codec.qmax)
    err = (d - h).abs()
    if codec.dtype == torch.int8:
        bound = scale / 2
    else:
        fi = torch.finfo(codec.dtype)
        bound = fi.eps / 2 * (h.abs() + fi.tiny * scale)
    assert (err <= bound * (1 + 1e-5) + 1e-6 * amax).all(), codec.name
    # each row as precise as its own magnitude allows: the 1e-3 rows beside the 1e5 ones
    rel = (err.flatten(1).amax(1) / amax.flatten().clamp_min(1e-30))[2:]
    assert rel.max() <= (0.5 / 127 if codec.dtype == torch.int8 else torch.finfo(codec.dtype).eps / 2) * 1.001


@pytest.mark.parametrize("codec", SCALED, ids=lambda c: c.name)
def test_zeros_come_back_exact_and_an_empty_batch_encodes(codec):
    z = codec.decode(codec.encode(torch.zeros(4, *SHAPE)), SHAPE)
    assert torch.equal(z, torch.zeros(4, *SHAPE)) and not torch.signbit(z).any()
    tiny = torch.full((2, *SHAPE), 1e-44)  # its scale would underflow to 0 (0 / 0: NaN codes)
    assert torch.equal(codec.decode(codec.encode(tiny), SHAPE), torch.zeros(2, *SHAPE))
    empty = codec.encode(torch.empty(0, *SHAPE))
    assert empty.shape == (0, 60 + SCALE_BYTES) and codec.decode(empty, SHAPE).shape == (0, *SHAPE)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("name", [c.name for c in SCALED])
def test_a_non_finite_row_is_refused_with_the_block_named(name, bad):
    """The scale of a row holding inf or NaN is not finite: the row decodes all NaN (never laundered
    into finite codes) and the flag, folded on the device, stops the job at the next check."""
    p = Precision(torch.device("cpu"), compute=None, wire=CODECS[name], check_every=1)
    good = p.to_wire(torch.randn(3, *SHAPE))
    p.check(1, block=3)  # finite: no error
    h = torch.randn(3, *SHAPE)
    h[1, 2, 0, 0] = bad
    x = p.to_wire(h)
    d = decode(x, SHAPE)
    assert torch.isnan(d[1]).all() and torch.isfinite(d[[0, 2]]).all()
    with pytest.raises(NonFiniteError, match=r"block 3 step 2: .*dist\.wire_dtype"):
        p.check(2, block=3)
    assert good.dtype == CODECS[name].dtype


@pytest.mark.parametrize("name", [c.name for c in SCALED])
def test_row_operations_keep_every_row_with_its_scale(name):
    """The engine's cuts (router h[keep], split replicas' tensor_split and join, the rebatcher's cat,
    permutation and slices) on the wire form decode to the same cuts of the decoded batch, bit for bit."""
    codec = CODECS[name]
    h = rows_of_every_magnitude()
    x, full = codec.encode(h), codec.decode(codec.encode(h), SHAPE)
    keep = torch.tensor([i % 3 != 1 for i in range(len(h))])
    assert torch.equal(codec.decode(x[keep], SHAPE), full[keep])
    parts = [split_tensors([x, torch.arange(len(h))], i, 5) for i in range(5)]
    assert [len(p[0]) for p in parts] == [3, 3, 2, 2, 2]
    for i, (xi, ids) in enumerate(parts):
        assert torch.equal(codec.decode(xi, SHAPE), full[ids])
    joined, ids = join_tensors(parts)
    assert same_bytes(joined, x) and torch.equal(ids, torch.arange(len(h)))
    y = torch.arange(len(h)) % 4
    reb = Rebatcher(5, "remaining", torch.tensor([30, 30, 30, 30]), seed=1, index=1)
    reb.add(x[:7], y[:7], torch.arange(7))
    reb.add(x[7:], y[7:], torch.arange(7, len(h)))
    for xb, _, ib in reb.flush():
        assert torch.equal(codec.decode(xb, SHAPE), full[ib])


@pytest.mark.parametrize("name", [c.name for c in SCALED])
def test_a_scaled_message_packs_into_one_buffer_with_its_scales(name):
    """Note [one transfer per message]: the codes and their scales are one segment of one buffer; the
    dtype slot names the codec and the dims are the flat row's, so the receiver's views decode as sent."""
    codec = CODECS[name]
    x = codec.encode(rows_of_every_magnitude())
    n = len(x)
    m = Message(Kind.TRAIN, 1, 9, x, torch.arange(n) % 10, torch.arange(n))
    meta = header_meta(m, 64)
    assert DTYPES[meta[10]] == codec.dtype and meta[4:6] == [1, 60 + SCALE_BYTES]
    assert meta[12] == HEADER_BYTES + 16 * n + -(-n * (60 + SCALE_BYTES) // 8) * 8
    buf, _ = pack(m, meta, meta[12], accel(torch.device("cpu")))
    assert len(buf) == meta[12]
    got = unpack(buf, buf[:HEADER_BYTES].view(torch.int64).tolist())
    assert same_bytes(got.x, x) and torch.equal(got.ids, m.ids)
    assert torch.equal(codec.decode(got.x, SHAPE), codec.decode(x, SHAPE))


def _entry(x: torch.Tensor, i: int) -> Entry:
    return Entry(x, torch.zeros(len(x), dtype=torch.int64), torch.arange(len(x)), epoch=0, step=i)


def test_replay_capacity_mb_bounds_bytes_and_holds_four_times_the_int8_batches():
    """Note [replay bound]: the newest batches that fit; the count bound is not used then."""
    h = torch.randn(32, 1024)
    held = {}
    for name in ("float32", "int8"):
        x = CODECS[name].encode(h)
        buf = ReplayBuffer(capacity=1, policy="fifo", max_reuse=0, seed=0, capacity_mb=1.0)
        for i in range(200):
            buf.put(_entry(x, i))
            assert buf.bytes <= 2**20 and buf.bytes == sum(e.nbytes for e in buf.entries)
        held[name] = len(buf)
        assert [e.step for e in buf.entries] == list(range(200 - len(buf), 200))  # the newest
    per = {n: 32 * CODECS[n].row_bytes(1024) + 2 * 32 * 8 for n in held}  # activations, labels, ids
    assert held == {n: 2**20 // b for n, b in per.items()} and held["int8"] >= 3.5 * held["float32"], held
    # a batch larger than the bound (the padded first one after an evaluation) is held alone
    buf = ReplayBuffer(capacity=4, policy="fifo", max_reuse=0, seed=0, capacity_mb=0.1)
    buf.put(_entry(CODECS["int8"].encode(h), 0))
    buf.put(_entry(h, 1))
    assert [e.step for e in buf.entries] == [1] and buf.bytes > 0.1 * 2**20
    buf.put(_entry(CODECS["int8"].encode(h), 2))
    assert [e.step for e in buf.entries] == [2]


def test_replay_capacity_and_capacity_mb_are_one_bound_or_the_other():
    base = ["train.mode=async", "replay.capacity_mb=64"]
    assert load(None, base).replay.capacity_mb == 64
    with pytest.raises(ConfigError, match=r"replay\.capacity.*replay\.capacity_mb=0"):
        load(None, [*base, "replay.capacity=8"])
    with pytest.raises(ConfigError, match=r"replay\.capacity_mb"):
        load(None, ["train.mode=async", "replay.capacity_mb=-1"])


@pytest.mark.parametrize("name", [c.name for c in SCALED])
def test_simultaneous_trains_with_every_scaled_wire(tmp_path, name):
    """The codec acts at the block boundaries of one process: the first block trains on the raw data
    either way (the same loss), what the next blocks read differs from float32's, and it still learns."""
    cfg = {**MLP, "train.mode": "simultaneous", "train.epochs": 1}
    ref = train(load(None, overrides(cfg)), tmp_path / "fp32")
    got = train(load(None, overrides({**cfg, "dist.wire_dtype": name})), tmp_path / name)
    states = [checkpoint.load(checkpoint.path(tmp_path / d, 0, 0))["stages"] for d in ("fp32", name)]
    same = [all(torch.equal(a["block"][k], b["block"][k]) for k in a["block"]) for a, b in zip(*states)]
    assert same == [True, False, False]
    for a, b in zip(ref["layers"], got["layers"]):
        assert abs(a["test_acc"] - b["test_acc"]) < 0.15, (a, b)


def test_quicknet_caches_decoded_pseudo_inputs_of_an_int8_wire(tmp_path):
    """The quicknet trainer caches a frozen block's outputs (FrozenInputs / PseudoInputs): decoded
    through the codec, never cast, so an int8 wire trains as the next block would read it."""
    cfg = {**MLP, "train.mode": "quicknet", "objective.name": "quicknet", "train.epochs": 1, "train.cache": "memory"}
    ref = train(load(None, overrides(cfg)), tmp_path / "fp32")
    got = train(load(None, overrides({**cfg, "dist.wire_dtype": "int8"})), tmp_path / "int8")
    for a, b in zip(ref["layers"], got["layers"]):
        assert b["train_samples"] > 0 and abs(a["test_acc"] - b["test_acc"]) < 0.15, (a, b)


# ---------------------------------------------------------------------------- on torchrun (2 ranks)

@pytest.mark.parametrize("objective,wire", [("khidden", "int8"), ("quicknet", "float8_e4m3fn")])
def test_sync_equals_simultaneous_with_a_scaled_wire(shared_run, shared_reference, objective, wire):
    """The same codec at the reference's block boundaries as on the wire: every block's weights,
    buffers, head and RNG state equal, bit for bit (quicknet: routed rows cut and re-batched in the
    wire form, note [row scales])."""
    cfg = {**MLP, "objective.name": objective, "dist.wire_dtype": wire}
    ref_dir, ref = shared_reference(cfg)
    run, _ = shared_run(2, {**cfg, "train.mode": "sync"})
    assert_same_results(ref, summary(run))
    assert_same_states(ref_dir, run, 2, 1)


def test_int8_wire_sends_about_a_quarter_of_the_bytes(shared_run):
    # train.eval_every=0: no evaluation between training batches, whose transfer would pad the next
    # training message to its size once (note [one transfer per message])
    got = {wire: summary(shared_run(2, {**MLP, "train.mode": "sync", "dist.wire_dtype": wire,
                                        "train.eval_every": 0})[0])["ranks"][0] for wire in ("float32", "int8")}
    per = {w: r["train_bytes_sent"] / r["train_samples_sent"] for w, r in got.items()}
    # training messages: activations 24 x 4 -> 24 + 4 bytes a sample; labels and ids (16) and the
    # header (112 per batch of 32) are not compressed: (3.5 + 16 + 28) / (3.5 + 16 + 96) = 0.41
    assert per["int8"] < 0.45 * per["float32"], per
    assert got["int8"]["bytes_sent"] > got["int8"]["train_bytes_sent"]  # evaluations' traffic is apart


def test_a_byte_bound_below_one_batch_is_refused_at_setup(tmp_path):
    """Note [replay bound]: every training batch would overflow it; the receiving rank refuses before
    training, naming the key and the batch's size."""
    cfg = {**MLP, "train.mode": "async", "dist.wire_dtype": "int8", "replay.capacity_mb": 0.001}
    p = torchrun(2, ["--out", str(tmp_path / "run"), *sets(cfg)], timeout=180)
    assert p.returncode != 0 and "replay.capacity_mb=0.001 holds no batch of rank 1's link: one takes 0.001" in p.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_async_int8_wire_with_a_byte_bounded_replay_buffer(shared_run):
    run, _ = shared_run(2, {**MLP, "train.mode": "async", "dist.wire_dtype": "int8", "replay.capacity_mb": 0.01})
    got = summary(run)
    rep = got["ranks"][1]["replay"]
    # 0.01 MiB holds 7 int8 batches of 32 x (24 + 4 + 16) bytes (float32: 3): never more at once
    assert rep["received"] > 0 and 2 <= rep["occupancy_max"] <= int(0.01 * 2**20) // (32 * (24 + 4 + 16)) == 7
    assert all(0.0 <= layer["test_acc"] <= 1.0 for layer in got["layers"]) and len(got["layers"]) == 3


@pytest.mark.torchrun  # `decoupled bench` launches the sync rows itself
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_puts_the_int8_wire_beside_sync(tmp_path):
    from test_bench import TINY
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "decoupled", "bench", "--ranks", "2", "--repeats", "1", "--rows", "sync,sync-int8",
           "--out", str(out), "--timeout", "150", *sets(TINY)]
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert list(rows) == ["sync", "sync-int8"]
    per = {m: r["wire_bytes_per_sample"] for m, r in rows.items()}
    assert per["sync-int8"] < 0.45 * per["sync"], per
    assert "wire B/sample" in (out / "bench.md").read_text()
