"""End-to-end backprop, the baseline: all blocks and the last block's head, one optimizer, one loss.

The loss is the papers' "global" baseline whatever the local objective: cross-entropy of the last
head's prediction (predsim: the head's `pred` branch; quicknet: its exit), train.e2e_loss = "ce";
"local" backpropagates the objective's own loss end to end instead. train.activation_checkpointing
recomputes each block's activations in the backward pass (torch.utils.checkpoint per block).

Per-layer accuracies of an end-to-end network are measured the way Marquez et al. 2018 do: after
training, every intermediate head is fitted on the frozen features (train.probe_epochs).
Early stopping and plateau LR decay (train.patience, train.plateau_factor) as for QuickNets, on the
last head's validation cross-entropy when data.val_fraction > 0, else the epoch-mean training loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data import batches, num_batches, resolve_augment
from ..engine.run import Run
from ..objectives import LocalOutput
from ..optim import build_optimizer, build_scheduler
from .. import modes
from .base import Trainer
from .epoch_policy import monitored_loss


class E2E(modes.E2E, Trainer):
    def train(self, run: Run, start_epoch: int = 0) -> None:
        cfg, stages = run.cfg, run.stages
        last = stages[-1]
        params = [p for s in stages for p in s.block.parameters()] + list(last.objective.local_parameters())
        opt = build_optimizer(params, cfg.optim, cfg.optim.lr)
        self.watch("e2e", opt, build_scheduler(opt, cfg.optim, cfg.train.epochs))
        scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.train.precision == "fp16")
        torch.manual_seed(cfg.train.seed)  # e2e has one RNG stream (dropout) for the whole network
        last_epoch = cfg.train.epochs - 1
        for epoch in range(start_epoch, cfg.train.epochs):
            loss = self.epoch(run, epoch, opt, scaler)
            for s in stages:
                s.end_epoch(step_scheduler=False)  # the stages' own optimizers are unused here
            stopped = self.after_epoch("e2e", lambda: monitored_loss(run, last, loss))
            if stopped:
                last_epoch = epoch
            if epoch < last_epoch:  # the last epoch is evaluated after the probes
                run.end_epoch(epoch)
            if stopped:
                break
        fit_probes(run)
        run.end_epoch(last_epoch)

    def epoch(self, run: Run, epoch: int, opt, scaler) -> float:
        """One epoch of the whole network on the e2e loss; returns its mean training loss."""
        cfg, stages, last = run.cfg, run.stages, run.stages[-1]
        total = torch.zeros((), device=run.device)
        steps = num_batches(len(run.data.train), cfg.data.batch_size)
        with run.progress(steps, f"e2e epoch {epoch + 1}/{cfg.train.epochs}") as bar:
            for b in batches(run.data.train, cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
                             augment=resolve_augment(cfg.data)):
                h, y = run.to_device(b.x, b.y)
                with last.precision.autocast():  # train.precision, as the stages use it
                    for s in stages:
                        s.block.train()
                        s.outlet.train()
                        if cfg.train.activation_checkpointing:  # keep only block inputs; recompute in backward
                            h = checkpoint(s.block, h, use_reentrant=False)
                        else:
                            h = s.block(h)
                        h = s.outlet(h)  # the dropout that model.dropout_position moved out of the block
                    last.objective.train()
                    res = e2e_loss(last.objective, h, y, cfg.train.e2e_loss)
                opt.zero_grad(set_to_none=True)
                scaler.scale(res.loss).backward()
                scaler.step(opt)
                scaler.update()
                total += res.loss.detach() * len(y)
                for s in stages:
                    s.stats.samples += len(y)
                    s.stats.steps += 1
                run.log_step(epoch, last, res, y)
                run.after_source_step(epoch, epoch * steps + b.step + 1)  # train.eval_every_steps
                bar.update()
        return float(total) / len(run.data.train)


def e2e_loss(objective, h: torch.Tensor, y: torch.Tensor, which: str) -> LocalOutput:
    """train.e2e_loss: "ce" = cross-entropy of the head's prediction (the head's forward: predsim's
    `pred` branch, quicknet's exit), the same for every objective; "local" = the objective's loss."""
    if which == "local":
        return objective(h, y)
    logits = objective.head(h)
    loss = F.cross_entropy(logits, y)
    with torch.no_grad():
        conf, pred = logits.detach().softmax(-1).max(-1)
    return LocalOutput(loss, logits, pred, conf)


def fit_probes(run: Run) -> None:
    """Train each intermediate head on its block's frozen features; blocks do not change."""
    cfg = run.cfg
    for s in run.stages[:-1]:
        opt = build_optimizer(s.objective.local_parameters(), cfg.optim, cfg.optim.lr)
        for epoch in range(cfg.train.probe_epochs):
            for b in batches(run.data.train, cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch):
                h, y = run.to_device(b.x, b.y)
                with torch.no_grad():
                    for t in run.stages[: s.index + 1]:
                        h = t.forward(h)
                        t.stats.work["forward"] += len(y)  # frozen features: counted as training work
                with s.rng:
                    s.objective.train()
                    res = e2e_loss(s.objective, s.decode(h), y, cfg.train.e2e_loss)
                    opt.zero_grad(set_to_none=True)
                    res.loss.backward()
                    opt.step()
                s.stats.work["exit_step"] += len(y)
        run.eval_fresh = False
        run.recorder.log(kind="probe", block=s.index, epochs=cfg.train.probe_epochs)
