"""What a run prints on the terminal: the summary, readable."""
from __future__ import annotations

from .metrics import mib_text


def format_summary(summary: dict) -> str:
    lines = [f"{summary['mode']} / {summary['objective']} / {summary['model']} on {summary['dataset']}, "
             f"{summary['world_size']} rank(s): {summary['wall_s']:.1f}s"]
    for layer in summary["layers"]:
        lines.append(f"  block {layer['block']}: test_acc {layer['test_acc']:.4f}  "
                     f"train_samples {layer['train_samples']}  epochs {layer['epochs']}")
    lines.append(f"  ensemble test_acc {summary['ensemble_test_acc']:.4f}")
    if "train_flops" in summary:
        lines.append(f"  train FLOPs {summary['train_flops']:.4g}")
    for r in summary.get("exit_curve", []):
        lines.append(f"  early exit t={r['threshold']:g}: test_acc {r['accuracy']:.4f}  "
                     f"{r['avg_flops'] / 1e6:.4f} MFLOPs/sample  exits {[round(f, 3) for f in r['exit_fraction']]}")
    for r in summary["ranks"]:
        line = (f"  rank {r['rank']} (blocks {r['blocks']}): "
                f"peak_mem {mib_text(r['peak_mem_bytes'])} ({r.get('mem_method')})  "
                f"{r['samples_per_s']:.0f} samples/s")
        if "comm_s" in r:
            line += f"  compute {r['compute_s']:.2f}s  comm {r['comm_s']:.2f}s  idle {r['idle_s']:.2f}s"
        lines.append(line)
    return "\n".join(lines)
