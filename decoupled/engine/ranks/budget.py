"""What a block's epoch is on a rank, and when the rank has done its part: the pipeline's budget
(pipeline.py), chosen once at setup by the feed (feed.py) from replay.budget.

UpstreamEpochs: a block's epoch is upstream's, ended by the stream's end-of-epoch marker (sync
always; async with replay.budget="upstream": a slow rank drops what it cannot take and makes fewer
steps). The sources stream epochs 0..last, and evaluate every train.eval_every epochs.
OwnSteps: async with replay.budget="steps" (DGL): a block's epoch is `steps_per_epoch` of its own
optimizer steps, so every block makes its full budget; the sources keep streaming (through frozen
blocks, note [paced frozen stream]) until every rank has said on the board that it is done. They
evaluate after every train.eval_every epochs of the stream as well (the network as it is then:
the bench's time-to-accuracy curve) and once more at the end, when every block is final.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..stage import Stage
    from .world import BudgetBoard


class UpstreamEpochs:
    follows_stream = True  # a block's epochs are known in advance (a cascade hand-off can be planned)
    more: Callable[[], bool] | None = None  # the sources stop after epoch `last`

    def __init__(self, last: int):
        self.last = last  # the last epoch this rank's sources stream (the hand-off: the one downstream caches)

    @classmethod
    def start(cls, last: int, steps_per_epoch: int, board: BudgetBoard) -> UpstreamEpochs:
        """A rank's budget (setup.py builds either kind so): the stream's epochs need neither argument."""
        return cls(last)

    def after_step(self, stages: list[Stage]) -> list[Stage]:
        """The stages whose epoch this step ended: none, epochs end at the markers."""
        return []

    def at_marker(self, stages: list[Stage]) -> None:
        for s in stages:
            if s.training:
                s.end_epoch()

    def done(self, stages: list[Stage]) -> bool:
        """Whether this rank has made its budget early and only forwards now: never, it follows the stream."""
        return False

    def eval_every(self, every: int) -> int:
        return every


class OwnSteps:
    follows_stream = False  # a block's epochs are its own steps: "frozen from epoch U" is not known in advance

    def __init__(self, last: int, steps_per_epoch: int, board: BudgetBoard):
        self.last = last  # the last epoch of the budget; the sources stream on while `more()`
        self.steps_per_epoch = steps_per_epoch  # the batches this replica gets per epoch
        self.board = board

    @classmethod
    def start(cls, last: int, steps_per_epoch: int, board: BudgetBoard) -> OwnSteps:
        return cls(last, steps_per_epoch, board)

    def more(self) -> bool:
        """Whether the sources stream on: until every rank is done (world.BudgetBoard)."""
        return not self.board.all_done()

    def after_step(self, stages: list[Stage]) -> list[Stage]:
        """End the epoch of each stage that has made another `steps_per_epoch` steps; returns them."""
        ended = [s for s in stages if s.training and s.stats.steps >= (s.stats.epochs_done + 1) * self.steps_per_epoch]
        for s in ended:
            s.end_epoch()
        return ended

    def at_marker(self, stages: list[Stage]) -> None:
        """Own epochs end by step count (after_step), not at upstream's markers."""

    def done(self, stages: list[Stage]) -> bool:
        return not any(s.training for s in stages)

    def count_in(self) -> None:
        """Tell the board this rank has made its budget (the sources stream until every rank has)."""
        self.board.mark_done()

    def eval_every(self, every: int) -> int:
        return every  # as the stream's: the sources evaluate after its epochs (DatasetSource)


BUDGETS = {"upstream": UpstreamEpochs, "steps": OwnSteps}  # replay.budget
