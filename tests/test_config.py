"""Config: defaults, TOML + --set, every error names its field, round trip, model errors via train."""
import dataclasses
from pathlib import Path

import pytest

from decoupled import job as C
from decoupled.data import LOADERS
from decoupled.job import ConfigError, JobConfig, choose, load, to_toml


def _write(tmp_path, text, name="job.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_load():
    cfg = load()
    assert cfg == JobConfig()
    assert cfg.data.name == "digits" and cfg.model.name == "mlp" and cfg.train.mode == "simultaneous"
    C.validate(JobConfig())  # the defaults are valid


def test_toml_file_and_set_overrides(tmp_path):
    p = _write(tmp_path, """
[train]
epochs = 2
seed = 7
[model]
widths = [8, 8]
[optim]
lr = 0.1
""")
    cfg = load(p, ["model.widths=[4, 5, 6]", "data.augment=true", "optim.lr=1", "optim.schedule=cosine",
                   "train.cache=recompute", "objective.name=predsim", "objective.predsim_beta = 0.5"])
    assert cfg.train.epochs == 2 and cfg.train.seed == 7  # from the file
    assert cfg.model.widths == [4, 5, 6]  # list: --set wins over the file
    assert cfg.data.augment == "auto"  # TOML true: the dataset's own augmentation
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float  # int accepted for a float field
    assert cfg.optim.schedule == "cosine"  # bare word taken as a string
    assert cfg.train.cache == "recompute"
    assert cfg.objective.predsim_beta == 0.5  # spaces around '=' are fine
    # untouched fields keep their defaults
    assert cfg.data.batch_size == JobConfig().data.batch_size


def test_toml_int_for_float_field(tmp_path):
    cfg = load(_write(tmp_path, "[optim]\nlr = 2\nmomentum = 0\n"))
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.momentum == 0.0 and isinstance(cfg.optim.momentum, float)


def test_quoted_string_override():
    assert load(None, ['data.name="synthetic"']).data.name == "synthetic"


@pytest.mark.parametrize("source", ["set", "file"])
def test_unknown_section_lists_valid(tmp_path, source):
    with pytest.raises(ConfigError) as e:
        if source == "set":
            load(None, ["trian.epochs=1"])
        else:
            load(_write(tmp_path, "[trian]\nepochs = 1\n"))
    msg = str(e.value)
    assert "trian" in msg
    for section in ("data", "model", "objective", "train", "optim"):
        assert section in msg


@pytest.mark.parametrize("source", ["set", "file"])
def test_unknown_key_lists_valid(tmp_path, source):
    with pytest.raises(ConfigError) as e:
        if source == "set":
            load(None, ["train.epoch=1"])
        else:
            load(_write(tmp_path, "[train]\nepoch = 1\n"))
    msg = str(e.value)
    assert "train.epoch" in msg
    for key in ("epochs", "seed", "mode", "cache"):
        assert key in msg


def test_top_level_key_is_error(tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        load(_write(tmp_path, "epochs = 3\n"))


def test_missing_config_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(_write(tmp_path, "[train\nepochs = 1\n"))


@pytest.mark.parametrize("item", ["datanamemnist", "train.epochs", "epochs=3"])
def test_malformed_set(item):
    with pytest.raises(ConfigError, match="section.key=value"):
        load(None, [item])


@pytest.mark.parametrize("override,field", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.epochs=true", "train.epochs"),  # a bool is not an int
    ("data.augment=1", "data.augment"),
    ("optim.lr=true", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("model.widths=5", "model.widths"),
    ("model.widths=[1, 2.5]", "model.widths"),
    ("data.name=3", "data.name"),
])
def test_wrong_type_names_field(override, field):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    assert field in str(e.value)


def test_wrong_type_in_file_names_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load(_write(tmp_path, '[data]\nbatch_size = "64"\n'))


@pytest.mark.parametrize("override,field", [
    ("data.name=imagenet", "data.name"),
    ("model.name=transformer", "model.name"),
    ("objective.name=hinge", "objective.name"),
    ("objective.head=big", "objective.head"),
    ("train.mode=pipeline", "train.mode"),
    ("train.device=tpu", "train.device"),
    ("train.cache=ram", "train.cache"),
    ("optim.name=lbfgs", "optim.name"),
    ("optim.schedule=linear", "optim.schedule"),
    ("model.residual=wide", "model.residual"),
])
def test_enumerations_name_field(override, field):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    assert field in str(e.value)


def test_enumeration_error_lists_choices():
    with pytest.raises(ConfigError) as e:
        load(None, ["data.name=imagenet"])
    for name in LOADERS:  # the data registry owns the names
        assert name in str(e.value)


@pytest.mark.parametrize("override,field", [
    ("data.batch_size=0", "data.batch_size"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=-1", "train.epochs"),
    ("optim.lr=0", "optim.lr"),
    ("model.widths=[]", "model.widths"),
    ("model.widths=[8, 0]", "model.widths"),
    ("model.dropout=1.0", "model.dropout"),
    ("objective.k=0", "objective.k"),
    ("objective.predsim_beta=1.5", "objective.predsim_beta"),
    ("data.synthetic_shape=[2, 8]", "data.synthetic_shape"),
])
def test_out_of_range_names_field(override, field):
    overrides = [override] + (["data.name=synthetic"] if override.startswith("data.synthetic") else [])
    with pytest.raises(ConfigError) as e:
        load(None, overrides)
    assert field in str(e.value)


def test_head_objective_mismatch():
    with pytest.raises(ConfigError, match=r"objective\.head"):
        load(None, ["objective.head=predsim"])  # khidden objective with the predsim head
    with pytest.raises(ConfigError, match=r"objective\.head"):
        load(None, ["objective.name=predsim", "objective.head=khidden"])
    assert load(None, ["objective.name=predsim", "objective.head=predsim"]).objective.head == "predsim"


def test_augment_with_frozen_cache_is_error():
    with pytest.raises(ConfigError, match=r"train\.cache"):
        load(None, ["data.augment=true", "train.cache=memory"])
    load(None, ["data.augment=true", "train.cache=recompute"])


def test_missing_dataset_root(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(None, ["data.name=mnist", f"data.root={tmp_path / 'no-such-folder'}"])
    assert "data.root" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load(None, ["data.name=mnist"])  # empty root
    assert "data.root" in str(e.value)
    # an existing folder passes validation (loading it is the data module's business)
    assert load(None, ["data.name=mnist", f"data.root={tmp_path}"]).data.root == str(tmp_path)


def test_to_toml_round_trip(tmp_path):
    cfg = JobConfig()
    cfg.data.name = "mnist"
    cfg.data.root = str(tmp_path / 'odd "quoted" \\ path')  # exercises string escaping
    (tmp_path / 'odd "quoted" \\ path').mkdir()
    cfg.model.widths = [7, 9]
    cfg.model.block_sizes = [1, 1]
    cfg.objective = choose("objective", "predsim", predsim_beta=0.25)
    cfg.train.epochs = 3
    cfg.train.checkpoint = False
    cfg.optim.lr = 1e-5
    cfg.optim.weight_decay = 5e-4
    C.validate(cfg)
    back = load(_write(tmp_path, to_toml(cfg)))
    assert back == cfg
    assert load(_write(tmp_path, to_toml(JobConfig()), "d.toml")) == JobConfig()
    assert C.to_dict(back) == dataclasses.asdict(cfg)


def test_bad_hierarchy_through_train(tmp_path):
    from decoupled.run_job import train
    cfg = load(None, ["model.name=vgg", "model.hierarchy=[1,1,1,1,1]", "model.width=4", "train.epochs=1"])
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(cfg, out)
    assert "model.hierarchy" in str(e.value)
    # refused before any training output
    assert not (out / "summary.json").exists()
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()


def test_launch_configs_load(tmp_path):
    """The configs shipped in launch/configs are valid; digits_default.toml is the default job."""
    from pathlib import Path
    folder = Path(__file__).resolve().parents[1] / "launch" / "configs"
    assert load(folder / "digits_default.toml") == JobConfig()
    for name in ("mnist_mlp_khidden", "mnist_mlp_cascade", "mnist_mlp_e2e"):
        # data.root is relative to the repository root; point it at any folder so the test runs anywhere
        cfg = load(folder / f"{name}.toml", [f"data.root={tmp_path}"])
        assert cfg.data.name == "mnist" and cfg.model.widths == [150, 150, 150], name


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "launch" /
                                                        "configs").glob("*.toml")))
def test_every_launch_config_loads(tmp_path, name):
    """Every shipped config loads (each plug-in section holds its chosen plug-in's keys) and writes
    back to an equal job; data.root points at any folder so the test runs anywhere."""
    path = Path(__file__).resolve().parents[1] / "launch" / "configs" / f"{name}.toml"
    cfg = load(path, [f"data.root={tmp_path}"] if load(path, validate_now=False).data.name not in
               ("digits", "synthetic") else [])
    assert load(_write(tmp_path, to_toml(cfg), "back.toml")) == cfg


def test_plugin_keys_live_on_the_chosen_plugin(tmp_path):
    """A key the chosen plug-in does not have names the plug-ins that have it and the keys it has."""
    with pytest.raises(ConfigError) as e:
        load(None, ["objective.cascade_initial_epochs=3"])
    msg = str(e.value)
    assert "objective.name='cascade'" in msg and "valid keys of [objective]" in msg and "aux_width" in msg
    with pytest.raises(ConfigError, match=r"unknown key model\.nesting.*widths"):  # (model.depth is the vit's)
        load(None, ["model.nesting=3"])
    cfg = load(None, ["objective.name=cascade", "objective.cascade_initial_epochs=3", "optim.name=adamw"])
    assert type(cfg.objective).__qualname__ == "Cascade.Config" and cfg.objective.cascade_initial_epochs == 3
    assert cfg.optim.name == "adamw" and not hasattr(cfg.optim, "momentum")
    old_run = to_toml(JobConfig()).replace("[model]\n", "[model]\nhierarchy = [1, 1, 2, 2]\n")  # another plug-in's
    # default (a run directory's config.toml from before the split lists every key): harmless
    assert load(_write(tmp_path, old_run)) == JobConfig()


def test_typed_placement_and_replicas():
    assert load(None, ["dist.placement=auto", "train.mode=sync"]).dist.placement == "auto"
    assert load(None, ["dist.replicas=[2, 1]", "dist.placement=[1, 2]", "train.mode=sync"]).dist.replicas == [2, 1]
    for bad in ("dist.placement=fast", "dist.replicas=3", "dist.placement=[0, 1]"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load(None, [bad, "train.mode=sync"])


def test_section_must_hold_its_plugins_config():
    cfg = JobConfig()
    cfg.model.name = "vgg"  # the mlp's settings renamed: refused, with the fix
    with pytest.raises(ConfigError, match=r"model\.name='vgg'.*choose"):
        C.validate(cfg)
    cfg.model = choose("model", "vgg", width=8)
    C.validate(cfg)


def test_a_later_override_decides_whether_a_plugin_key_is_set():
    """A shared override list may set another plug-in's key and a later --set put it back to its
    default: only the final value counts (it is still type-checked as given)."""
    load(None, ["model.widths=[32,32,32]", "model.name=simcnn", "model.width=4", "model.widths=[150,150,150]"])
    with pytest.raises(ConfigError, match=r"model\.widths"):
        load(None, ["model.widths=[32,32,32]", "model.name=simcnn"])
    with pytest.raises(ConfigError, match=r"model\.widths"):
        load(None, ["model.widths=big", "model.name=simcnn", "model.widths=[150,150,150]"])
