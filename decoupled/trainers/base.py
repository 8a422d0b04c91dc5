"""A trainer is one train.mode: its declaration (modes.py: capabilities as class attributes, the keys
it reads, its rules on the job), its loop (`train`), its epoch policy (`after_epoch`) and the run's
epilogue (`finish`), which every trainer shares. TRAINERS (trainers/__init__.py) maps train.mode
to the class.

The base class runs in one process (WORLD_SIZE=1); decoupled.py's trainers run on torchrun ranks.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .. import exits, summary as S
from ..job import ConfigError, JobConfig
from ..data import build_data
from ..device import resolve_device, synchronize
from ..engine.evaluate import evaluate
from ..engine.build import build_rank_stages
from ..engine.run import Run, prepare_run_dir
from ..memory import ExactMemory
from ..metrics import PeakMemory, Recorder
from ..modes import Mode
from .epoch_policy import EarlyStopping


def default_out() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


class Trainer(Mode):
    """A concrete trainer is `class X(modes.X, Trainer)`: its declaration first, so its capabilities win."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.rules: dict[str, EarlyStopping] = {}  # the epoch policy of each watched optimizer, by key
        self.loaded: dict[str, dict] = {}  # rules' state from a checkpoint, applied as each is watched

    # ------------------------------------------------------------------ the run
    def run(self, out: Path | None, resume: bool | str) -> dict | None:
        """Build the job in this process, train it, and return its summary."""
        t_start = time.perf_counter()
        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != 1:
            raise ConfigError(f"train.mode={cfg.train.mode!r} runs in one process but WORLD_SIZE={world}; "
                              "use train.mode='sync' or 'async' for several ranks, or --nproc-per-node=1")
        device = resolve_device(cfg.train.device)
        out = out or default_out()
        torch.manual_seed(cfg.train.seed)
        data = build_data(cfg.data, cfg.train.seed)
        stages = build_rank_stages(cfg, data.input_shape, data.num_classes, device,
                                   replication=self.replication(), class_counts=data.class_counts)
        prepare_run_dir(cfg, out, resume)
        run = Run(cfg, data, stages, device, out, Recorder(out / "metrics.jsonl"), policy=self)
        start = _resume_single(run, resume, out) if resume else 0
        return self.execute(run, start, t_start)

    def replication(self):
        """build_stages' `replication` (dist.replicas); None: one replica per block."""
        return None

    def train(self, run: Run, start_epoch: int = 0) -> None:
        """The loop: the order of work (the stages train, the Run logs, evaluates and checkpoints)."""
        raise NotImplementedError(f"{type(self).__name__} has no loop")

    def execute(self, run: Run, start: int, t_start: float) -> dict | None:
        """Train from epoch `start`, timed, with the peak memory measured; then the epilogue."""
        memory = PeakMemory(run.device)  # after the model and data exist: measure what training costs
        run.memory = run.live.memory = memory
        run.live.start(run.stages)
        run.recorder.log(kind="train_start", rank=self.rank())  # the bench's curves count training time from here
        t0 = time.perf_counter()
        with ExactMemory([p for s in run.stages for p in s.parameters()], run.device, self.held(),
                         allocator_peak=memory.peak_bytes) as exact:
            self.train(run, start)
            synchronize(run.device)
        return self.finish(run, memory, time.perf_counter() - t0, t_start, exact.report())

    def rank(self) -> int:
        return 0

    def held(self):
        """What besides the stages holds training tensors (memory.ExactMemory's `held`): nothing here."""
        return None

    def finish(self, run: Run, memory: PeakMemory, train_s: float, t_start: float, exact: dict) -> dict | None:
        """The run's epilogue: score the blocks, count their FLOPs, report (the summary, returned
        where it is written) and close the run's files."""
        layers = self.score(run)
        costs = S.costs(self.cfg, run.stages, layers, self.end_to_end)
        summary = self.report(run, layers, costs, memory, train_s, t_start, exact)
        run.recorder.close()
        run.live.close()
        return summary

    def score(self, run: Run) -> list[dict]:
        """summary.json layers[]: test accuracy, and on the validation split when there is one
        (reported only: no decision is taken on it after training)."""
        ev = run.evaluate()
        val_acc = None
        if run.data.val is not None:
            with run.evaluating():
                vev = evaluate(run.stages, run.data.val, self.cfg.data.eval_batch_size, run.device)
            val_acc = {s.index: a for s, a in zip(run.stages, vev["layer_acc"])}
        return S.layers(run.stages, {s.index: a for s, a in zip(run.stages, ev["layer_acc"])}, val_acc)

    def report(self, run: Run, layers: list[dict], costs: dict, memory: PeakMemory, train_s: float,
               t_start: float, exact: dict) -> dict | None:
        cfg = self.cfg
        if exits.wanted(cfg):
            with run.evaluating():
                costs.update(S.exit_curve(cfg, run.stages, run.data.test, run.device, run.out, layers))
        summary = S.write(cfg, run.out, 1, run.device, t_start, layers, run.evaluate()["ensemble_acc"],
                          [S.rank_report(0, run.stages, memory, train_s, exact)], **costs)
        run.recorder.log(kind="summary", wall_s=summary["wall_s"], ensemble_test_acc=summary["ensemble_test_acc"])
        return summary

    # ------------------------------------------------------------------ the epoch policy
    def watch(self, key: str, optimizer: torch.optim.Optimizer, scheduler=None) -> None:
        """Put an optimizer (and the LR schedule stepped when no plateau rule owns its LR) under the
        epoch policy as `key`: a block's, the e2e network's, a commitment head's."""
        rule = self.rules[key] = EarlyStopping(optimizer, self.cfg.train, scheduler)
        if key in self.loaded:
            rule.load_state_dict(self.loaded.pop(key))

    def after_epoch(self, key: str, loss: Callable[[], float]) -> bool:
        """After an epoch of `key`: the plateau rule steps on the monitored loss (read only when a
        rule watches it; it may cost a validation pass), else the LR schedule steps; True = stop
        it now (early stopping)."""
        return self.rules[key].after_epoch(loss)

    def state_dict(self) -> dict:
        return {k: r.state_dict() for k, r in self.rules.items()}

    def load_state_dict(self, sd: dict) -> None:
        self.loaded.update(sd)
        for key in list(self.loaded):
            if key in self.rules:
                self.rules[key].load_state_dict(self.loaded.pop(key))


def _resume_single(run: Run, resume: bool | str, out: Path) -> int:
    """The newest checkpoint that loads; one that does not is reported by name and skipped."""
    for epoch in reversed(run.checkpointer.epochs()):
        state, why = run.checkpointer.try_load(epoch, map_location=run.device)
        if state is not None:
            run.load_state(state)
            return epoch + 1
        print(f"decoupled: {why}; trying an older epoch", file=sys.stderr, flush=True)
    if resume != "auto":
        raise ConfigError(f"--resume {out}: no checkpoint to resume from in {out / 'checkpoints'}")
    return 0
