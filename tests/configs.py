"""Named tiny configs shared by the test files: dicts of `section.key` overrides, which
torchrun_utils.overrides / sets turn into load() arguments or --set flags. Configs that resolve to the
same job are one job for shared_run / shared_reference (conftest.py), so sharing a name shares the run."""
from __future__ import annotations

# The tests' common 2-3 rank job: 300 / 32 = 10 batches an epoch, 3 blocks, dropout (per-block RNG streams)
MLP = {"data.limit_train": 300, "model.widths": [24, 24, 24], "model.dropout": 0.1, "train.epochs": 2,
       "data.batch_size": 32}

# The same job without dropout (the fault tests' job)
MLP_PLAIN = {k: v for k, v in MLP.items() if k != "model.dropout"}

# conv + batch norm + dropout, cascade budgets 1, 2, 3 epochs: frozen blocks and BN buffers; 200 / 32 = 7
# batches an epoch, so a replica pads the last round of every epoch
VGG_CASCADE = {"data.limit_train": 200, "model.name": "vgg", "model.hierarchy": [1, 1, 1], "model.width": 4,
               "model.dropout": 0.1, "objective.name": "cascade", "objective.aux_width": 16, "data.batch_size": 32}

# MLP with evaluations inside its epochs (train.eval_every_steps): after source steps 3, 6, 9 | 12, 15, 18
# of its 10-batch epochs, on the first 100 test samples
MLP_EVAL_STEPS = {**MLP, "train.eval_every_steps": 3, "train.eval_subset": 100}
