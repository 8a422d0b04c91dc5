"""Training and inference cost in FLOPs, on one scale for every trainer.

Counted by torch.utils.flop_counter.FlopCounterMode: matrix multiplies and convolutions (mm, addmm,
bmm, convolution and their backward passes) at 2 FLOPs per multiply-add, forward and backward exactly
as autograd runs them; so a block whose input is detached (every layer-wise trainer) computes no
input gradient and is not charged for one, while block j > 0 of an end-to-end network is.
Not counted: elementwise work (activations, BatchNorm, pooling, bias adds, softmax, losses), the
optimizer update and data movement; for MLPs and CNNs the matmuls/convolutions dominate.

Each count runs on a copy of the block and objective on the meta device: no real arithmetic, and
the real weights, BatchNorm statistics and RNG streams are untouched. Counting a whole batch and
dividing by its size keeps batch-coupled terms (predsim's similarity matrices) exact. A stage's
architecture never changes, so its counts are kept (per stage and batch size) once made.

train_flops(stage) = stage.stats.samples x (local step: block + exit forward and backward)
                     + sum over stage.stats.work[kind] x (that kind's per-sample cost)
where the trainers count `work`: forwards of frozen blocks that make cached pseudo-inputs or route
samples, commitment-head steps (QuickNet), exit-head steps on frozen features (e2e probes).
Test-set evaluation is not training and is not counted.
"""
from __future__ import annotations

import copy
import weakref
from itertools import accumulate

import torch

META = torch.device("meta")
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # stage -> {batch: costs}


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode  # imported on use: it costs every rank's start-up ~0.2 s
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _meta(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to(META)


def stage_costs(stage, batch: int = 64) -> dict[str, float]:
    """Per-sample FLOPs of every kind of work on one stage (see the module docstring).

    step:        train-mode block + objective loss, forward + backward, block input detached
    e2e_step:    the block's piece of end-to-end backprop: forward + backward, with the gradient of
                 its input for every block after the first
    e2e_head:    the loss head's piece (last block only): forward + backward into the block output
    forward:     eval-mode block forward;  exit / commit: eval-mode exit / commitment head forward
    exit_step / commit_step: that head's forward + backward on detached features"""
    batch = max(batch, 2)  # train-mode BatchNorm1d refuses a batch of one
    kept = _KEPT.setdefault(stage, {})
    if batch not in kept:
        kept[batch] = _count_stage(stage, batch)
    return kept[batch]


def _count_stage(stage, batch: int) -> dict[str, float]:
    block, obj = _meta(stage.block), _meta(stage.objective)
    x = torch.zeros((batch, *stage.in_shape), device=META)
    y = torch.zeros(batch, dtype=torch.long, device=META)
    h = torch.zeros((batch, *stage.out_shape), device=META)
    has_commit = obj.has_commitment  # declared by the objective

    def train_piece(input_grad: bool, with_head: bool):
        block.train(), obj.train()
        out = block(x.clone().requires_grad_(input_grad))
        (obj(out, y).loss if with_head else out.sum()).backward()  # sum: its backward is not counted

    def e2e_head():
        obj.train()
        obj(h.clone().requires_grad_(True), y).loss.backward()

    def head_step(fn):
        obj.train()
        fn(h).sum().backward()

    with torch.no_grad():
        block.eval(), obj.eval()
        fwd = count_flops(lambda: block(x))
        exit_fwd = count_flops(lambda: obj.head(h))
        commit_fwd = count_flops(lambda: obj.commitment(h)) if has_commit else 0
    costs = {
        "step": count_flops(lambda: train_piece(False, True)),
        "e2e_step": count_flops(lambda: train_piece(stage.index > 0, False)),
        "e2e_head": count_flops(e2e_head),
        "forward": fwd, "exit": exit_fwd, "commit": commit_fwd,
        "exit_step": count_flops(lambda: head_step(obj.head)),
        "commit_step": count_flops(lambda: head_step(obj.commitment)) if has_commit else 0,
    }
    return {k: v / batch for k, v in costs.items()}


def train_flops(stages, end_to_end: bool, num_blocks: int, batch: int = 64) -> list[float]:
    """Training FLOPs of each stage: its local steps (end-to-end steps when end_to_end) times the
    samples it trained on, plus its counted extra work. A function of the stages alone, so a
    rank of the distributed engine can report its own and rank 0 can add them up."""
    out = []
    for s in stages:
        c = stage_costs(s, batch)
        step = c["e2e_step"] + c["e2e_head"] * (s.index == num_blocks - 1) if end_to_end else c["step"]
        out.append(s.stats.samples * step + sum(n * c[kind] for kind, n in s.stats.work.items()))
    return out


def exit_flops(stage, uses_commit: bool, batch: int = 64) -> float:
    """One block's share of every later exit's inference cost: its eval-mode forward, its exit head
    and (where the exit rule uses it) its commitment head."""
    c = stage_costs(stage, batch)
    return c["forward"] + c["exit"] + (c["commit"] if uses_commit else 0.0)


def inference_flops(stages, commit: list[bool], batch: int = 64) -> list[float]:
    """Per exit: the FLOPs for one sample to reach and decide there, i.e. every block, exit head and
    (where used) commitment head up to and including that exit."""
    return list(accumulate(exit_flops(s, uses, batch) for s, uses in zip(stages, commit)))
