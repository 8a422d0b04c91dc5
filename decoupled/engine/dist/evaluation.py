"""Distributed evaluation: each rank scores its heads on the test batches passing through it and
adds their votes to the running ensemble the batch carries downstream; the sink scores the ensemble."""
from __future__ import annotations

from ..evaluate import eval_stages
from .transport import Message


class EvalTally:
    def __init__(self, scores_ensemble: bool):
        self.scores_ensemble = scores_ensemble
        self.reset()

    def reset(self) -> None:
        self.correct: dict[int, int] = {}
        self.n = 0
        self.ens = 0

    def add(self, stages, m: Message):
        """One eval message through this rank's stages; returns (output, ensemble) to pass on."""
        z = m.aux if m.aux is not None else 0.0
        h, z = eval_stages(stages, m.x, m.y, z, self.correct)
        self.n += len(m.y)
        if self.scores_ensemble:
            self.ens += (z.argmax(-1) == m.y).sum()  # a device tensor: no host sync per batch
        return h, z

    def result(self, stages) -> dict:
        """Accuracies of this evaluation (and a fresh tally for the next)."""
        n = max(self.n, 1)
        res = {"layer_acc": {s.index: int(self.correct.get(s.index, 0)) / n for s in stages}}
        if self.scores_ensemble:
            res["ensemble_acc"] = int(self.ens) / n
        self.reset()
        return res
