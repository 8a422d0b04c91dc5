"""Honest knobs: every key of the schema acts on the job, or is refused where it does not apply
(another mode's keys: a notice on stderr). A key is "set" when it differs from the dataclass default.
A plug-in's own keys (those not every plug-in of its section has) are refused by construction: the
chosen plug-in's Config does not have them."""
import dataclasses

import pytest

from decoupled.config.applies import APPLIES
from decoupled.job import CHOICES, ConfigError, JobConfig, load
from decoupled.modes import MODE_KEYS

# Keys that act on every job (audited: each is read by every mode / model / objective).
ALWAYS = {"data.name", "data.batch_size", "data.eval_batch_size", "data.limit_train", "data.limit_test",
          "data.augment", "data.val_fraction", "model.name", "model.activation", "model.block_sizes",
          "objective.name", "objective.head",
          "objective.exit_fallback", "train.mode", "train.epochs", "train.seed", "train.device",
          "train.log_every", "train.eval_every", "train.checkpoint", "train.patience", "train.plateau_factor",
          "train.precision", "train.check_every", "train.quiet", "log.tensorboard",
          "optim.name", "optim.lr", "optim.weight_decay", "optim.schedule", "optim.block_lr_decay"}

# (a non-default value, a job where the key does nothing) for every CHOICE rule
REFUSED = {
    "data.root": ("x", []), "data.download": ("true", []),
    "data.synthetic_shape": ("[1, 4, 4]", []), "data.synthetic_classes": ("3", []),
    "data.synthetic_train": ("10", []), "data.synthetic_test": ("10", []),
    "model.widths": ("[4]", ["model.name=vgg"]), "model.hierarchy": ("[1]", []),
    "model.channels": ("[8]", ["model.name=resnet"]), "model.width": ("8", []),
    "model.blocks": ("2", ["model.block_sizes=[1,2]"]), "model.residual": ('"bottleneck"', ["model.name=vgg"]),
    "model.batchnorm": ("false", ["model.name=resnet"]), "model.dropout": ("0.1", ["model.name=simcnn"]),
    "model.dropout_position": ('"in-block"', []), "model.stem_downsample": ("true", ["model.name=vgg"]),
    "objective.k": ("2", ["objective.name=cascade"]), "objective.aux_width": ("64", []),
    "objective.head_batchnorm": ("false", ["objective.k=2"]),
    "objective.cascade_initial_epochs": ("2", ["objective.name=khidden"]),
    "objective.cascade_epoch_increment": ("2", ["objective.name=khidden"]),
    "objective.predsim_beta": ("0.5", []), "objective.quicknet_threshold": ("0.5", []),
    "objective.commit_hidden": ("4", []), "objective.quicknet_balance": ('"none"', []),
    "optim.momentum": ("0.5", ["optim.name=adam"]), "optim.nesterov": ("true", ["optim.name=adam"]),
    "optim.step_epochs": ("3", []), "optim.gamma": ("0.5", []), "optim.milestones": ("[0.5]", []),
    "train.keep_checkpoints": ("1", ["train.checkpoint=false"]),
    "train.plateau_patience": ("2", ["train.mode=e2e"]),
    "dist.max_stage_mem_mb": ("100", ["train.mode=sync"]),
    "dist.link_mbps": ("100", ["train.mode=sync"]),
    "dist.sync_bn": ("true", ["train.mode=sync"]),
    "dist.replica_batch": ('"split"', ["train.mode=sync"]),
    "dist.allreduce_bucket_mb": ("1.0", ["train.mode=sync"]),
    "train.eval_subset": ("100", []), "train.eval_every_steps": ("5", ["train.mode=sequential"]),
    "model.patch_size": ("2", []), "model.depth": ("2", ["model.name=vgg"]), "model.heads": ("2", []),
    "model.mlp_ratio": ("4.0", []), "data.args": ("{dim = 3}", []),
    "objective.token_pool": ('"mean"', ["model.name=resnet"]),
}


def _keys() -> dict[str, dataclasses.Field]:
    """Every key of every section, every plug-in's keys included."""
    keys = {}
    for s in dataclasses.fields(JobConfig):
        for cls in CHOICES.get(s.name, {}).values() or [type(getattr(JobConfig(), s.name))]:
            keys.update({f"{s.name}.{f.name}": f for f in dataclasses.fields(cls)})
    return keys


def _own_keys() -> set[str]:
    """The keys some but not all plug-ins of a section have."""
    return {f"{section}.{key}" for section, options in CHOICES.items()
            for key in {f.name for cls in options.values() for f in dataclasses.fields(cls)}
            if not all(key in {f.name for f in dataclasses.fields(cls)} for cls in options.values())}


def test_every_key_is_audited():
    declared = {k for k, f in _keys().items() if "acts" in f.metadata}  # knob(acts=...) on the plug-in's field
    # sync_bn and eval_every_steps: refused by modes.Mode.check (a distributed mode's key; one a greedy
    # mode cannot honour); data.args: by job.validate (it needs the dataset registry)
    rules = set(APPLIES) | {"dist.sync_bn", "train.eval_every_steps", "data.args"} | declared | _own_keys()
    modes = MODE_KEYS
    for key in _keys():
        assert (key in ALWAYS) + (key in rules) + (key in modes) == 1, f"{key}: audit it (ALWAYS or APPLIES)"
    assert set(REFUSED) == rules


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_key_refused_where_it_does_nothing(key):
    value, context = REFUSED[key]
    with pytest.raises(ConfigError) as e:
        load(None, context + [f"{key}={value}"])
    assert key in str(e.value) and "applies to" in str(e.value)


@pytest.mark.parametrize("key", sorted(MODE_KEYS))
def test_other_mode_keys_are_a_notice(key, capsys):
    default = getattr(getattr(JobConfig(), key.split(".")[0]), key.split(".")[1])
    named = {"train.cache": '"disk"', "dist.backend": '"gloo"', "dist.placement": "[1, 2]", "replay.policy": '"random"',
             "dist.replicas": "[2, 1]",
             "replay.budget": '"upstream"', "dist.wire_dtype": '"bfloat16"',
             "train.e2e_loss": '"local"', "train.activation_checkpointing": "true"}
    value = named[key] if key in named else repr(default + 1)
    # wire_dtype acts at simultaneous' block boundaries; simultaneous accumulates over dist.replicas
    mode = "e2e" if key in ("dist.wire_dtype", "dist.replicas") else "simultaneous"
    load(None, [f"train.mode={mode}", f"{key}={value}"])
    assert key in capsys.readouterr().err


def test_keys_act_where_they_apply():
    """Where a key applies it changes what is built (spot checks of each kind of rule)."""
    from decoupled.models import build_model
    a = load(None, ["model.batchnorm=true"])  # "on"; "auto" is off for the mlp
    assert str(build_model(a.model, (1, 8, 8), 10).network) != str(build_model(JobConfig().model, (1, 8, 8),
                                                                               10).network)
    load(None, ["objective.name=cascade", "objective.aux_width=64", "objective.cascade_epoch_increment=2"])
    load(None, ["model.name=vgg", "model.widths=[150, 150, 150]"])  # the default value is never "set"
