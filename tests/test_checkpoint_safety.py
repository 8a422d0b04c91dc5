"""Checkpoints cannot run code (issue 22): their state is plain data, read with weights_only=True, and a
file holding a pickled object is refused unread, naming the file."""
from collections import Counter
from pathlib import Path

import pytest
import torch

from decoupled import checkpoint
from decoupled.cli import main
from decoupled.job import ConfigError, load
from decoupled.run_job import train

SMALL = ["data.limit_train=100", "data.batch_size=32", "model.widths=[16,16]", "train.device=cpu",
         "train.log_every=1000", "train.quiet=true"]


class Payload:
    """What a hostile run directory would hold: unpickling it runs code (here: creates `marker`)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def poison(path: Path, marker: Path) -> None:
    """Overwrite a checkpoint with one that looks right but carries the payload."""
    torch.save({"epoch": 0, "rank": 0, "stages": [{"index": 0, "evil": Payload(marker)}]}, path)


def equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    return a == b or (a != a and b != b)  # nan


@pytest.mark.parametrize("extra", [
    # router (commitment optimizer, re-batcher pool of tensor tuples), plateau (ReduceLROnPlateau, inf)
    ["train.mode=simultaneous", "objective.name=quicknet", "train.plateau_factor=0.5", "optim.name=adam"],
    # fp16 loss scaler, scheduled LR (LambdaLR), cascade budgets over sequential blocks
    ["train.mode=sequential", "objective.name=cascade", "train.precision=fp16", "optim.schedule=step"],
])
def test_checkpoints_are_plain_data_and_round_trip_with_weights_only(tmp_path, extra):
    out = tmp_path / "run"
    train(load(None, SMALL + ["train.epochs=1"] + extra), out)
    files = sorted((out / "checkpoints").glob("*.pt"))
    assert files
    for f in files:
        safe = torch.load(f, weights_only=True)
        checkpoint.check_plain(safe)
        assert equal(safe, torch.load(f, weights_only=False))
        assert equal(checkpoint.load(f), safe)


def test_save_refuses_state_that_is_not_plain_data(tmp_path):
    p = tmp_path / "ck.pt"
    with pytest.raises(TypeError, match=r"state\['stages'\]\[0\]\['work'\] is a collections.Counter"):
        checkpoint.save({"stages": [{"work": Counter(a=1)}]}, p)
    with pytest.raises(TypeError, match="key of type"):
        checkpoint.save({"x": {(1, 2): 3}}, p)
    assert not p.exists() and not list(tmp_path.iterdir())  # nothing written, not even a temp file
    checkpoint.save({"rng": torch.Generator().get_state(), "n": 3, "best": float("inf"), "name": "x",
                     "on": True, "none": None, "pair": (1, [2.0])}, p)
    assert checkpoint.load(p)["pair"] == (1, [2.0])


def test_pickled_object_is_refused_without_running_it(tmp_path):
    p, marker = tmp_path / "ck.pt", tmp_path / "pwned"
    poison(p, marker)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=f"checkpoint {p} holds a pickled Python object") as e:
        checkpoint.load(p)
    assert not marker.exists()
    assert "not written by this version" in str(e.value) and "do not resume" in str(e.value)
    assert isinstance(e.value, ConfigError)
    torch.load(p, weights_only=False)  # the payload is real: an unsafe load would have run it
    assert marker.exists()


def test_damaged_files_are_still_skipped_not_refused(tmp_path):
    """Zero-filled (a crash before the data reached the disk), garbage or truncated files are damage:
    try_load reports them by name for the resume to fall back, as before."""
    ck = checkpoint.Checkpointer(tmp_path, 0, True, 0)
    checkpoint.save({"v": torch.arange(3)}, checkpoint.path(tmp_path, 0, 0))
    good = checkpoint.path(tmp_path, 0, 0).read_bytes()
    for epoch, data in enumerate([b"\0" * 4096, bytes(range(256)) * 16, good[: len(good) // 2]], start=1):
        checkpoint.path(tmp_path, 0, epoch).write_bytes(data)
        state, why = ck.try_load(epoch)
        assert state is None and why.startswith(f"checkpoint {checkpoint.path(tmp_path, 0, epoch)} does not load")
    assert torch.equal(ck.try_load(0)[0]["v"], torch.arange(3))


def test_resume_from_a_poisoned_run_dir_stops_and_names_the_file(tmp_path, capsys):
    """Not skipped like a damaged file: resuming stops with a config error (exit 2) naming the file,
    and no code of the file runs, neither on --resume nor on eval."""
    sets = [a for s in SMALL + ["train.mode=simultaneous"] for a in ("--set", s)]
    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert main(["train", *sets, "--set", "train.epochs=2", "--out", str(run)]) == 0
    bad = checkpoint.path(run, 0, 1)
    poison(bad, marker)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert f"config error: checkpoint {bad} holds a pickled Python object" in err
    assert main(["eval", "--run", str(run)]) == 2
    assert str(bad) in capsys.readouterr().err
    ck = checkpoint.Checkpointer(run, 0, True, 0)
    assert ck.try_load(0)[1] is None  # the good older one still loads
    with pytest.raises(checkpoint.UnsafeCheckpointError):
        ck.try_load(1)
    assert not marker.exists()


def test_poisoned_checkpoint_on_one_rank_stops_every_rank(tmp_path, shared_run):
    """torchrun: rank 1's newest checkpoint carries a payload. Every rank stops (no rank is left
    waiting in the resume agreement), the error names the file, and the payload never runs."""
    from torchrun_utils import MLP, copy_run, torchrun
    run = copy_run(shared_run(2, {**MLP, "train.mode": "sync"})[0], tmp_path / "run")
    bad, marker = checkpoint.path(run, 1, 1), tmp_path / "pwned"
    poison(bad, marker)
    p = torchrun(2, ["--resume", str(run), "--set", "train.epochs=3"])
    assert p.returncode != 0
    assert f"checkpoint {bad} holds a pickled Python object" in p.stderr
    assert not marker.exists()
