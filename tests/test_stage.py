"""The stage is mechanism: its collaborators are injected by engine/build.py, the one reader of the job
config for stages; the stage and its collaborators never import the config."""
import ast
from pathlib import Path

import pytest
import torch

from decoupled.job import load
from decoupled.engine.build import build_stages
from decoupled.engine.stage import Stage
from decoupled.engine.stepping import Accumulate, AllReduce, Plain

ENGINE = Path(__file__).resolve().parents[1] / "decoupled" / "engine"


@pytest.mark.parametrize("name", ["stage", "precision", "stepping", "stats", "flow"])
def test_the_stage_and_its_collaborators_never_import_the_config(name):
    tree = ast.parse((ENGINE / f"{name}.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] in ("config", "job") for m in imported), imported


def test_a_stage_is_built_by_keyword_only():
    with pytest.raises(TypeError):
        Stage(0, torch.nn.Identity())


@pytest.mark.parametrize("replication,kind,slots", [(None, Plain, (0,)),
                                                    (lambda n: ({j: 2 for j in range(n)}, None), Accumulate, (0, 1)),
                                                    (lambda n: ({j: 2 for j in range(n)}, 1), AllReduce, (1,))])
def test_the_builder_picks_the_stepper_and_its_rng_slots(replication, kind, slots):
    cfg = load(None, ["model.widths=[16,16]", "optim.block_lr_decay=0.5"])
    stages = build_stages(cfg, (1, 8, 8), 10, torch.device("cpu"), replication=replication)
    assert all(type(s.stepper) is kind and tuple(s.rngs) == slots for s in stages)
    assert [s.optimizer.param_groups[0]["lr"] for s in stages] == [cfg.optim.lr * 0.5 ** j for j in range(len(stages))]
