"""QuickNets (Patel & Siegelmann), Algorithm 1, in one process:

    T_0 = the whole training set
    for each block j:
        train block j and its exit on T_j with cross-entropy, until early stopping
        train its commitment head on T_j (block frozen; BCE on "the exit is right"), until early stopping
        L_j = the samples of T_j the exit counts as learned (QuickNet.learned)
        T_{j+1} = T_j - L_j

An epoch draws |T_j| samples with replacement, class-weighted (objectives/quicknet.py,
class_sample_weights), from a generator seeded by (seed, phase, block, epoch): runs are deterministic.
Early stopping and plateau LR decay of a block watch its exit's validation cross-entropy when
data.val_fraction > 0 (the whole validation split through blocks 0..j), else the epoch's mean
training loss; the commitment head's watch its training BCE (trainers/epoch_policy.py).

A frozen block's outputs over T_j are computed once, in eval mode, and kept as train.cache says:
they feed the commitment head, the learned mask and the next block (recompute: pushed through the
frozen blocks each time, as augmentation needs): engine/frozen.py, note [cache or recompute].
"""
from __future__ import annotations

import torch

from ..data import num_batches, resolve_augment
from ..engine.frozen import FrozenInputs, cache_mode
from ..engine.run import Run
from ..engine.stage import Stage
from ..objectives.quicknet import class_sample_weights
from ..optim import build_optimizer
from ..rng import generator
from .. import modes
from .base import Trainer
from .epoch_policy import monitored_loss


def draw(remaining: torch.Tensor, weights: torch.Tensor, seed: int, *names) -> torch.Tensor:
    """One epoch: |T_j| sample ids drawn with replacement with the class-balancing weights."""
    picks = torch.multinomial(weights, len(remaining), replacement=True, generator=generator(seed, "quicknet", *names))
    return remaining[picks]


@torch.no_grad()
def exit_pass(run: Run, s: Stage, feats: FrozenInputs, remaining: torch.Tensor, learned: bool) -> torch.Tensor:
    """Eval-mode pass of the frozen exit over T_j: (|T_j|,) bool, whether the exit is right, or
    (learned=True) whether it counts the sample as learned."""
    obj, y_all, parts = s.objective.eval(), run.data.train.y, []
    for ids in remaining.split(run.cfg.data.eval_batch_size):
        h, y = feats.get(ids), run.to_device(y_all[ids])[0]  # float32: FrozenInputs decodes
        out = obj(h, y)
        parts.append((obj.learned(out, obj.commitment(h), y) if learned else out.pred == y).cpu())
    s.stats.work["exit"] += len(remaining)
    if learned:
        s.stats.work["commit"] += len(remaining)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)



class QuickNet(modes.QuickNet, Trainer):
    def train(self, run: Run, start_epoch: int = 0) -> None:
        cfg, train = run.cfg, run.data.train
        where = cache_mode(cfg.train, cfg.data)
        counts0 = run.data.class_counts  # |T_0 ∩ c|
        remaining = torch.arange(len(train))  # T_j, as sample ids
        inputs = FrozenInputs(train.x, run.device, augment=resolve_augment(cfg.data))
        done = 0  # epochs of all blocks so far: names the checkpoints
        for s in run.stages:
            s.stats.info.update(train_set=len(remaining),
                          train_set_per_class=torch.bincount(train.y[remaining], minlength=len(counts0)).tolist())
            if len(remaining) == 0:  # everything learned: nothing left for this block
                s.stats.info.update(learned=0, commit_epochs=0)
                continue
            weights = class_sample_weights(train.y[remaining], counts0, cfg.objective.quicknet_balance)
            done = self.train_block(run, s, inputs, remaining, weights, done)
            path = run.out / "cache" / f"quicknet-block{s.index}.npy" if run.out else None
            feats = inputs.after(s, remaining, where, path, cfg.data.eval_batch_size)
            correct = torch.zeros(len(train), dtype=torch.bool)
            correct[remaining] = exit_pass(run, s, feats, remaining, learned=False)
            commit_epochs = self.train_commitment(run, s, feats, remaining, weights, correct)
            learned = exit_pass(run, s, feats, remaining, learned=True)
            s.stats.info.update(learned=int(learned.sum()), commit_epochs=commit_epochs,
                          train_correct=int(correct[remaining].sum()))
            run.recorder.log(kind="quicknet", block=s.index, train_set=len(remaining), learned=int(learned.sum()),
                             epochs=s.stats.epochs_done, commit_epochs=commit_epochs, train_samples=s.stats.samples,
                             epoch_samples=s.stats.epoch_samples)
            run.eval_fresh = False
            run.save_checkpoint(done - 1)  # now with the trained commitment head
            remaining = remaining[~learned]
            inputs = feats

    def train_block(self, run: Run, s: Stage, inputs: FrozenInputs, remaining: torch.Tensor, weights: torch.Tensor,
                    done: int) -> int:
        """Phase 1: block + exit on T_j until early stopping. Returns the epochs of all blocks so far."""
        cfg = run.cfg
        self.watch(f"block{s.index}", s.optimizer, s.stepper.scheduler)
        bs = cfg.data.batch_size
        for epoch in range(s.epochs):
            ids_all = draw(remaining, weights, cfg.train.seed, "block", s.index, epoch)
            g = generator(cfg.train.seed, "quicknet-augment", s.index, epoch) if inputs.augment else None
            total = torch.zeros((), device=run.device)
            with run.progress(num_batches(len(ids_all), bs), f"block {s.index} epoch {epoch + 1}/{s.epochs}") as bar:
                for ids in ids_all.split(bs):
                    y = run.to_device(run.data.train.y[ids])[0]
                    _, res = s.train_step(inputs.get(ids, g), y)
                    total += res.loss.detach() * len(ids)
                    run.log_step(epoch, s, res, y)
                    bar.update()
            loss = float(total) / len(ids_all)
            run.recorder.log(kind="quicknet_epoch", block=s.index, epoch=epoch, loss=loss, samples=len(ids_all),
                             lr=s.optimizer.param_groups[0]["lr"])
            # the monitored loss: the exit's validation loss when data.val_fraction, else `loss`
            stop = self.after_epoch(f"block{s.index}", lambda: monitored_loss(run, s, loss))
            s.end_epoch(step_scheduler=False)  # the epoch policy stepped the LR
            run.end_epoch(done, block=s.index)
            done += 1
            if stop:
                break
        return done

    def train_commitment(self, run: Run, s: Stage, feats: FrozenInputs, remaining: torch.Tensor, weights: torch.Tensor,
                         correct: torch.Tensor) -> int:
        """Phase 2: the commitment head alone, its own optimizer and early stopping, on the frozen
        block's features of T_j; target = whether the frozen exit predicts the sample right."""
        cfg, obj = run.cfg, s.objective
        opt = build_optimizer(obj.commit.parameters(), cfg.optim, cfg.optim.lr * cfg.optim.block_lr_decay ** s.index)
        self.watch(f"commit{s.index}", opt)
        for epoch in range(s.epochs):
            ids_all = draw(remaining, weights, cfg.train.seed, "commit", s.index, epoch)
            total = torch.zeros((), device=run.device)
            for ids in ids_all.split(cfg.data.batch_size):
                h = feats.get(ids)
                with s.rng:
                    _, loss = obj.commitment_step(h, correct[ids].to(run.device), opt)
                s.stats.work["commit_step"] += len(ids)
                total += loss * len(ids)
            loss = float(total) / len(ids_all)
            run.recorder.log(kind="commit_epoch", block=s.index, epoch=epoch, loss=loss, lr=opt.param_groups[0]["lr"])
            if self.after_epoch(f"commit{s.index}", lambda: loss):  # its training BCE
                break
        obj.commit_trained.fill_(True)
        return epoch + 1
