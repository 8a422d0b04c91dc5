"""Issue 24: plug-ins from user code (import paths, entry points), their errors, and the Python API."""
from __future__ import annotations

import importlib
import sys

import pytest

import decoupled
from decoupled.job import ConfigError, load
from decoupled.models import build_model
from plugin_fixture import SETS, write
from torchrun_utils import assert_same_results, assert_same_states, check, summary, torchrun


@pytest.fixture
def plug(tmp_path, monkeypatch):
    """The plug-in module and its dist-info in a folder on sys.path and on PYTHONPATH (torchrun's ranks)."""
    folder = tmp_path / "site"
    folder.mkdir()
    write(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    importlib.invalidate_caches()
    yield folder
    sys.modules.pop("myplug", None)


def test_plugin_model_objective_dataset_sync_equals_simultaneous(plug, tmp_path):
    ref = decoupled.train(None, overrides=SETS, out=tmp_path / "ref")
    assert ref["model"] == "myplug:build" and len(ref["layers"]) == 3
    assert ref["layers"][-1]["test_acc"] > 0.5  # separable blobs: it learns
    assert ref["plugins"]["model.name"]["file"] == str(plug / "myplug.py") and ref["plugins"]["model.name"]["sha256"]
    dist = tmp_path / "sync"
    check(torchrun(2, ["--out", str(dist), *[a for s in SETS + ["train.mode=sync"] for a in ("--set", s)]]))
    assert_same_states(tmp_path / "ref", dist, 2, 1)
    assert_same_results(ref, summary(dist))


def test_entry_point_names(plug):
    cfg = load(None, ["model.name=mynet", "objective.name=smoothed", "data.name=blobs", "data.args.dim=6"])
    from decoupled.data import build_data
    data = build_data(cfg.data, 0)
    assert data.input_shape == (6,) and data.num_classes == 4
    built = build_model(cfg.model, data.input_shape, data.num_classes)
    assert len(built.blocks) == 3 and built.shapes[-1] == (16,)


def test_entry_point_table_is_looked_up(monkeypatch, plug):
    """The lookup goes through plugins.entry_points: a package registering a name makes it valid."""
    from importlib.metadata import EntryPoint
    from decoupled import plugins
    table = {"othernet": EntryPoint("othernet", "myplug:build", "decoupled.models")}
    monkeypatch.setattr(plugins, "entry_points", lambda group: table if group == "decoupled.models" else {})
    assert load(None, ["model.name=othernet"]).model.name == "othernet"
    with pytest.raises(ConfigError, match="model.name='mynet' is not valid"):
        load(None, ["model.name=mynet"])  # the dist-info's names are not in the patched table


@pytest.mark.parametrize("key,value,message", [
    ("model.name", "no_such_module_xyz:build", r"model.name='no_such_module_xyz:build': cannot import module "
                                                r"'no_such_module_xyz' \(ModuleNotFoundError"),
    ("model.name", "myplug:nope", r"model.name='myplug:nope': .*myplug.py has no attribute 'nope'"),
    ("model.name", "myplug:wrong_build", r"model.name='myplug:wrong_build': wrong_build\(cfg, input_shape\) "
                                         r"cannot be called as build\(cfg, input_shape, num_classes\)"),
    ("objective.name", "myplug:NotAnObjective", r"objective.name='myplug:NotAnObjective' is .*not a subclass of "
                                                r"decoupled.objectives.Objective"),
    ("data.name", "myplug:build", r"data.name='myplug:build': build\(cfg, input_shape, num_classes\) cannot be "
                                  r"called as load\(cfg, seed\)"),
    ("model.name", "torchvision:no_such_net", r"torchvision has no classification model 'no_such_net'"),
])
def test_bad_plugins_fail_at_config_load(plug, key, value, message):
    with pytest.raises(ConfigError, match=message):
        load(None, [f"{key}={value}"])


def test_bad_plugin_fails_before_any_rank_trains(plug, tmp_path):
    p = torchrun(2, ["--out", str(tmp_path / "bad"), "--set", "train.mode=sync", "--set", "model.name=myplug:nope"])
    assert p.returncode != 0 and "has no attribute 'nope'" in p.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_args_tables_round_trip_and_apply(plug):
    from decoupled.config import to_toml
    from decoupled.models import PluginConfig
    cfg = load(None, SETS)
    assert type(cfg.model) is PluginConfig and cfg.model.args == {"width": 16} and cfg.data.args == {"dim": 12}
    again = load(None, [])
    import tomllib
    doc = tomllib.loads(to_toml(cfg))
    assert load(doc) == cfg and again.data.args == {}
    with pytest.raises(ConfigError, match="unknown key model.args.width .*model.name='mlp'"):
        load(None, ["model.args.width=3"])  # the mlp reads no table
    with pytest.raises(ConfigError, match="data.args=.* does nothing here: it applies to a dataset plug-in"):
        load(None, ["data.args.dim=3"])


def test_objective_plugins_carry_their_config(plug):
    from decoupled.objectives import ObjectiveConfig
    cfg = load(None, ["objective.name=myplug:Smoothed", "objective.smoothing=0.2"])
    assert type(cfg.objective).__qualname__ == "Smoothed.Config" and cfg.objective.smoothing == 0.2
    assert type(load(None, ["objective.name=myplug:Plain", "objective.k=2"]).objective) is ObjectiveConfig
    with pytest.raises(ConfigError, match="objective.smoothing=1.5 must be < 1.0"):
        load(None, ["objective.name=myplug:Smoothed", "objective.smoothing=1.5"])
    with pytest.raises(ConfigError, match="unknown key objective.smoothing"):
        load(None, ["objective.smoothing=0.2"])  # khidden has no such key


def test_load_config_api(tmp_path):
    cfg = decoupled.load_config({"model": {"name": "vgg", "hierarchy": [1, 1]}}, overrides={"train.epochs": 2})
    assert cfg.model.name == "vgg" and cfg.train.epochs == 2
    with pytest.raises(ConfigError, match="model.hierarchy"):
        decoupled.load_config({"model": {"name": "vgg", "hierarchy": "x"}})


def test_ranks_importing_different_code_are_refused():
    from decoupled.plugins import PluginError, check_same_code
    a = {"model.name": {"name": "m:build", "file": "/a/m.py", "sha256": "1"}}
    check_same_code([a, dict(a)])
    with pytest.raises(PluginError, match="model.name: rank 0 imports .* but rank 1 imports"):
        check_same_code([a, {"model.name": {**a["model.name"], "sha256": "2"}}])


def _readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of the example in docs/plugins.md (the README links it), in order."""
    import re
    from torchrun_utils import REPO
    text = (REPO / "docs" / "plugins.md").read_text()
    section = text.split("## Example: a plug-in model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


@pytest.mark.torchrun  # the guide's command launches 2 ranks (--nproc-per-node inside its text)
@pytest.mark.slow
def test_guide_plugin_example_runs_as_written(tmp_path):
    """The guide's plug-in module, its Python call and its 2-rank command, run as written in a fresh
    folder (the repository on PYTHONPATH, as an installed package would be)."""
    import json
    import os
    import subprocess
    from torchrun_utils import REPO, env
    (lang1, module), (lang2, script), (lang3, command) = _readme_blocks()
    assert (lang1, lang2, lang3) == ("python", "python", "bash") and module.startswith("# mynet.py")
    (tmp_path / "mynet.py").write_text(module)
    (tmp_path / "example.py").write_text(script)
    bin_dir = os.path.dirname(sys.executable)  # this environment's `decoupled` console script
    e = {**env(), "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(var, None)
    p = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=e, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    accs = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(accs) == 3 and all(0 <= a <= 1 for a in accs)
    p = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(tmp_path / "runs" / "mynet-sync")
    assert s["mode"] == "sync" and s["world_size"] == 2 and s["model"] == "mynet:build"
    assert s["plugins"]["model.name"]["file"] == str(tmp_path / "mynet.py")
