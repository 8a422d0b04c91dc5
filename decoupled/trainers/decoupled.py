"""The decoupled trainers: the same stages as `simultaneous`, one stage group per torchrun rank
(engine/ranks/). `sync` consumes upstream's outputs in order and equals `simultaneous` bit for bit;
`async` trains on a replay buffer that the receiver fills (engine/ranks/pipeline.py)."""
from __future__ import annotations

import time
from pathlib import Path

from .. import exits, modes, summary as S
from ..engine.ranks import world as W
from ..engine.ranks.feed import AsyncFeed, SyncFeed
from ..engine.ranks.setup import Feed, RankSetup, setup_rank
from ..engine.run import Run
from ..memory import pipeline_held
from ..metrics import PeakMemory
from .base import Trainer, default_out


class Decoupled(Trainer):
    """This rank's share of a job across torchrun ranks (modes.Sync / modes.Async declare the rest)."""

    feed: Feed  # how a rank takes in upstream's stream (engine/ranks/feed.py)
    world: W.World
    setup: RankSetup

    def run(self, out: Path | None, resume: bool | str) -> dict | None:
        """This rank's share of the job; the summary on rank 0, None on the others."""
        t_start = time.perf_counter()
        self.world = W.init(self.cfg)
        out = W.broadcast_from_0(out or default_out(), self.world)  # one run directory for all ranks
        self.setup = setup_rank(self.cfg, out, resume, self.world, self.feed)
        summary = self.execute(self.setup.run, self.setup.pipeline.epoch, t_start)
        # Only on success: after a failure the peers may be gone and a collective teardown could hang.
        W.shutdown()
        return summary

    def train(self, run: Run, start_epoch: int = 0) -> None:
        self.setup.pipeline.run_loop()  # from the resume point setup_rank agreed on

    def rank(self) -> int:
        return self.world.rank

    def held(self):
        return pipeline_held(self.setup.pipeline)

    def score(self, run: Run) -> list[dict]:
        pipe = self.setup.pipeline
        val = pipe.val_result["layer_acc"] if pipe.val_result is not None else None  # data.val_fraction > 0
        return S.layers(run.stages, pipe.results[max(pipe.results)]["layer_acc"], val)

    def report(self, run: Run, layers: list[dict], costs: dict, memory: PeakMemory, train_s: float,
               t_start: float, exact: dict) -> dict | None:
        """This rank's report (kept even if the final exchange never happens), gathered on rank 0,
        which merges the stage groups' layers and writes the summary."""
        cfg, world, pipe, lay = self.cfg, self.world, self.setup.pipeline, self.setup.layout
        final = pipe.results[max(pipe.results)]
        extra = {**pipe.rank_metrics(), **exact}
        if pipe.buffer is not None:
            extra["replay"] = pipe.buffer.stats.as_dict()
        extra.update(stage=lay.group_of(world.rank), replica=lay.replica_of(world.rank),
                     params_sha=S.params_sha(run.stages))
        report = {"layers": layers, "ensemble": final.get("ensemble_acc"), "tested": final["n"],
                  "correct": final["correct"], "ensemble_correct": final.get("ensemble_correct"),
                  **({"val_tested": pipe.val_result["n"], "val_correct": pipe.val_result["correct"]}
                     if pipe.val_result is not None else {}),
                  "rank": S.rank_report(world.rank, run.stages, memory, train_s, extra)}
        S.save_rank_report(run.out, world.rank, report)
        # the early-exit curve: this rank's exits' answers in the final evaluation, and its blocks' costs
        # (this rank's FLOPs are in `layers`; exits' inference cost is cumulative, joined on rank 0)
        exit_part = ((pipe.tally.last_exits, exits.block_costs(run.stages, cfg.data.batch_size))
                     if exits.wanted(cfg) else None)
        gathered = W.gather_to_0((report, exit_part), world, group=world.patient)
        if world.rank != 0:
            return None
        reports = [r for r, _ in gathered]
        groups = [[reports[r] for r in lay.ranks(g)] for g in range(len(lay.replicas))]
        layers = S.merge_rank_layers(groups)
        curve = S.joined_exit_fields(cfg, [p for _, p in gathered], run.out, layers) if exits.wanted(cfg) else {}
        sink = groups[-1]  # each replica of the last group scored the ensemble on its share of the test set
        ensemble = sum(r["ensemble_correct"] for r in sink) / max(sum(r["tested"] for r in sink), 1)
        predicted = {"predicted_stage_s": self.setup.predicted_stage_s} if self.setup.predicted_stage_s else {}
        return S.write(cfg, run.out, world.size, world.device, t_start, layers, ensemble,
                       [r["rank"] for r in reports], placement=self.setup.plan, replicas=lay.replicas,
                       replica_batch=cfg.dist.replica_batch,
                       backend=world.backend, **predicted, train_flops=sum(layer["train_flops"] for layer in layers),
                       **curve)


class Sync(modes.Sync, Decoupled):
    feed = SyncFeed  # in source order: equals simultaneous bit for bit


class Async(modes.Async, Decoupled):
    feed = AsyncFeed  # a replay buffer the receiver fills while the rank trains
