"""Early-exit inference (QuickNets section 3.3) and the exit curve: accuracy vs inference cost.

A sample leaves at the first exit whose normalised-entropy confidence is >= threshold t and whose
commitment logit is > 0 (exits without a trained commitment head: confidence alone). When no exit
passes, the most confident exit answers (the paper's rule; fallback="last": the last exit). A
sample that passes nowhere has run every block and head, so it costs the whole network whichever
exit answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Split, batches
from .flops import inference_flops, stage_costs
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


@torch.no_grad()
def collect(stages, split: Split, batch_size: int, device: torch.device) -> ExitOutputs:
    conf, commit, pred, ys = [], [], [], []
    for b in batches(split, batch_size, shuffle=False):
        h = b.x.to(device)
        c, m, p = [], [], []
        for s in stages:
            h = s.forward(h)
            logits = s.logits(h).float()
            c.append(confidence(logits))
            p.append(logits.argmax(-1))
            m.append(s.objective.commitment(h.float()).float() if uses_commitment(s)
                     else torch.full_like(c[-1], float("inf")))
        conf.append(torch.stack(c).cpu())
        commit.append(torch.stack(m).cpu())
        pred.append(torch.stack(p).cpu())
        ys.append(b.y)
    return ExitOutputs(torch.cat(conf, 1), torch.cat(commit, 1), torch.cat(pred, 1), torch.cat(ys))


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


def report(stages, split: Split, batch_size: int, device: torch.device, thresholds, fallback: str,
           layer_acc: list[float], png: Path | None = None, title: str = "",
           flop_batch: int = 64) -> tuple[list[dict], list[float]]:
    """The exit curve over `split`, and each exit's inference FLOPs under the exit rule (every
    block, exit and used commitment head up to it); plotted to `png` when given."""
    cum = inference_flops(stages, [uses_commitment(s) for s in stages], flop_batch)
    curve = exit_curve(collect(stages, split, batch_size, device), cum, sorted(set(thresholds)), fallback)
    if png is not None:
        blocks, single = 0.0, []  # every sample leaves at exit j: blocks up to j and that one head
        for s in stages:
            c = stage_costs(s, flop_batch)
            blocks += c["forward"]
            single.append(blocks + c["exit"])
        plot(curve, list(zip(single, layer_acc)), png, title)
    return curve, cum
