"""One block's share of a batch, and a batch through consecutive blocks.

A stage with a router (QuickNets across blocks; objectives/router.py) re-batches what it receives and
passes on only the samples its router keeps; a stage whose budget is spent (cascade) forwards only.
The single-process `simultaneous` loop and the distributed engine both go through here, so each
block sees the same sequence of batches wherever it runs.
"""
from __future__ import annotations

import torch

from .ranks.groups import join_tensors, split_tensors


def feed(stage, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, log=None):
    """Take an incoming (sub-)batch; yield what goes on to the next block as (h, y, ids)."""
    parts = stage.stepper.parts
    if parts > 1:  # Note [split replicas]: the reference plays every replica's part of the batch
        outs = [out for i in range(parts) for part in [split_tensors((x, y, ids), i, parts)] if len(part[1])
                for out in step(stage, *part, log)]
        stage.stepper.end_batch()
        if outs:
            yield tuple(join_tensors(outs))
        return
    rebatcher = stage.router.rebatcher if stage.router else None
    if rebatcher is None:
        yield from step(stage, x, y, ids, log)
        return
    rebatcher.add(x, y, ids)
    for b in rebatcher.full():
        yield from step(stage, *b, log)


def drain(stage, log=None):
    """At the end of an epoch: train on what the rebatcher still holds (a smaller last batch)."""
    if stage.router is not None and stage.router.rebatcher is not None:
        for b in stage.router.rebatcher.flush():
            yield from step(stage, *b, log)
    if stage.training:
        stage.stepper.pad_epoch()  # replicas: the epoch's last round steps


def step(stage, x, y, ids, log):
    """Train on (or, frozen, forward) one batch and keep what the router passes on."""
    if stage.training:
        h, res = stage.train_step(x, y)
        if log is not None:
            log(stage, res, y)
    else:  # budget spent (cascade): frozen, forwards fixed pseudo-inputs
        h, res = stage.forward(x), None
        stage.stats.work["forward"] += len(y)  # counted by flops.train_flops
    if stage.router is not None:
        keep = stage.router.keep(stage.decode(h), res, y, stage.stats.work)  # cut in the wire form
        h, y, ids = h[keep], y[keep], ids[keep]
    if len(y):
        yield h, y, ids


def feed_chain(stages: list, flow: list, log=None) -> list:
    """One incoming batch (or routed pieces of it) through consecutive stages, in order: each stage
    trains (or forwards, if frozen) and passes on what it does not route away."""
    for s in stages:
        flow = [out for item in flow for out in feed(s, *item, log)]
    return flow


def drain_chain(stages: list, log=None) -> list:
    """Epoch end with routing: each stage in turn takes what the stage before it drained, then
    trains on its own remainder. Returns what the last stage passes on."""
    flow: list = []
    for s in stages:
        flow = [out for item in flow for out in feed(s, *item, log)] + list(drain(s, log))
    return flow
