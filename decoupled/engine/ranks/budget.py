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
FreshSteps: async with replay.budget="fresh": the same budget counted in *fresh* batches (drawn for
the first time), note [fresh budget].

Note [fresh budget]. Under "steps" a rank faster than the stream that feeds it replays (up to
replay.max_reuse draws a batch) and so makes its E x S steps in a fraction of upstream's training
time: measured (issue 31), the last of 2 ranks spent its 564-step budget by t = 14.4 s, having
taken in 24,432 of the 36,000 samples upstream would send, then stood frozen for 18.8 s while the
block under it trained on; its accuracy fell from 0.835 to 0.799 as its input features moved.
"fresh" counts a block's epoch as `steps_per_epoch` fresh draws instead: replays still fill the
time a fast rank would idle (each batch at most replay.max_reuse times, so at most max_reuse - 1
replays per fresh batch), but they do not advance the budget, so a block's last epoch ends only
once upstream has streamed the batches of its last epoch, never while the blocks feeding it still
train. A slow rank is as under "steps": upstream streams on (frozen, paced) until it has drawn its
E x S fresh batches. The LR schedule steps on these epochs.
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

    def after_step(self, stages: list[Stage], fresh: bool = True) -> list[Stage]:
        """The stages whose epoch this step ended: none, epochs end at the markers."""
        return []

    def at_marker(self, stages: list[Stage]) -> None:
        for s in stages:
            if s.training:
                s.end_epoch()

    def done(self, stages: list[Stage]) -> bool:
        """Whether this rank has made its budget early and only forwards now: never, it follows the stream."""
        return False

    def at_stream_epoch_end(self, epoch: int, arrived: int, stages: list[Stage], rank: int) -> None:
        """After the stream's end-of-epoch marker `epoch`: nothing to check, the stream ends on its own."""

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

    def after_step(self, stages: list[Stage], fresh: bool = True) -> list[Stage]:
        """End the epoch of each stage that has made another `steps_per_epoch` steps; returns them.
        `fresh`: whether the batch was drawn for the first time (FreshSteps counts those)."""
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

    _arrived_at_marker = 0  # training batches this rank had taken in at the stream's previous marker

    def at_stream_epoch_end(self, epoch: int, arrived: int, stages: list[Stage], rank: int) -> None:
        """The stream streams on past its last epoch only so that ranks make their budgets. An epoch
        past it that brought this unfinished rank no batch at all (`arrived`: batches taken in, trained on
or dropped) would repeat forever: upstream is
        frozen, so it routes the same samples away again (QuickNet routing sends only what the blocks
        before did not learn). Stop with the reason instead of streaming without end."""
        if epoch > self.last and not self.done(stages) and arrived == self._arrived_at_marker:
            budget = (self.last + 1) * self.steps_per_epoch
            raise RuntimeError(
                f"rank {rank}: epoch {epoch} of the stream (past the last, {self.last}) brought it no batch to "
                f"train on, and its blocks have not made their budget of {budget} steps: the frozen blocks "
                "upstream route every sample away (QuickNet routing), so more epochs would bring none either. "
                "Use replay.budget='upstream' (epochs follow the stream), or routing that passes samples on")
        self._arrived_at_marker = arrived

    def eval_every(self, every: int) -> int:
        return every  # as the stream's: the sources evaluate after its epochs (DatasetSource)


class FreshSteps(OwnSteps):
    """Note [fresh budget]: a block's epoch is `steps_per_epoch` fresh draws; replays in between are
    extra steps."""

    def __init__(self, last: int, steps_per_epoch: int, board: BudgetBoard):
        super().__init__(last, steps_per_epoch, board)
        self.fresh = 0  # batches this rank has drawn for the first time

    def after_step(self, stages: list[Stage], fresh: bool = True) -> list[Stage]:
        self.fresh += fresh
        ended = [s for s in stages if s.training and self.fresh >= (s.stats.epochs_done + 1) * self.steps_per_epoch]
        for s in ended:
            s.end_epoch()
        return ended


BUDGETS = {"upstream": UpstreamEpochs, "steps": OwnSteps, "fresh": FreshSteps}  # replay.budget
