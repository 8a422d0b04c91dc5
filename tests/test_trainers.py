"""The single-process trainers: determinism, cache equivalence, cascade budgets, e2e probes, run dir."""
import json
from pathlib import Path

import pytest
import torch

from decoupled import checkpoint
from decoupled.job import load
from decoupled.run_job import train

SMALL = ["data.limit_train=200", "data.batch_size=32", "model.widths=[32,32,32]", "train.epochs=2",
         "train.log_every=3", "train.device=cpu"]  # bit-for-bit checks are CPU checks
N = 200


def job(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    cfg = load(None, SMALL + list(overrides))
    out = tmp_path / name
    summary = train(cfg, out)
    return summary, out


def final_stages(out: Path) -> list[dict]:
    """The stage state dicts of the last checkpoint of rank 0."""
    single = out / "checkpoints" / "rank0.pt"
    if single.exists():
        return checkpoint.load(single)["stages"]
    done = checkpoint.epochs(out, 0)
    assert done, f"no checkpoint in {out / 'checkpoints'}"
    return checkpoint.load(checkpoint.path(out, 0, done[-1]))["stages"]


def tensors(stages: list[dict]) -> dict[str, torch.Tensor]:
    flat = {}
    for sd in stages:
        for part in ("block", "objective"):
            for k, v in sd[part].items():
                flat[f"{sd['index']}.{part}.{k}"] = v
    return flat


def accs(summary: dict) -> list[float]:
    return [layer["test_acc"] for layer in summary["layers"]]


def test_simultaneous_deterministic(tmp_path):
    extra = ["model.dropout=0.1"]  # dropout draws from each stage's own RNG stream
    a, out_a = job(tmp_path, "a", *extra)
    b, out_b = job(tmp_path, "b", *extra)
    c, out_c = job(tmp_path, "c", *extra, "train.seed=1")
    assert accs(a) == accs(b) and a["ensemble_test_acc"] == b["ensemble_test_acc"]
    ta, tb, tc = tensors(final_stages(out_a)), tensors(final_stages(out_b)), tensors(final_stages(out_c))
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)  # another seed trains another network


MODEL_OVERRIDES = {"mlp": [], "simcnn": ["model.name=simcnn", "model.hierarchy=[1,1,1]", "model.width=4",
                                         "model.widths=[150,150,150]"]}  # back to the default: mlp only


@pytest.mark.parametrize("model", list(MODEL_OVERRIDES))
def test_sequential_caches_agree(tmp_path, model):
    runs = {mode: job(tmp_path, mode, "train.mode=sequential", f"train.cache={mode}", "data.eval_batch_size=50",
                      *MODEL_OVERRIDES[model])
            for mode in ("memory", "disk", "recompute")}
    ref_summary, ref_out = runs["memory"]
    ref = tensors(final_stages(ref_out))
    for mode in ("disk", "recompute"):
        summary, out = runs[mode]
        # on CPU these agree bit for bit (the frozen forward is the same math in every mode)
        assert accs(summary) == accs(ref_summary), mode
        other = tensors(final_stages(out))
        for k in ref:
            assert torch.equal(ref[k], other[k]), (mode, k)
    assert sorted(p.name for p in (runs["disk"][1] / "cache").iterdir()) == ["block0.npy", "block1.npy"]
    kinds = [json.loads(line) for line in (runs["memory"][1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["block"] for r in kinds if r["kind"] == "cache"] == [0, 1]
    for mode, (summary, _) in runs.items():
        assert [layer["epochs"] for layer in summary["layers"]] == [2, 2, 2], mode
        assert [layer["train_samples"] for layer in summary["layers"]] == [2 * N] * 3, mode


@pytest.mark.parametrize("mode", ["sequential", "simultaneous"])
def test_cascade_epoch_budget(tmp_path, mode):
    summary, _ = job(tmp_path, mode, f"train.mode={mode}", "objective.name=cascade",
                     "objective.cascade_initial_epochs=1", "objective.cascade_epoch_increment=1",
                     "objective.aux_width=32")
    epochs = [1 + layer for layer in range(3)]
    assert [layer["epochs"] for layer in summary["layers"]] == epochs
    assert [layer["train_samples"] for layer in summary["layers"]] == [e * N for e in epochs]
    assert summary["objective"] == "cascade" and summary["mode"] == mode


def test_e2e_with_probes(tmp_path):
    # full digits (N_full samples): enough for the probes to mean something
    summary, out = job(tmp_path, "e2e", "train.mode=e2e", "train.probe_epochs=1", "data.limit_train=0")
    n_full = summary["layers"][-1]["train_samples"] // 2
    assert summary["mode"] == "e2e"
    assert [layer["block"] for layer in summary["layers"]] == [0, 1, 2]
    assert all(0.0 <= a <= 1.0 for a in accs(summary))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["block"] for r in records if r["kind"] == "probe"] == [0, 1]
    assert n_full == 1438 and [layer["train_samples"] for layer in summary["layers"]] == [2 * n_full] * 3
    assert [layer["epochs"] for layer in summary["layers"]] == [2, 2, 2]
    # the probes make the intermediate heads useful (10 classes: chance is ~0.1)
    assert min(accs(summary)) > 0.5


def test_run_directory(tmp_path, monkeypatch):
    from decoupled import metrics
    marks = []  # the kernel's high-water mark each time the meter restarts it (around every evaluation)
    restart = metrics.PeakMemory.reset_peak

    def spied(self):
        marks.append((metrics._proc_status_kib("VmHWM") or 0) * 1024)
        restart(self)
    monkeypatch.setattr(metrics.PeakMemory, "reset_peak", spied)
    summary, out = job(tmp_path, "run", "train.seed=3")
    assert {"config.toml", "metrics.jsonl", "summary.json", "checkpoints"} <= {p.name for p in out.iterdir()}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    # schema
    assert on_disk["mode"] == "simultaneous" and on_disk["objective"] == "khidden"
    assert on_disk["world_size"] == 1
    assert isinstance(on_disk["wall_s"], float) and on_disk["wall_s"] > 0
    assert [layer["block"] for layer in on_disk["layers"]] == [0, 1, 2]
    for layer in on_disk["layers"]:
        assert 0.0 <= layer["test_acc"] <= 1.0
        assert isinstance(layer["train_samples"], int) and layer["train_samples"] == 2 * N
    assert 0.0 <= on_disk["ensemble_test_acc"] <= 1.0
    assert len(on_disk["ranks"]) == 1
    rank = on_disk["ranks"][0]
    assert rank["rank"] == 0
    # peak memory: measured the way this machine allows, said how, and a real high-water mark: the
    # baseline plus the peak is within the largest RSS this process held since the run reset it (the
    # mark restarts around every evaluation, metrics.PeakMemory.evaluating: the largest of its values
    # before each restart and now)
    assert rank["mem_method"] == metrics._cpu_method()
    assert isinstance(rank["peak_mem_bytes"], int) and rank["mem_baseline_bytes"] > 0
    if rank["mem_method"] == "proc-vmhwm":
        hwm = max([metrics._proc_status_kib("VmHWM") * 1024, *marks])  # before the check below resets it
        from test_memory import _clear_refs_writable
        assert rank["hwm_reset"] is _clear_refs_writable()  # reset at the start where the kernel allows it
        if rank["hwm_reset"]:  # the marks bound the run's training peak; the evaluations' was measured apart
            assert rank["mem_baseline_bytes"] + rank["peak_mem_bytes"] <= hwm
            assert marks and rank["eval_peak_mem_bytes"] is not None
    assert isinstance(rank["samples_per_s"], float) and rank["samples_per_s"] > 0
    # metrics.jsonl: one JSON object per line, epochs evaluated, a closing summary record
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and "kind" in r for r in records)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and len(epochs[-1]["test_acc"]) == 3
    assert epochs[-1]["test_acc"] == accs(summary)
    assert any(r["kind"] == "step" for r in records) and records[-1]["kind"] == "summary"
    # the resolved config loads back to an equal config
    assert load(out / "config.toml") == load(None, SMALL + ["train.seed=3"])
    # the checkpoint holds every stage
    assert [sd["index"] for sd in final_stages(out)] == [0, 1, 2]


def test_rerun_into_same_directory_starts_fresh_metrics(tmp_path):
    _, out = job(tmp_path, "same", "train.epochs=1")
    job(tmp_path, "same", "train.epochs=1")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("summary") == 1


def test_learns_digits(tmp_path):
    cfg = load(None, ["train.epochs=3", "train.mode=simultaneous", "train.checkpoint=false"])
    summary = train(cfg, tmp_path / "learn")
    assert summary["layers"][-1]["test_acc"] > 0.8
    assert summary["ensemble_test_acc"] > 0.8


def test_simultaneous_resume_matches_straight_run(tmp_path):
    """1 epoch, then --resume to 2 epochs, ends with the same weights as 2 epochs straight."""
    from decoupled.cli import main
    sets = [a for s in SMALL + ["model.dropout=0.1"] if not s.startswith("train.epochs") for a in ("--set", s)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *sets, "--set", "train.epochs=2", "--out", str(straight)]) == 0
    assert main(["train", *sets, "--set", "train.epochs=1", "--out", str(resumed)]) == 0
    assert main(["train", "--resume", str(resumed), "--set", "train.epochs=2"]) == 0
    a, b = tensors(final_stages(straight)), tensors(final_stages(resumed))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((resumed / "summary.json").read_text())
    assert accs(sa) == accs(sb)
    assert [layer["train_samples"] for layer in sb["layers"]] == [2 * N] * 3


def test_no_eval_no_checkpoint(tmp_path):
    summary, out = job(tmp_path, "quiet", "train.eval_every=0", "train.checkpoint=false")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "epoch"]
    assert not (out / "checkpoints").exists()
    assert len(summary["layers"]) == 3 and all(0.0 <= a <= 1.0 for a in accs(summary))


# ------------------------------------------------------------------ the registry and the epoch policy

def test_registry_holds_one_trainer_per_mode_with_its_declaration():
    import typing

    from decoupled.config.schema import TrainConfig
    from decoupled.modes import MODES
    from decoupled.trainers import TRAINERS
    modes = typing.get_args(typing.get_type_hints(TrainConfig)["mode"])
    assert tuple(TRAINERS) == tuple(MODES) == modes
    for mode, trainer in TRAINERS.items():
        assert issubclass(trainer, MODES[mode]) and trainer.mode == mode  # capabilities and rules inherited


def test_resume_refusal_follows_the_resumable_capability(tmp_path, monkeypatch):
    from decoupled import modes
    from decoupled.config import ConfigError
    with pytest.raises(ConfigError, match=r"--resume supports train\.mode in \('simultaneous', 'sync', 'async'\), "
                                          r"not 'e2e'"):
        train(load(None, SMALL + ["train.mode=e2e"]), tmp_path / "e2e", resume=True)
    monkeypatch.setattr(modes.Simultaneous, "resumable", False)  # the class attribute decides, nothing else
    with pytest.raises(ConfigError, match=r"--resume supports train\.mode in \('sync', 'async'\), not 'simultaneous'"):
        train(load(None, SMALL), tmp_path / "sim", resume=True)


PLATEAU = ["data.val_fraction=0.1", "train.plateau_factor=0.5", "train.plateau_patience=0", "optim.lr=1e-7",
           "train.epochs=3"]


@pytest.mark.parametrize("mode", ["sequential", "simultaneous"])
def test_plateau_rule_owns_the_lr(tmp_path, mode):
    """At a learning rate too small to move the validation loss, every epoch after the first is a
    plateau: the LR is halved each time, and the constant schedule does not undo it."""
    _, out = job(tmp_path, mode, f"train.mode={mode}", *PLATEAU)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    for j in range(3):
        lrs = [r["lr"][j] for r in epochs if r["block"] in (None, j)]
        assert lrs == pytest.approx([1e-7, 5e-8, 2.5e-8], rel=1e-6), (mode, j, lrs)


def test_plateau_state_survives_resume(tmp_path):
    """The epoch policy is checkpointed with the stages: 2 epochs, then --resume to 3, equals 3 straight."""
    straight, _ = job(tmp_path, "straight", *PLATEAU)
    cfg = load(None, SMALL + PLATEAU + ["train.epochs=2"])
    train(cfg, tmp_path / "resumed")
    resumed = train(load(None, ["train.epochs=3"], base=cfg), tmp_path / "resumed", resume=True)
    a, b = tensors(final_stages(tmp_path / "straight")), tensors(final_stages(tmp_path / "resumed"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert accs(straight) == accs(resumed)
    policy = checkpoint.load(checkpoint.path(tmp_path / "resumed", 0, 2))["policy"]
    assert sorted(policy) == ["block0", "block1", "block2"] and policy["block0"]["plateau"]["num_bad_epochs"] == 0


def test_no_mode_string_compared_outside_the_registry():
    """train.mode is looked up (TRAINERS / MODES), never compared to a mode name, outside decoupled/trainers/
    (decoupled/bench/ compares its own row names)."""
    import ast

    from decoupled.modes import MODES
    names = set(MODES)
    root = Path(__file__).resolve().parents[1] / "decoupled"

    def mode_like(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(mode_like(e) for e in node.elts)
        return isinstance(node, ast.Name) and node.id.endswith("_MODES")

    def is_mode(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "mode") or (isinstance(node, ast.Name)
                                                                            and node.id == "mode")
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("trainers/", "bench/")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(map(is_mode, sides)) and any(map(mode_like, sides)):
                    found.append(f"{rel}:{node.lineno}")
    assert not found, found
