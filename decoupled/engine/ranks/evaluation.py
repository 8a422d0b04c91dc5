"""Distributed evaluation: each rank scores its heads on the test batches passing through it and
adds their votes to the running ensemble the batch carries downstream; the sink scores the ensemble.
With `records_exits` (exits.wanted) each rank also keeps its exits' per-sample answers of the latest
evaluation (`last_exits`), which rank 0 joins into the early-exit curve at the end of the run."""
from __future__ import annotations

from ...exits import ExitOutputs, ExitRecorder
from ..evaluate import eval_stages
from .transport import Message


class EvalTally:
    def __init__(self, scores_ensemble: bool, records_exits: bool):
        self.scores_ensemble, self.records_exits = scores_ensemble, records_exits
        self.last_exits: ExitOutputs | None = None
        self.reset()

    def reset(self) -> None:
        self.correct: dict[int, int] = {}
        self.n = 0
        self.ens = 0
        self.exits = ExitRecorder() if self.records_exits else None

    def add(self, stages, m: Message):
        """One eval message through this rank's stages; returns (output, ensemble) to pass on."""
        z = m.aux if m.aux is not None else 0.0
        if self.exits is not None:
            self.exits.batch(m.ids, m.y)
        h, z = eval_stages(stages, m.x, m.y, z, self.correct, self.exits)
        self.n += len(m.y)
        if self.scores_ensemble:
            self.ens += (z.argmax(-1) == m.y).sum()  # a device tensor: no host sync per batch
        return h, z

    def result(self, stages) -> dict:
        """Accuracies of this evaluation (and a fresh tally for the next)."""
        n = max(self.n, 1)
        correct = {s.index: int(self.correct.get(s.index, 0)) for s in stages}
        # the counts too: the replicas of a stage group each score a share of the test set
        res = {"layer_acc": {j: c / n for j, c in correct.items()}, "n": self.n, "correct": correct}
        if self.scores_ensemble:
            res["ensemble_acc"] = int(self.ens) / n
            res["ensemble_correct"] = int(self.ens)
        if self.exits is not None:
            self.last_exits = self.exits.outputs()
        self.reset()
        return res
