"""The decoupled engine: what one torchrun rank does with its consecutive blocks.

Data flows one way: loader -> rank 0 -> ... -> rank K-1. Rank 0 turns the dataset into a stream of
messages (train batches, end-of-epoch, eval batches, end-of-eval, stop); every other rank reads the
same stream from its upstream neighbour, trains its blocks on it and passes it on with its own
detached output. The loop is the same on every rank; only the source of messages differs.

sync:  rank j's step t consumes rank j-1's step-t output, in order. Together with per-block RNG
       streams (stage.py) and per-(seed, epoch) batches (data.py) this equals the single-process
       `simultaneous` trainer bit for bit.
async: a receiver thread fills a bounded replay buffer while the rank keeps training on samples of
       it (replay.py). Control messages are handled in order; an end-of-epoch is handled once every
       batch of that epoch has been trained on or dropped.

Cascade budgets in async (layer l trains i0 + k*l epochs): once every block upstream of a rank is
frozen, its outputs are fixed pseudo-inputs. The rank caches one full epoch of them (train and
test, with the upstream heads' ensemble votes), the upstream ranks stop, and the rank carries on as
its own data source from the cache, exactly as rank 0 does from the dataset.
"""
from __future__ import annotations

import queue
import random
import sys
import threading
import time
from typing import Iterator

import torch

from ..data import Split, batches
from .cache import PseudoInputs
from .evaluate import eval_stages
from .simultaneous import drain
from .replay import Entry, ReplayBuffer
from .run import Run
from .transport import Kind, Link, Message, PeerAbort, PeerError


class Pipeline:
    def __init__(self, run: Run, world: int, total_epochs: int, recv: Link | None, send: Link | None,
                 start_epoch: int = 0, cache_epoch: int | None = None, stop_after: int | None = None,
                 sizes: tuple[int, int, int] = (0, 0, 0)):
        self.run, self.world = run, world
        self.rank = run.rank
        self.stages = run.stages
        self.cfg = run.cfg
        self.total_epochs = total_epochs
        self.start_epoch = start_epoch
        self.recv_link, self.send_link = recv, send
        self.is_async = self.cfg.train.mode == "async"
        self.epoch = start_epoch  # epochs this rank has completed (tags its outputs)
        self.steps = 0  # messages this rank has trained on
        self.idle_s = 0.0
        self.eval_correct: dict[int, int] = {}
        self.eval_n = 0
        self.eval_ens = 0
        self.results: dict[int, dict] = {}  # epoch -> this rank's test accuracies
        self.buffer: ReplayBuffer | None = None
        self.inbox: queue.Queue | None = None
        self.receiver_error: BaseException | None = None
        # cascade hand-off (async): cache upstream's outputs of epoch `cache_epoch`; stop sending
        # after epoch `stop_after` because downstream has cached ours by then
        self.cache_epoch, self.stop_after = cache_epoch, stop_after
        self.n_train, self.n_test, self.num_classes = sizes
        self.cached: dict[str, PseudoInputs | torch.Tensor] = {}
        self.from_cache = False
        self.delay = random.Random(self.cfg.train.seed * 7919 + self.rank) if self.cfg.dist.debug_delay_ms else None

    # ------------------------------------------------------------------ message sources
    def source_stream(self, train: Split, test: Split, start: int, test_aux=None,
                      augment: bool = False) -> Iterator[Message]:
        """A data source as messages: rank 0 over the dataset, a cascade rank over its cache.
        Evaluation after every `eval_every` epochs, at the hand-off epoch and at the end."""
        cfg = self.cfg
        every = cfg.train.eval_every
        last = self.total_epochs - 1 if self.stop_after is None else self.stop_after
        steps = -(-len(train) // cfg.data.batch_size)
        with self.run.progress((last + 1 - start) * steps, f"rank {self.rank} source") as bar:
            for epoch in range(start, last + 1):
                for b in batches(train, cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch, augment=augment):
                    yield Message(Kind.TRAIN, epoch, b.step, *self.run.to_device(b.x, b.y, b.ids))
                    bar.update()
                yield Message(Kind.END_EPOCH, epoch)
                if (every and (epoch + 1) % every == 0) or epoch == last:
                    for b in batches(test, cfg.data.eval_batch_size, shuffle=False):
                        aux = None if test_aux is None else test_aux[b.ids]
                        yield Message(Kind.EVAL, epoch, b.step, *self.run.to_device(b.x, b.y, b.ids), aux=aux)
                    yield Message(Kind.END_EVAL, epoch)
        yield Message(Kind.STOP, last)

    def start_receiver(self) -> None:
        """Receiving runs ahead of training on its own thread (the link's group is used by no one
        else). sync: a FIFO of depth max_inflight, so upstream waits only when we are that far behind.
        async: train batches go to the replay buffer, everything else to its control queue."""
        if self.is_async:
            r = self.cfg.replay
            self.buffer = ReplayBuffer(r.capacity, r.policy, r.max_reuse, seed=self.cfg.train.seed * 1000 + self.rank)
        else:
            self.inbox = queue.Queue(maxsize=self.cfg.dist.max_inflight)

        def receive():
            try:
                while True:
                    m = self.recv_link.recv()
                    if m.kind == Kind.ABORT:
                        raise PeerAbort(m.step, self.rank)
                    self._deliver(m)
                    if m.kind == Kind.STOP:
                        return
            except BaseException as e:  # surfaced on the main thread by next_message/async loop
                self.receiver_error = e
                self._deliver(None)

        if self.is_async:
            # The receiver needs the GIL for a moment after every transfer; with the default 5 ms
            # switch interval a training thread that never waits would make upstream's sends stall.
            sys.setswitchinterval(0.0005)
        threading.Thread(target=receive, name=f"recv-from-{self.rank - 1}", daemon=True).start()

    def _deliver(self, m: Message | None) -> None:
        if m is not None and m.epoch == self.cache_epoch and m.kind in (Kind.TRAIN, Kind.EVAL):
            self._cache(m)
        if not self.is_async:
            self.inbox.put(m)
        elif m is not None and m.kind == Kind.TRAIN:
            self.buffer.put(Entry(m.x, m.y, m.ids, m.epoch, m.step))
        else:
            with self.buffer.cond:
                self.buffer.control.append(m)
                self.buffer.cond.notify_all()

    def _cache(self, m: Message) -> None:
        """Keep upstream's frozen outputs of the hand-off epoch (memory or disk, train.cache)."""
        split = "train" if m.kind == Kind.TRAIN else "test"
        if split not in self.cached:
            n = self.n_train if split == "train" else self.n_test
            where = "disk" if self.cfg.train.cache == "disk" else "memory"
            path = self.run.out / "cache" / f"rank{self.rank}-{split}.npy"
            self.cached[split] = PseudoInputs.allocate(n, m.x.shape[1:], where, path, self.run.device)
            self.cached[split + "_y"] = torch.full((n,), -1, dtype=torch.int64, device=self.run.device)
            if split == "test":
                self.cached["test_aux"] = torch.zeros((n, self.num_classes), device=self.run.device)
        self.cached[split].put(m.ids, m.x)
        self.cached[split + "_y"][m.ids] = m.y
        if m.aux is not None:
            self.cached["test_aux"][m.ids] = m.aux

    def cached_stream(self) -> Iterator[Message]:
        """After the hand-off: this rank is the source, from its cache (every sample once an epoch)."""
        for split in ("train", "test"):
            if split not in self.cached or bool((self.cached[split + "_y"] < 0).any()):
                raise PeerError(f"rank {self.rank}: the cached {split} pseudo-inputs of epoch {self.cache_epoch} "
                                "are incomplete; upstream did not send every sample once")
            self.cached[split].flush()
        c = self.cached
        self.from_cache = True
        self.run.recorder.log(kind="cache", rank=self.rank, epoch=self.cache_epoch, train=len(c["train_y"]),
                              test=len(c["test_y"]))
        yield from self.source_stream(Split(c["train"], c["train_y"]), Split(c["test"], c["test_y"]),
                                      self.cache_epoch + 1, test_aux=c["test_aux"])

    def _check_receiver(self) -> None:
        if isinstance(self.receiver_error, PeerError):
            raise self.receiver_error
        if self.receiver_error is not None:
            raise PeerError(str(self.receiver_error)) from self.receiver_error

    def inbox_stream(self) -> Iterator[Message]:
        timeout = self.cfg.dist.timeout_s
        while True:
            t0 = time.perf_counter()
            try:
                m = self.inbox.get(timeout=timeout)
            except queue.Empty:
                raise PeerError(f"rank {self.rank}: nothing from rank {self.rank - 1} for {timeout:.0f}s "
                                "(dist.timeout_s); it is hung or dead") from None
            self.idle_s += time.perf_counter() - t0
            if m is None:
                self._check_receiver()
            yield m
            if m.kind == Kind.STOP:
                return

    # ------------------------------------------------------------------ handlers (same on every rank)
    def handle(self, m: Message) -> bool:
        """Process one message; False once training is over."""
        if m.kind == Kind.TRAIN:
            self.train_batch(m.x, m.y, m.ids, m.step)
        elif m.kind == Kind.END_EPOCH:
            self.end_epoch(m.epoch)
        elif m.kind == Kind.EVAL:
            self.eval_batch(m)
        elif m.kind == Kind.END_EVAL:
            self.end_eval(m.epoch)
        elif m.kind == Kind.STOP:
            if self.cache_epoch is None or self.from_cache:  # else: we carry on from the cache
                self.send(Message(Kind.STOP, m.epoch))
            return False
        return True

    def train_batch(self, x, y, ids, upstream_step: int) -> None:
        if self.delay is not None:  # chaos testing (dist.debug_delay_ms)
            time.sleep(self.delay.uniform(0, self.cfg.dist.debug_delay_ms) / 1000)
        flow = [(x, y, ids)]
        for s in self.stages:  # Stage.feed: train (or forward if frozen), route, re-batch
            flow = [out for item in flow for out in s.feed(*item, self._log)]
        self.steps += 1
        self._send_flow(flow)

    def _log(self, stage, res, y) -> None:
        self.run.log_step(self.epoch, stage, res, y)

    def _send_flow(self, flow) -> None:
        for h, y, ids in flow:  # routed samples only; a fully learned batch sends nothing
            self.send(Message(Kind.TRAIN, self.epoch, self.steps, h, y, ids))

    def end_epoch(self, epoch: int) -> None:
        self._send_flow(drain(self.stages, [], self._log))  # routed remainders, before the marker
        for s in self.stages:
            if s.training:
                s.end_epoch()
        self.epoch = epoch + 1
        self.send(Message(Kind.END_EPOCH, epoch))
        extra = {"replay": self.buffer.stats.as_dict()} if self.buffer else {}
        self.run.recorder.log(kind="epoch_end", rank=self.rank, epoch=epoch, **self.rank_metrics(), **extra)
        if self.cfg.train.checkpoint and self.run.out is not None:
            self.run.save_checkpoint(epoch)

    def eval_batch(self, m: Message) -> None:
        z = m.aux if m.aux is not None else 0.0
        h, z = eval_stages(self.stages, m.x, m.y, z, self.eval_correct)
        self.eval_n += len(m.y)
        if self.send_link is None:
            self.eval_ens += int((z.argmax(-1) == m.y).sum())
        self.send(Message(Kind.EVAL, m.epoch, m.step, h, m.y, m.ids, z))

    def end_eval(self, epoch: int) -> None:
        n = max(self.eval_n, 1)
        res = {"layer_acc": {s.index: self.eval_correct.get(s.index, 0) / n for s in self.stages}}
        if self.send_link is None:
            res["ensemble_acc"] = self.eval_ens / n
        self.results[epoch] = res
        self.run.recorder.log(kind="eval", rank=self.rank, epoch=epoch,
                              test_acc={str(k): v for k, v in res["layer_acc"].items()},
                              ensemble_test_acc=res.get("ensemble_acc"))
        self.eval_correct, self.eval_n, self.eval_ens = {}, 0, 0
        self.send(Message(Kind.END_EVAL, epoch))

    def send(self, m: Message) -> None:
        if self.send_link is not None:
            self.send_link.send(m)

    # ------------------------------------------------------------------ loops
    def run_loop(self) -> None:
        try:
            self._run_loop()
        except BaseException as e:
            # Tell downstream before dying; upstream learns from its failing sends (or torchrun).
            if self.send_link is not None:
                self.send_link.abort(e.origin if isinstance(e, PeerAbort) else self.rank)
            raise

    def _run_loop(self) -> None:
        if self.recv_link is None:  # rank 0 reads the data; it trains each batch once in both modes
            d = self.run.data
            self.consume(self.source_stream(d.train, d.test, self.start_epoch, augment=self.cfg.data.augment))
        elif not self.is_async:
            self.start_receiver()
            self.consume(self.inbox_stream())
        else:
            self.start_receiver()
            self.async_loop()
        if self.cache_epoch is not None:  # upstream has stopped: carry on from the cache
            self.buffer.entries.clear()
            self.consume(self.cached_stream())
        if self.send_link is not None:
            self.send_link.flush()

    def consume(self, messages: Iterator[Message]) -> None:
        for m in messages:
            if not self.handle(m):
                return

    def async_loop(self) -> None:
        buf, timeout = self.buffer, self.cfg.dist.timeout_s
        last_input = time.perf_counter()
        while True:
            self._check_receiver()
            m = self._ready_control()
            if m is not None:
                last_input = time.perf_counter()
                if not self.handle(m):
                    return
                continue
            e = buf.pick()
            if e is not None:
                last_input = time.perf_counter()
                self.train_batch(e.x, e.y, e.ids, e.step)
                continue
            # nothing to train on: wait for the receiver thread (idle, not communication)
            t0 = time.perf_counter()
            with buf.cond:
                buf.cond.wait_for(lambda: buf.entries or buf.control, timeout=1.0)
            self.idle_s += time.perf_counter() - t0
            if time.perf_counter() - last_input > timeout:
                raise PeerError(f"rank {self.rank}: nothing from rank {self.rank - 1} for {timeout:.0f}s "
                                "(dist.timeout_s); it is hung or dead")

    def _ready_control(self) -> Message | None:
        buf = self.buffer
        with buf.cond:
            if not buf.control:
                return None
            m = buf.control[0]
            if m is None:
                return None  # receiver died; _check_receiver raises next round
            if m.kind == Kind.END_EPOCH and not buf.epoch_done(m.epoch):
                return None
            return buf.control.popleft()

    # ------------------------------------------------------------------ report
    def rank_metrics(self) -> dict:
        recv_b = self.recv_link.bytes if self.recv_link else 0
        send_b = self.send_link.bytes if self.send_link else 0
        return {"compute_s": sum(s.compute_s for s in self.stages),
                "comm_s": self.send_link.blocked_s if self.send_link else 0.0,
                "idle_s": self.idle_s, "bytes_sent": send_b, "bytes_recv": recv_b, "steps": self.steps,
                "samples_sent": self.send_link.samples if self.send_link else 0,
                "samples_recv": self.recv_link.samples if self.recv_link else 0}
