"""Where a rank's messages come from when it has no upstream to read: the dataset (the source
group), or, after the async cascade hand-off, its cache of upstream's frozen outputs.

Cascade budgets in async (layer l trains i0 + k*l epochs): once every block upstream of a rank is
frozen, its outputs are fixed pseudo-inputs (engine/frozen.py). The rank caches one full epoch of
them (train and test, with the upstream heads' ensemble votes), the upstream ranks stop, and the
rank carries on as its own data source from the cache, exactly as rank 0 does from the dataset.
"""
from __future__ import annotations

from typing import Callable, Iterator

from ...data import Augment, Split, batches
from ..evaluate import evaluates_at, mid_epoch_test
from ..frozen import StreamedInputs
from ..wire import decode
from ..run import Run
from .groups import share, split_tensors
from .receiver import Receiver
from .transport import Kind, Message, PeerError


def prefetched(batches_, to_device):
    """(batch, its device tensors), the next batch's copy issued before the current one is yielded:
    on CUDA its pinned host-to-device copy then overlaps the current batch's training."""
    ahead = None
    for b in batches_:
        nxt = (b, to_device(b.x, b.y, b.ids))
        if ahead is not None:
            yield ahead
        ahead = nxt
    if ahead is not None:
        yield ahead


class DatasetSource:
    """A split pair as the message stream every rank understands: train batches of each epoch, its
    end-of-epoch marker, an evaluation after every `eval_every` epochs and after the last, then (with
    a validation split, data.val_fraction) one evaluation of it, then STOP; with train.eval_every_steps
    also evaluations between an epoch's batches (Note [mid-epoch evaluation]). The validation batches
    come last, after all training, and draw no random numbers (unshuffled, unaugmented): training
    sees the same stream with or without them.

    `more` (budget.OwnSteps): after epoch `last`, keep streaming further epochs (through frozen
    blocks) while more() is true, that is until every rank has made its budget of steps. The
    evaluations of epochs 0..last measure the network as it is when they pass (a replaying rank may
    be ahead of or behind the stream's epoch); the last one, after the extra epochs, when every block
    is final."""

    buffer, idle_s = None, 0.0  # a feed's report (feed.py): no replay buffer, never waits on a peer

    def queued(self) -> list:
        return []  # a feed's report (feed.py): it holds no received message

    def __init__(self, run: Run, train: Split, test: Split, start: int, last: int, test_aux=None,
                 augment: Augment | None = None, more=None, share: tuple[int, int] = (0, 1),
                 batch_index: Callable[[int, int], int] | None = None, val: Split | None = None, val_aux=None):
        self.run, self.train, self.test, self.val, self.val_aux = run, train, test, val, val_aux
        self.start, self.last, self.test_aux, self.augment, self.more = start, last, test_aux, augment, more
        self.share = share  # (replica, replicas) of the source group: this rank streams its share (groups.py)
        self.batch_index = batch_index  # the feed class's: what replicas share a batch by
        self.split = run.cfg.dist.replica_batch == "split" and share[1] > 1  # Note [split replicas]
        # train.eval_every_steps: the test subset its mid-epoch evaluations score (the first samples)
        self.mid_test = mid_epoch_test(test, run.cfg.train) if run.cfg.train.eval_every_steps else None

    def _keep(self, epoch: int | None, steps: int = 0):
        """Which batches of training epoch `epoch` (None: of an evaluation, shared by batch index) this
        replica streams (data.batches still draws every batch's random numbers, so each batch is the
        same whichever replica streams it), or None: all."""
        replica, replicas = self.share
        if replicas == 1:
            return None
        if epoch is not None and self.split:
            return None  # Note [split replicas]: every training batch, this replica's rows of it (upload)
        if epoch is None:
            return lambda b: share(b, replicas) == replica
        return lambda b: share(self.batch_index(epoch * steps + b, steps), replicas) == replica

    def _upload(self, *tensors):
        """A training batch to the device: with split replicas, only this replica's rows of it."""
        return self.run.to_device(*(split_tensors(tensors, *self.share) if self.split else tensors))

    def _epochs(self) -> Iterator[int]:
        # No cap on the extra epochs: how many a slow rank needs is the speed ratio of the ranks, which
        # is unbounded. Streaming on cannot hide a failure: a rank that stops reading makes our sends
        # time out (dist.timeout_s), and one that fails aborts the pipeline.
        epoch = self.start
        while epoch <= self.last or (self.more is not None and self.more()):
            yield epoch
            epoch += 1

    def __iter__(self) -> Iterator[Message]:
        cfg, run = self.run.cfg, self.run
        every = cfg.train.eval_every
        steps = -(-len(self.train) // cfg.data.batch_size)
        final = None
        with run.progress((self.last + 1 - self.start) * steps, f"rank {run.rank} source") as bar:
            for epoch in self._epochs():
                complete = True
                points = self._mid_epoch_points(epoch, steps)
                train = batches(self.train, cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
                                augment=self.augment, keep=self._keep(epoch, steps))
                for b, tensors in prefetched(train, self._upload):
                    if epoch > self.last and not self.more():
                        complete = False  # every rank is done: no need to finish the epoch
                        break
                    # the global source step (the same on every rank, across epochs and resumes):
                    # every output made from this batch downstream carries it, so staleness
                    # anywhere = newest source step received - the drawn batch's source step
                    yield from self._mid_epoch(epoch, points, epoch * steps + b.step)
                    yield Message(Kind.TRAIN, epoch, epoch * steps + b.step, *tensors)
                    bar.update()
                final = epoch
                if not complete:
                    break
                yield from self._mid_epoch(epoch, points, (epoch + 1) * steps)
                yield Message(Kind.END_EPOCH, epoch)
                if every and (epoch + 1) % every == 0 and epoch < self.last:
                    yield from self._evaluation(epoch)
        if final is not None:  # the last evaluation, when every block is final
            yield from self._evaluation(final)
            if self.val is not None:
                yield from self._evaluation(final, self.val, self.val_aux, Kind.VAL, Kind.END_VAL)
        yield Message(Kind.STOP, self.last if final is None else final)

    def _mid_epoch_points(self, epoch: int, steps: int) -> list[int]:
        """The source step counts after which epoch `epoch` is evaluated mid-way (Note [mid-epoch
        evaluation]); none in the epochs streamed past the last for a slow rank (a steps budget), as
        those have no end-of-epoch evaluation either."""
        if self.mid_test is None or epoch > self.last:
            return []
        return [c for c in range(epoch * steps + 1, (epoch + 1) * steps) if evaluates_at(self.run.cfg.train, c, steps)]

    def _mid_epoch(self, epoch: int, points: list[int], upto: int) -> Iterator[Message]:
        """The mid-epoch evaluations due once `upto` batches have been streamed, before the next one:
        each replica of the source group streams only its share, so it evaluates before its first
        batch past a point (or before the epoch's marker) and every replica makes the same ones."""
        while points and points[0] <= upto:
            yield from self._evaluation(epoch, count=points.pop(0))

    def _evaluation(self, epoch: int, split: Split | None = None, aux_of=None, kind: Kind = Kind.EVAL,
                    end: Kind = Kind.END_EVAL, count: int = 0) -> Iterator[Message]:
        """One evaluation of `split` (the test set by default; after `count` source steps mid-epoch, the
        test subset), its batches and its end marker, which carries `count` (0: the epoch's own
        evaluation, or the validation split's; SyncFeed resumes the epoch there)."""
        if split is None:
            split, aux_of = (self.mid_test if count else self.test), self.test_aux
        for b in batches(split, self.run.cfg.data.eval_batch_size, shuffle=False, keep=self._keep(None)):
            aux = None if aux_of is None else aux_of[b.ids]
            yield Message(kind, epoch, b.step, *self.run.to_device(b.x, b.y, b.ids), aux=aux)
        yield Message(end, epoch, count)


class HandoffCache:
    """Async cascade: upstream's outputs of epoch `epoch` (memory or disk, train.cache), filled by
    the receiver thread (`offer`), then served as this rank's own source."""

    SPLITS = {Kind.TRAIN: "train", Kind.EVAL: "test", Kind.VAL: "val"}

    def __init__(self, run: Run, epoch: int, where: str, n_train: int, n_test: int, num_classes: int,
                 n_val: int = 0, *, in_shape):
        self.run, self.epoch = run, epoch
        self.in_shape = tuple(in_shape)  # this rank's first block's: what upstream's wire form decodes to
        path = run.out / "cache"  # where="disk" ("memory" otherwise: a hand-off only happens when it caches)
        sizes = [("train", n_train, 0), ("test", n_test, num_classes)] + [("val", n_val, num_classes)] * (n_val > 0)
        self.splits = {split: StreamedInputs(n, where, path / f"rank{run.rank}-{split}.npy", run.device, votes)
                       for split, n, votes in sizes}

    def offer(self, m: Message) -> None:
        # upstream's last epoch is the cached one: its validation evaluation (sources.DatasetSource) comes with it
        if m.epoch == self.epoch:
            x = decode(m.x, self.in_shape)  # upstream's wire form (engine/wire.py), cached as float32
            self.splits[self.SPLITS[m.kind]].put(m.ids, x, m.y, m.aux)

    def source(self, last: int, more=None) -> DatasetSource:
        """Every sample once an epoch, from the epoch after the hand-off to `last`."""
        for split, inputs in self.splits.items():
            if not inputs.complete():
                raise PeerError(f"rank {self.run.rank}: the cached {split} pseudo-inputs of epoch {self.epoch} "
                                "are incomplete; upstream did not send every sample once")
        train, test = self.splits["train"].split(), self.splits["test"].split()
        val = self.splits.get("val")
        self.run.recorder.log(kind="cache", rank=self.run.rank, epoch=self.epoch, train=len(train), test=len(test))
        return DatasetSource(self.run, train, test, self.epoch + 1, last, test_aux=self.splits["test"].aux, more=more,
                             val=val.split() if val else None, val_aux=val.aux if val else None)


class HandoffFeed:
    """The async cascade hand-off as a feed: upstream's messages until its STOP (upstream has stopped
    after the epoch this rank caches), then the cache's, epoch after epoch to `last`."""

    def __init__(self, upstream: Receiver, cache: HandoffCache, last: int, more=None):
        self.upstream, self.cache, self.last, self.more = upstream, cache, last, more

    @property
    def buffer(self):
        return self.upstream.buffer

    @property
    def idle_s(self) -> float:
        return self.upstream.idle_s

    def queued(self) -> list[Message]:
        return self.upstream.queued()

    def __iter__(self) -> Iterator[Message]:
        for m in self.upstream:
            if m.kind == Kind.STOP:
                break
            yield m
        if self.buffer is not None:
            self.buffer.clear()  # what upstream sent before it stopped: the cache takes over
        yield from self.cache.source(self.last, self.more)
