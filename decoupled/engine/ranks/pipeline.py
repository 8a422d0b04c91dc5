"""The decoupled engine: what one torchrun rank does with its consecutive blocks.

Data flows one way: loader -> rank 0 -> ... -> rank K-1. The source group turns the dataset into a
stream of messages (train batches, end-of-epoch, eval batches, end-of-eval, stop; sources.py); every
other rank reads the same stream from its upstream neighbour, trains its blocks on it and passes it
on with its own detached output. A rank is one loop, `for m in feed: handle(m)`, the same on every
rank and in both modes (the shape of torch.distributed.pipelining: schedules over one stage API):
- the feed (feed.py, chosen once at setup) says where messages come from and in what order: the
  dataset, the sync FIFO, the async replay buffer + control queue, or the cascade hand-off's cache;
- the budget (budget.py, from replay.budget) says what a block's epoch is: upstream's, ended by the
  stream's markers, or its own `steps_per_epoch` optimizer steps.

Stage groups (groups.py): a rank is replica i of R of its group. It trains batch b of an epoch
when b mod R = i (the source group reads only those), sends its output of batch b (and evaluation
batch b) to replica b mod R' of the next group, and every marker to all of them; its blocks'
replicas average their gradients every step (stepping.py). With dist.replica_batch="split" it
trains its rows of every batch instead (Note [split replicas]).
"""
from __future__ import annotations

import random
import time
from typing import Callable, Iterable

import torch

from ... import exits
from ...device import accel
from ...memory import sample_held
from ..run import Run
from ..flow import drain_chain, feed_chain
from ..stepping import AllReduce
from .budget import OwnSteps, UpstreamEpochs
from .evaluation import EvalTally
from .groups import share, split_route
from .transport import BATCHES, EVALUATIONS, Kind, Link, Message, PeerError


class Pipeline:
    def __init__(self, run: Run, feed: Iterable[Message], budget: UpstreamEpochs | OwnSteps, total_epochs: int,
                 recv: list[Link], send: list[Link], batch_index: Callable[[int], int], start_epoch: int = 0,
                 share: tuple[int, int] = (0, 1)):
        self.run, self.cfg, self.stages = run, run.cfg, run.stages
        self.rank = run.rank
        self.dev = accel(run.device)
        self.feed, self.budget = feed, budget
        self.recv_links, self.send_links = recv, send  # by upstream / downstream replica
        self.batch_index = batch_index  # a training message's source step -> what replicas share it by
        self.share = share  # (replica, replicas) of this rank's group
        self.split = self.cfg.dist.replica_batch == "split"  # Note [split replicas] (groups.py)
        self.is_sink = not send  # the last stage group: scores the ensemble, sends nothing
        self.total_epochs = total_epochs
        self.epoch = start_epoch  # epochs this rank has completed (tags its outputs)
        self.steps = 0  # messages this rank has trained on
        self.last_step = 0  # source step of the newest batch trained on
        self.tally = EvalTally(self.is_sink, exits.wanted(self.cfg))
        self.results: dict[int, dict] = {}  # epoch -> this rank's test accuracies
        # the validation split's final evaluation (data.val_fraction; sources.py), tallied apart: the
        # test tally keeps its exits' answers for the early-exit curve
        self.val_tally = EvalTally(self.is_sink, False)
        self.val_result: dict | None = None
        self.trained_at = 0.0  # metrics.jsonl time of the end of the newest training batch
        self.eval_from: float | None = None  # trained_at when the current evaluation's first batch came
        self.delay = random.Random(self.cfg.train.seed * 7919 + self.rank) if self.cfg.dist.debug_delay_ms else None

    @property
    def buffer(self):
        return self.feed.buffer  # the async feed's replay buffer, else None

    # ------------------------------------------------------------------ handlers (same on every rank)
    def handle(self, m: Message) -> bool:
        """Process one message; False once training is over."""
        self.dev.hand_over(m.ready, m.x, m.y, m.ids, m.aux)  # received on the receiver's stream (markers: no tensors)
        m.ready = None
        sample_held()  # memory.ExactMemory's held bytes at every message: evaluations and frozen forwards too
        # the memory mark follows the messages: an evaluation is one phase, from its first batch to its
        # END_EVAL, so the mark restarts once when it begins and once after it ends. An async rank draws
        # training batches between its evaluation batches: those draws are counted in the evaluation
        # (a TRAIN message never sets the phase; outside an evaluation it is training's already). The
        # other markers are training's: an END_EPOCH that comes inside an evaluation (async, upstream
        # replicas whose markers merge behind a fast replica's evaluation batches) splits it there.
        if m.kind in (*EVALUATIONS, Kind.END_EVAL, Kind.END_VAL):
            self.run.memory_phase("eval")
        elif m.kind != Kind.TRAIN:
            self.run.memory_phase("train")
        if m.kind == Kind.TRAIN:
            self.train_batch(m.x, m.y, m.ids, m.step, m.fresh)
        elif m.kind == Kind.END_EPOCH:
            self.end_epoch(m.epoch)
        elif m.kind in EVALUATIONS:
            if m.kind == Kind.EVAL and self.eval_from is None:
                self.eval_from = self.trained_at
            h, z = (self.tally if m.kind == Kind.EVAL else self.val_tally).add(self.stages, m)
            self.send(Message(m.kind, m.epoch, m.step, h, m.y, m.ids, z))
        elif m.kind == Kind.END_EVAL:
            self.end_eval(m.epoch, m.step)
            self.run.memory_phase("train")  # the evaluation is over
        elif m.kind == Kind.END_VAL:
            self.end_val(m.epoch)
            self.run.memory_phase("train")
        elif m.kind == Kind.STOP:
            self.send(Message(Kind.STOP, m.epoch))
            return False
        return True

    def train_batch(self, x, y, ids, step: int, fresh: bool = True) -> None:
        if self.delay is not None:  # chaos testing (dist.debug_delay_ms)
            time.sleep(self.delay.uniform(0, self.cfg.dist.debug_delay_ms) / 1000)
        if self.split and not len(y):  # Note [split replicas]: this replica's part of the batch has no rows
            for s in self.stages:
                if s.training:
                    s.stepper.join_empty()
            last = self.stages[-1]
            flow = [(last.precision.to_wire(torch.empty((0, *last.out_shape), device=x.device)), y, ids)]
        else:
            flow = feed_chain(self.stages, [(x, y, ids)], self._log)  # train (or forward if frozen), route
        self.last_step = max(self.last_step, step)
        self.steps += 1
        self._send_flow(flow, step)
        for s in self.stages:  # replicas: the round's all-reduce and step, after the send (stepping.AllReduce)
            s.settle()
        self.trained_at = time.perf_counter() - self.run.recorder.t0
        ended = self.budget.after_step(self.stages, fresh)
        if ended:
            self._own_epoch_end(ended[0].stats.epochs_done - 1)
        self._maybe_done()

    def _own_epoch_end(self, epoch: int) -> None:
        """budget.OwnSteps: the rank stamps each of its own epoch ends (`own_epoch_end`, what the bench
        times), not only the stream's markers: a rank that replays through its budget before
        upstream's marker arrives would otherwise show an epoch of marker spacing with no compute in it."""
        extra = {"replay": self.buffer.stats.as_dict()} if self.buffer is not None else {}
        # last_step: the newest source step this rank has trained on (note [fresh budget]: under "fresh"
        # a block's last epoch cannot end before upstream's last training batch has reached it)
        self.run.recorder.log(kind="own_epoch_end", rank=self.rank, epoch=epoch, last_step=self.last_step,
                              **self.rank_metrics(), **extra)

    def _maybe_done(self) -> None:
        """Once every stage here has made its budget early (budget.OwnSteps), count this rank in; from
        then on it only forwards, each buffered batch once (replays would hand downstream stale data)."""
        if self.budget.done(self.stages):
            self.budget.count_in()
            if self.buffer is not None:
                self.buffer.max_reuse = 1

    def _log(self, stage, res, y) -> None:
        self.run.log_step(self.epoch, stage, res, y)

    def _send_flow(self, flow, step: int) -> None:
        """`step`: the source step of the batch these outputs come from (staleness downstream)."""
        frozen = self.budget.done(self.stages)  # note [paced frozen stream]
        for h, y, ids in flow:  # routed samples only; a fully learned batch sends nothing
            self.send(Message(Kind.TRAIN, self.epoch, step, h, y, ids, frozen=frozen))

    def end_epoch(self, epoch: int) -> None:
        self._send_flow(drain_chain(self.stages, self._log), self.last_step)  # routed remainders, before the marker
        self.budget.at_marker(self.stages)
        arrived = self.buffer.stats.received if self.buffer is not None else self.steps  # batches taken in
        self.budget.at_stream_epoch_end(epoch, arrived, self.stages, self.rank)
        self._maybe_done()
        self.epoch = epoch + 1
        self.send(Message(Kind.END_EPOCH, epoch))
        # `is not None`: an empty ReplayBuffer is falsy (it has __len__), and a rank whose buffer
        # happened to be empty at an epoch end used to log no replay stats (the bench's KeyError race)
        extra = {"replay": self.buffer.stats.as_dict()} if self.buffer is not None else {}
        metrics = self.rank_metrics()
        self.run.recorder.log(kind="epoch_end", rank=self.rank, epoch=epoch, **metrics, **extra)
        # the sources evaluate after every eval_every epochs and after the last: then this epoch's
        # line waits for its test accuracies (a few ms)
        every = self.budget.eval_every(self.cfg.train.eval_every)
        follows = bool(every) and ((epoch + 1) % every == 0 or epoch == self.total_epochs - 1)
        self.run.live.rank_epoch(epoch, self.total_epochs, self.stages, metrics, extra.get("replay"), follows)
        self.run.save_checkpoint(epoch)

    def end_eval(self, epoch: int, count: int = 0) -> None:
        """`count`: 0 for an epoch's own evaluation (the whole test set); else the source steps after
        which the sources evaluated mid-epoch (Note [mid-epoch evaluation]), on train.eval_subset."""
        res = self.tally.result(self.stages)
        began, self.eval_from = self.eval_from, None
        if count:
            # not an epoch's result (summary.json reads those): a point of the bench's curve, with the end of
            # the training before it (the newest batch trained before its first evaluation batch came)
            self.run.recorder.log(kind="step_eval", rank=self.rank, epoch=epoch, step=count, tested=res["n"],
                                  train_end_s=round(self.trained_at if began is None else began, 4),
                                  test_acc={str(k): v for k, v in res["layer_acc"].items()},
                                  ensemble_test_acc=res.get("ensemble_acc"))
            self.send(Message(Kind.END_EVAL, epoch, count))
            return
        self.results[epoch] = res
        # a replica scores its share of the test set: `tested` says how many (summary.json merges them)
        self.run.recorder.log(kind="eval", rank=self.rank, epoch=epoch, tested=res["n"],
                              test_acc={str(k): v for k, v in res["layer_acc"].items()},
                              ensemble_test_acc=res.get("ensemble_acc"))
        self.run.live.rank_eval(epoch, res["layer_acc"], res.get("ensemble_acc"))
        self.send(Message(Kind.END_EVAL, epoch))

    def end_val(self, epoch: int) -> None:
        """The validation split's accuracies (summary.json layers[].val_acc; `val` records), reported
        only: no decision is taken on them after training, as in the single-process trainers."""
        res = self.val_result = self.val_tally.result(self.stages)
        self.run.recorder.log(kind="val", rank=self.rank, epoch=epoch, tested=res["n"],
                              val_acc={str(k): v for k, v in res["layer_acc"].items()},
                              ensemble_val_acc=res.get("ensemble_acc"))
        self.send(Message(Kind.END_VAL, epoch))

    def send(self, m: Message) -> None:
        """A batch to the downstream replica that takes it, a marker to every one."""
        links = self.send_links
        if self.split and links and m.kind == Kind.TRAIN:  # Note [split replicas]: each its rows
            for j, part in split_route(len(m.y), *self.share, len(links)):
                links[j].send(Message(Kind.TRAIN, m.epoch, m.step, m.x[part], m.y[part], m.ids[part], frozen=m.frozen))
            return
        if len(links) > 1 and m.kind in BATCHES:
            index = self.batch_index(m.step) if m.kind == Kind.TRAIN else m.step
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
        for m in self.feed:
            if not self.handle(m):
                break
        for link in self.send_links:
            link.flush()

    # ------------------------------------------------------------------ report
    def rank_metrics(self) -> dict:
        send, recv = self.send_links, self.recv_links
        replicated = [s.stepper.comm_s for s in self.stages if isinstance(s.stepper, AllReduce)]
        return {"compute_s": sum(s.stats.compute_s for s in self.stages),
                "comm_s": sum(link.blocked_s for link in send),
                "idle_s": self.feed.idle_s,
                **({"allreduce_s": sum(replicated)} if replicated else {}),  # replicas: the gradient all-reduces
                "bytes_sent": sum(link.bytes for link in send), "bytes_recv": sum(link.bytes for link in recv),
                "steps": self.steps, "optimizer_steps": [s.stats.updates for s in self.stages],
                "samples_trained": sum(s.stats.samples for s in self.stages),
                "samples_sent": sum(link.samples for link in send), "samples_recv": sum(link.samples for link in recv),
                # training traffic alone (headers, labels, ids, padding included): bytes per training sample
                "train_bytes_sent": sum(link.train_bytes for link in send),
                "train_samples_sent": sum(link.train_samples for link in send),
                "train_samples_recv": sum(link.train_samples for link in recv)}
