"""The decoupled engine: what one torchrun rank does with its consecutive blocks.

Data flows one way: loader -> rank 0 -> ... -> rank K-1. The source rank (rank 0) turns the
dataset into a stream of messages (train batches, end-of-epoch, eval batches, end-of-eval, stop;
sources.py); every other rank reads the same stream from its upstream neighbour (receiver.py),
trains its blocks on it and passes it on with its own detached output. The handlers below are the
same on every rank; only where messages come from differs.

Stage groups (groups.py): a rank is replica i of R of its group. It trains batch b of an epoch
when b mod R = i (the source group reads only those), sends its output of batch b (and evaluation
batch b) to replica b mod R' of the next group, and every marker to all of them; its blocks'
replicas average their gradients every step (replicated.py).

sync:  rank j's step t consumes rank j-1's step-t output, in order. Together with per-block RNG
       streams (stage.py) and per-(seed, epoch) batches (data.py) this equals the single-process
       `simultaneous` trainer bit for bit.
async: the receiver fills a bounded replay buffer while the rank keeps training on samples of it
       (replay.py). Control messages are handled in order; an end-of-epoch is handled once every
       batch of that epoch has been trained on or dropped. replay.budget says what a block's epoch
       is: "upstream" = upstream's (a slow rank drops what it cannot take and makes fewer steps),
       "steps" = its own `steps_per_epoch` optimizer steps (every block makes its full budget; the
       sources keep streaming until every rank is done, config/schema.py ReplayConfig).
"""
from __future__ import annotations

import random
import time
from typing import Iterable

from ... import exits
from ...data import resolve_augment
from ..run import Run
from ..stage import drain_chain, feed_chain
from .evaluation import EvalTally
from .receiver import Receiver
from .sources import DatasetSource, HandoffCache
from .groups import batch_index, share
from .transport import Kind, Link, Message, PeerError, handover


class Pipeline:
    def __init__(self, run: Run, total_epochs: int, recv: list[Link], send: list[Link], start_epoch: int = 0,
                 handoff: HandoffCache | None = None, stop_after: int | None = None, board=None,
                 source_steps: int = 0, share: tuple[int, int] = (0, 1)):
        self.run, self.cfg, self.stages = run, run.cfg, run.stages
        self.rank = run.rank
        self.recv_links, self.send_links = recv, send  # by upstream / downstream replica
        self.share = share  # (this rank's replica index, its group's replicas)
        self.source_steps = source_steps  # batches of a source epoch
        self.is_source = not recv  # reads the dataset (the first stage group)
        self.is_sink = not send  # the last stage group: scores the ensemble, sends nothing
        self.is_async = self.cfg.train.mode == "async"
        # replay.budget="steps": a stage's epoch is steps_per_epoch of its own steps, and this rank
        # tells the board when all its stages are done (the sources stream until all ranks are)
        self.own_epochs = self.is_async and self.cfg.replay.budget == "steps"
        self.board = board
        self.steps_per_epoch = -(-source_steps // share[1])  # the batches this replica gets per epoch
        self.total_epochs, self.start_epoch = total_epochs, start_epoch
        # async cascade: cache upstream's outputs of the hand-off epoch, then be our own source;
        # stop after epoch `stop_after` because downstream has cached ours by then
        self.handoff, self.stop_after = handoff, stop_after
        self.receiver = None if self.is_source else Receiver(recv, self.rank, self.cfg, share, source_steps,
                                                             tap=handoff.offer if handoff else None)
        self.epoch = start_epoch  # epochs this rank has completed (tags its outputs)
        self.steps = 0  # messages this rank has trained on
        self.last_step = 0  # source step of the newest batch trained on
        self.tally = EvalTally(self.is_sink, exits.wanted(self.cfg))
        self.results: dict[int, dict] = {}  # epoch -> this rank's test accuracies
        self.delay = random.Random(self.cfg.train.seed * 7919 + self.rank) if self.cfg.dist.debug_delay_ms else None

    @property
    def buffer(self):
        return self.receiver.buffer if self.receiver else None

    # ------------------------------------------------------------------ handlers (same on every rank)
    def handle(self, m: Message) -> bool:
        """Process one message; False once training is over."""
        handover(m.ready, m.x, m.y, m.ids, m.aux)  # received on the receiver's stream (CUDA)
        m.ready = None
        if m.kind == Kind.TRAIN:
            self.train_batch(m.x, m.y, m.ids, m.step)
        elif m.kind == Kind.END_EPOCH:
            self.end_epoch(m.epoch)
        elif m.kind == Kind.EVAL:
            h, z = self.tally.add(self.stages, m)
            self.send(Message(Kind.EVAL, m.epoch, m.step, h, m.y, m.ids, z))
        elif m.kind == Kind.END_EVAL:
            self.end_eval(m.epoch)
        elif m.kind == Kind.STOP:
            if self.handoff is None or self.handoff.active:  # else: we carry on from the cache
                self.send(Message(Kind.STOP, m.epoch))
            return False
        return True

    def train_batch(self, x, y, ids, step: int) -> None:
        if self.delay is not None:  # chaos testing (dist.debug_delay_ms)
            time.sleep(self.delay.uniform(0, self.cfg.dist.debug_delay_ms) / 1000)
        flow = feed_chain(self.stages, [(x, y, ids)], self._log)  # train (or forward if frozen), route
        self.last_step = max(self.last_step, step)
        self.steps += 1
        self._send_flow(flow, step)
        for s in self.stages:  # replicas: the round's all-reduce and step, after the send (replicated.AllReduce)
            s.settle()
        if self.own_epochs:
            self._end_own_epochs()

    def _end_own_epochs(self) -> None:
        """replay.budget="steps": a stage's epoch is steps_per_epoch of its own steps. The rank stamps
        each of its own epoch ends (`own_epoch_end`, what the bench times), not only the stream's
        markers: a rank that replays through its budget before upstream's marker arrives would
        otherwise show an epoch of marker spacing with no compute in it."""
        ended = [s for s in self.stages if s.training and s.steps >= (s.epochs_done + 1) * self.steps_per_epoch]
        for s in ended:
            s.end_epoch()
        if ended:
            extra = {"replay": self.buffer.stats.as_dict()} if self.buffer is not None else {}
            self.run.recorder.log(kind="own_epoch_end", rank=self.rank, epoch=ended[0].epochs_done - 1,
                                  **self.rank_metrics(), **extra)
        self._maybe_done()

    def _maybe_done(self) -> None:
        """replay.budget="steps": once every stage here has made its budget, count this rank in; from
        then on it only forwards, each buffered batch once (replays would hand downstream stale data)."""
        if self.own_epochs and not any(s.training for s in self.stages):
            self.board.mark_done()
            if self.buffer is not None:
                self.buffer.max_reuse = 1

    def _log(self, stage, res, y) -> None:
        self.run.log_step(self.epoch, stage, res, y)

    def _send_flow(self, flow, step: int) -> None:
        """`step`: the source step of the batch these outputs come from (staleness downstream)."""
        frozen = self.own_epochs and not any(s.training for s in self.stages)  # note [paced frozen stream]
        for h, y, ids in flow:  # routed samples only; a fully learned batch sends nothing
            self.send(Message(Kind.TRAIN, self.epoch, step, h, y, ids, frozen=frozen))

    def end_epoch(self, epoch: int) -> None:
        self._send_flow(drain_chain(self.stages, self._log), self.last_step)  # routed remainders, before the marker
        for s in self.stages:
            if s.training and not self.own_epochs:  # own epochs end by step count (train_batch)
                s.end_epoch()
        self._maybe_done()
        self.epoch = epoch + 1
        self.send(Message(Kind.END_EPOCH, epoch))
        # `is not None`: an empty ReplayBuffer is falsy (it has __len__), and a rank whose buffer
        # happened to be empty at an epoch end used to log no replay stats (the bench's KeyError race)
        extra = {"replay": self.buffer.stats.as_dict()} if self.buffer is not None else {}
        metrics = self.rank_metrics()
        self.run.recorder.log(kind="epoch_end", rank=self.rank, epoch=epoch, **metrics, **extra)
        # the sources evaluate after every eval_every epochs and after the last (not when streaming on
        # for a steps budget): then this epoch's line waits for its test accuracies (a few ms)
        every = 0 if self.own_epochs and self.stop_after is None else self.cfg.train.eval_every
        follows = bool(every) and ((epoch + 1) % every == 0 or epoch == self.total_epochs - 1)
        self.run.live.rank_epoch(epoch, self.total_epochs, self.stages, metrics, extra.get("replay"), follows)
        self.run.save_checkpoint(epoch)

    def end_eval(self, epoch: int) -> None:
        res = self.tally.result(self.stages)
        self.results[epoch] = res
        # a replica scores its share of the test set: `tested` says how many (summary.json merges them)
        self.run.recorder.log(kind="eval", rank=self.rank, epoch=epoch, tested=res["n"],
                              test_acc={str(k): v for k, v in res["layer_acc"].items()},
                              ensemble_test_acc=res.get("ensemble_acc"))
        self.run.live.rank_eval(epoch, res["layer_acc"], res.get("ensemble_acc"))
        self.send(Message(Kind.END_EVAL, epoch))

    def send(self, m: Message) -> None:
        """A batch to the downstream replica that takes it, a marker to every one."""
        links = self.send_links
        if len(links) > 1 and m.kind in (Kind.TRAIN, Kind.EVAL):
            index = batch_index(m.step, self.source_steps, self.is_async) if m.kind == Kind.TRAIN else m.step
            links = [links[share(index, len(links))]]
        for link in links:
            link.send(m)

    # ------------------------------------------------------------------ loops
    def run_loop(self) -> None:
        try:
            self._run_loop()
        except BaseException as e:
            # Tell downstream before dying; upstream learns from its failing sends (or torchrun).
            for link in self.send_links:
                link.abort(e.culprit if isinstance(e, PeerError) and e.culprit is not None else self.rank)
            raise

    def _run_loop(self) -> None:
        last = self.total_epochs - 1 if self.stop_after is None else self.stop_after
        # steps budget: stream on until every rank is done, unless downstream caches our outputs
        more = (lambda: not self.board.all_done()) if self.own_epochs and self.stop_after is None else None
        if self.is_source:  # trains each batch once in both modes
            d = self.run.data
            self.consume(DatasetSource(self.run, d.train, d.test, self.start_epoch, last,
                                       augment=resolve_augment(self.cfg.data), more=more, share=self.share))
        else:
            self.receiver.start()
            if self.is_async:
                self.async_loop()
            else:
                self.consume(self.receiver.messages())
        if self.handoff is not None:  # upstream has stopped: carry on from the cache
            if self.buffer is not None:
                self.buffer.clear()
            self.consume(self.handoff.source(last, more))
        for link in self.send_links:
            link.flush()

    def consume(self, messages: Iterable[Message]) -> None:
        for m in messages:
            if not self.handle(m):
                return

    def async_loop(self) -> None:
        rx = self.receiver
        while True:
            rx.check()
            m = rx.next_control()
            if m is not None:
                if not self.handle(m):
                    return
                continue
            e = rx.buffer.pick()
            if e is not None:
                rx.picked()  # a paced frozen stream may deliver its next batch
                handover(e.ready, e.x, e.y, e.ids)
                e.ready = None
                self.train_batch(e.x, e.y, e.ids, e.step)
                continue
            rx.wait()  # nothing to train on: idle until the receiver thread delivers

    # ------------------------------------------------------------------ report
    def rank_metrics(self) -> dict:
        send, recv = self.send_links, self.recv_links
        replicated = [s.rounds.comm_s for s in self.stages if s.rounds is not None]
        return {"compute_s": sum(s.compute_s for s in self.stages),
                "comm_s": sum(link.blocked_s for link in send),
                "idle_s": self.receiver.idle_s if self.receiver else 0.0,
                **({"allreduce_s": sum(replicated)} if replicated else {}),  # replicas: the gradient all-reduces
                "bytes_sent": sum(link.bytes for link in send), "bytes_recv": sum(link.bytes for link in recv),
                "steps": self.steps, "optimizer_steps": [s.updates for s in self.stages],
                "samples_trained": sum(s.samples for s in self.stages),
                "samples_sent": sum(link.samples for link in send), "samples_recv": sum(link.samples for link in recv)}
