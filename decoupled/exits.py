"""Early-exit inference (QuickNets section 3.3) and the exit curve: accuracy vs inference cost.

A sample leaves at the first exit whose normalised-entropy confidence is >= threshold t and whose
commitment logit is > 0 (exits without a trained commitment head: confidence alone). When no exit
passes, the most confident exit answers (the paper's rule; fallback="last": the last exit). A
sample that passes nowhere has run every block and head, so it costs the whole network whichever
exit answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch

from .data import Split, batches
from .engine.evaluate import eval_stages
from .flops import exit_flops, stage_costs
from .objectives.quicknet import confidence

# thresholds of the default sweep: normalised-entropy confidence crowds near 1 on trained exits
THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)


def uses_commitment(stage) -> bool:
    """The exit's commitment head takes part in the exit rule once it has been trained."""
    return stage.objective.commitment_ready


@dataclass
class ExitOutputs:
    """Every exit's answer for every sample: (exits, N) tensors, and the labels (N,)."""
    conf: torch.Tensor
    commit: torch.Tensor  # +inf where an exit has no trained commitment head
    pred: torch.Tensor
    y: torch.Tensor


def wanted(cfg) -> bool:
    """The early-exit curve is what QuickNets are for: every trainer reports it for them."""
    return cfg.objective.name == "quicknet"


class ExitRecorder:
    """Every exit's answer, batch by batch, for the blocks that see the batches: the `on_exit` hook
    of engine/evaluate.eval_stages. In one process that is every block; on a rank, its own blocks
    (their parts are joined on rank 0 with `concat`)."""

    def __init__(self):
        self.ids: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.rows: dict[int, list[tuple]] = {}  # block index -> per batch (conf, commit, pred)

    def batch(self, ids: torch.Tensor, y: torch.Tensor) -> None:
        self.ids.append(ids)
        self.y.append(y)

    def __call__(self, s, h: torch.Tensor, logits: torch.Tensor) -> None:
        c = confidence(logits)
        m = s.objective.commitment(s.decode(h)).float() if uses_commitment(s) else torch.full_like(c, float("inf"))
        self.rows.setdefault(s.index, []).append((c, m, logits.argmax(-1)))  # on the device: no sync per batch

    def outputs(self) -> ExitOutputs:
        """Blocks in index order, samples in id order (however the batches arrived)."""
        order = torch.cat(self.ids).cpu().argsort()
        blocks = [self.rows[j] for j in sorted(self.rows)]

        def part(k: int) -> torch.Tensor:
            return torch.stack([torch.cat([r[k] for r in rows]).cpu()[order] for rows in blocks])

        return ExitOutputs(part(0), part(1), part(2), torch.cat(self.y).cpu()[order])


def concat(parts: list[ExitOutputs]) -> ExitOutputs:
    """Consecutive blocks' outputs (ranks in order) as one network's."""
    return ExitOutputs(*(torch.cat([getattr(p, k) for p in parts]) for k in ("conf", "commit", "pred")),
                       parts[0].y)


@torch.no_grad()
def collect(stages, split: Split, batch_size: int, device: torch.device) -> ExitOutputs:
    rec = ExitRecorder()
    for b in batches(split, batch_size, shuffle=False):
        rec.batch(b.ids, b.y)
        eval_stages(stages, b.x.to(device), b.y.to(device), 0.0, {}, rec)
    return rec.outputs()


def block_costs(stages, flop_batch: int) -> list[tuple[float, float, float]]:
    """Per block, what the exit curve charges (flops.py): its share of reaching and deciding at any
    later exit, its forward, and its exit head. Computed where the block lives; joined by listing."""
    costs = [stage_costs(s, flop_batch) for s in stages]
    return [(exit_flops(s, uses_commitment(s), flop_batch), c["forward"], c["exit"]) for s, c in zip(stages, costs)]


def choose_exit(conf: torch.Tensor, commit: torch.Tensor, threshold: float,
                fallback: str = "confident") -> tuple[torch.Tensor, torch.Tensor]:
    """(exits, N) confidences and commitment logits -> (N,) exit index and (N,) whether an exit
    passed (False: the fallback answered)."""
    passed = (conf >= threshold) & (commit > 0)
    any_pass = passed.any(0)
    first = passed.to(torch.uint8).argmax(0)  # argmax returns the first maximum: the earliest exit
    other = conf.argmax(0) if fallback == "confident" else torch.full_like(first, conf.size(0) - 1)
    return torch.where(any_pass, first, other), any_pass


def exit_curve(outs: ExitOutputs, cum_flops: list[float], thresholds, fallback: str = "confident") -> list[dict]:
    """For each threshold: test accuracy, average inference FLOPs per sample, share of samples
    answered by each exit, and share answered by the fallback."""
    cost = torch.tensor(cum_flops, dtype=torch.float64)
    n_exits, rows = outs.conf.size(0), []
    for t in thresholds:
        exit_idx, passed = choose_exit(outs.conf, outs.commit, t, fallback)
        pred = outs.pred.gather(0, exit_idx[None])[0]
        flops = torch.where(passed, cost[exit_idx], cost[-1])
        rows.append({"threshold": float(t), "accuracy": float((pred == outs.y).double().mean()),
                     "avg_flops": float(flops.mean()),
                     "exit_fraction": (torch.bincount(exit_idx, minlength=n_exits).double() / len(exit_idx)).tolist(),
                     "fallback_fraction": float((~passed).double().mean())})
    return rows


def plot(curve: list[dict], exit_points: list[tuple[float, float]], path: Path, title: str = "") -> None:
    """Accuracy vs average inference cost; the single exits (every sample leaves there) as points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [r["avg_flops"] / 1e6 for r in curve], [100 * r["accuracy"] for r in curve]
    ax.plot(xs, ys, "o-", label="early exit, threshold sweep")
    for r, x, y in zip(curve, xs, ys):
        ax.annotate(f"{r['threshold']:g}", (x, y), fontsize=6, textcoords="offset points", xytext=(3, -8))
    ax.plot([f / 1e6 for f, _ in exit_points], [100 * a for _, a in exit_points], "s", label="single exit j")
    ax.set_xlabel("average inference MFLOPs per sample")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "exit curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(outs: ExitOutputs, costs: list[tuple[float, float, float]], thresholds, fallback: str,
           layer_acc: list[float], png: Path | None = None, title: str = "") -> tuple[list[dict], list[float]]:
    """The exit curve of `outs`, and each exit's inference FLOPs under the exit rule (every block,
    exit and used commitment head up to it), from `block_costs`; plotted to `png` when given."""
    cum = list(accumulate(c[0] for c in costs))
    curve = exit_curve(outs, cum, sorted(set(thresholds)), fallback)
    if png is not None:  # every sample leaves at exit j: blocks up to j and that one head
        reach = accumulate(c[1] for c in costs)
        single = [blocks + c[2] for blocks, c in zip(reach, costs)]
        plot(curve, list(zip(single, layer_acc)), png, title)
    return curve, cum
