"""The state a training loop works on, and what hangs off it: metrics, evaluation, checkpoints.

The trainers' loops (trainers/) only decide the order of work; they call `log_step` and `end_epoch`
here and never touch files themselves.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpointer
from ..job import JobConfig, to_toml
from ..data import Data, num_batches
from ..device import accel, synchronize
from ..live import Live
from ..metrics import PeakMemory, Recorder, progress
from .evaluate import evaluate, evaluates_at, mid_epoch_test
from .stage import Stage


@dataclass
class Run:
    cfg: JobConfig
    data: Data | None  # only rank 0 reads the dataset
    stages: list[Stage]
    device: torch.device
    out: Path | None
    recorder: Recorder
    rank: int = 0
    distributed: bool = False  # a torchrun rank (its lines say which)
    last_eval: dict = field(default_factory=dict)
    eval_fresh: bool = False  # last_eval still describes the current weights
    # the trainer, whose epoch policy (plateau rules, early stopping) is checkpointed with the stages:
    # state_dict() / load_state_dict() (trainers/base.py); None: no policy state (the torchrun ranks)
    policy: Any = None
    memory: PeakMemory | None = None  # the process's peak meter, once training starts (trainers/base.py)

    def __post_init__(self):
        t = self.cfg.train
        self.checkpointer = Checkpointer(self.out, self.rank, t.checkpoint, t.keep_checkpoints)
        self.live = Live(self.cfg, self.out, self.rank, self.distributed)  # epoch lines, TensorBoard
        # train.eval_every_steps: the test subset, checked against the test set before anything trains
        self.mid_test = mid_epoch_test(self.data.test, t) if t.eval_every_steps and self.data is not None else None

    def to_device(self, *tensors):
        """Host batches to the device. On CUDA from pinned memory, so the copy is truly asynchronous
        (non_blocking from pageable memory is a synchronous copy); a no-op on CPU."""
        return accel(self.device).upload(*tensors)

    def progress(self, total: int, desc: str):
        bar = progress(total, desc, postfix=self.live.bar_text)
        self.live.bar = None if bar.disable else bar  # a terminal: the bar shows the current losses
        return bar

    def log_step(self, epoch: int, stage: Stage, res, y: torch.Tensor) -> None:
        self.eval_fresh = False
        self.live.add_loss(stage.index, res.loss)  # summed on the device, read at the epoch end
        if stage.stats.steps % self.cfg.train.log_every == 0:
            self.recorder.log(kind="step", epoch=epoch, block=stage.index, step=stage.stats.steps,
                              loss=float(res.loss.detach()), train_acc=float((res.pred == y).float().mean()),
                              samples=stage.stats.samples)

    def evaluating(self):
        """Around every evaluation: its peak memory apart from training's (metrics.PeakMemory.evaluating)."""
        return self.memory.evaluating() if self.memory is not None else nullcontext()

    def memory_phase(self, phase: str) -> None:
        """A rank's messages set the phase one by one (metrics.PeakMemory.enter): a restart only where
        evaluation and training meet, not per batch."""
        if self.memory is not None:
            self.memory.enter(phase)

    def evaluate(self) -> dict:
        if not self.eval_fresh:
            with self.evaluating():
                self.last_eval = evaluate(self.stages, self.data.test, self.cfg.data.eval_batch_size, self.device)
            self.eval_fresh = True
        return self.last_eval

    def after_source_step(self, epoch: int, count: int) -> None:
        """A single-process loop after its `count`-th batch (across epochs): a mid-epoch evaluation
        where train.eval_every_steps says (Note [mid-epoch evaluation]), on train.eval_subset. Its
        `step_eval` record stamps the end of the training before it (`train_end_s`, after a device
        sync) and, as every record, its own end (`time_s`): the bench cuts the time between out."""
        if self.mid_test is None or not evaluates_at(self.cfg.train, count, self.steps_per_epoch):
            return
        synchronize(self.device)
        train_end = time.perf_counter() - self.recorder.t0
        with self.evaluating():
            ev = evaluate(self.stages, self.mid_test, self.cfg.data.eval_batch_size, self.device)
        self.recorder.log(kind="step_eval", epoch=epoch, step=count, train_end_s=round(train_end, 4),
                          tested=len(self.mid_test), test_acc=ev["layer_acc"], ensemble_test_acc=ev["ensemble_acc"])

    @property
    def steps_per_epoch(self) -> int:
        return num_batches(len(self.data.train), self.cfg.data.batch_size)

    def end_epoch(self, epoch: int, block: int | None = None) -> None:
        """Evaluate, log and checkpoint after `epoch` (0-based; of `block` in sequential mode)."""
        every = self.cfg.train.eval_every
        ev = None
        if every and (epoch + 1) % every == 0:
            ev = self.evaluate()
            self.recorder.log(kind="epoch", epoch=epoch, block=block, test_acc=ev["layer_acc"],
                              ensemble_test_acc=ev["ensemble_acc"],
                              train_samples=[s.stats.samples for s in self.stages],
                              lr=[s.optimizer.param_groups[0]["lr"] for s in self.stages])
        if block is None:
            self.live.epoch(epoch, max(s.epochs for s in self.stages), self.stages, ev)
        else:  # sequential / quicknet: `epoch` counts all blocks' epochs; say the block's own
            s = self.stages[block]
            self.live.epoch(s.stats.epochs_done - 1, s.epochs, self.stages, ev, block=block)
        self.save_checkpoint(epoch)

    def save_checkpoint(self, epoch: int) -> None:
        """The checkpointer decides whether (train.checkpoint, a run directory) and what to keep."""
        self.checkpointer.save(epoch, lambda: self.state(epoch))

    def state(self, epoch: int) -> dict:
        """What a checkpoint holds: the stages, and the trainer's epoch policy where it has one."""
        policy = {"policy": self.policy.state_dict()} if self.policy is not None else {}
        return {"epoch": epoch, "rank": self.rank, "stages": [s.state_dict() for s in self.stages], **policy}

    def load_checkpoint(self, epoch: int) -> None:
        self.load_state(self.checkpointer.load(epoch, map_location=self.device))

    def load_state(self, state: dict) -> None:
        for s, sd in zip(self.stages, state["stages"], strict=True):
            s.load_state_dict(sd)
        if self.policy is not None and state.get("policy"):
            self.policy.load_state_dict(state["policy"])

    @property
    def frozen_after(self) -> int:
        """The epoch after which every stage of this run is frozen (its budgets spent)."""
        return max(s.epochs for s in self.stages) - 1


def prepare_run_dir(cfg: JobConfig, out: Path, resume: bool | str) -> None:
    """Once per job (rank 0): the resolved config, and a fresh metrics.jsonl unless resuming."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(cfg))
    if not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)
