"""What a run says while it trains: one line per epoch (and per evaluation) on stdout, and the same
numbers as TensorBoard scalars (log.tensorboard).

Every process speaks for itself: single-process modes print one line per epoch, each torchrun rank
one line per epoch for its stage group, prefixed `[rank r]`, written whole and flushed, so lines of
different ranks never mix and a cluster log file shows them as they happen. `train.quiet = true`
silences them. Training losses are summed on the device (`add_loss`, no host sync per step) and
read once at the epoch end.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .job import ConfigError, JobConfig

TB_INSTALL = "pip install -e '.[tb]'  (or: pip install tensorboard)"


def require_tensorboard(cfg: JobConfig) -> None:
    """log.tensorboard needs the optional `tensorboard` package: say so before anything trains."""
    if not cfg.log.tensorboard:
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(f"log.tensorboard=true needs the tensorboard package, which is not installed: "
                          f"{TB_INSTALL}; or set log.tensorboard=false") from None


def _accs(accs: dict) -> str:
    return " ".join(f"b{int(j)}={a:.4f}" for j, a in sorted(accs.items(), key=lambda kv: int(kv[0])))


class Live:
    def __init__(self, cfg: JobConfig, out: Path | None, rank: int, distributed: bool):
        self.quiet = cfg.train.quiet
        self.prefix = f"[rank {rank}] " if distributed else ""
        self.loss_sum: dict[int, torch.Tensor] = {}
        self.loss_steps: dict[int, int] = {}
        self.memory = None  # PeakMemory, set by run_job.py once it exists
        self.bar = None  # the terminal's progress bar, if one is shown
        self.shown: dict[int, torch.Tensor] = {}  # latest loss per block, for the progress bar
        self.t0 = time.perf_counter()  # start of the current epoch
        self.marks: dict[str, float] = {}  # cumulative counters at the last epoch end
        self.pending: tuple[int, str] | None = None  # a rank's epoch line waiting for its evaluation
        self.writer = None
        if cfg.log.tensorboard and out is not None:
            require_tensorboard(cfg)
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tb" / f"rank{rank}"))

    def start(self, stages) -> None:
        """Training starts now, from these stages' counters (a resumed run's samples are not this epoch's)."""
        self.t0 = time.perf_counter()
        for s in stages:
            self.marks[f"samples{s.index}"] = s.stats.samples

    # ------------------------------------------------------------------ per step (hot path)
    def add_loss(self, block: int, loss: torch.Tensor) -> None:
        d = loss.detach().float()
        s = self.loss_sum.get(block)
        self.loss_sum[block] = d if s is None else s + d  # stays on the device
        self.loss_steps[block] = self.loss_steps.get(block, 0) + 1
        self.shown[block] = d  # the latest loss of every block, read only when the bar redraws

    def bar_text(self) -> str:
        """The progress bar's postfix: every block's latest loss. Called by the bar itself each time it
        redraws (tqdm throttles the redraws, at most every 0.1 s): what it shows never depends on how
        fast the epoch runs, and the losses are read from the device only then."""
        if not self.shown:
            return ""
        return "loss " + " ".join(f"b{j}={float(v):.3f}" for j, v in sorted(self.shown.items()))

    def take_losses(self) -> dict[int, float]:
        """Mean training loss per block since the last call (one read per block)."""
        out = {j: float(s) / self.loss_steps[j] for j, s in sorted(self.loss_sum.items())}
        self.loss_sum.clear()
        self.loss_steps.clear()
        return out

    def _delta(self, key: str, value: float) -> float:
        d = value - self.marks.get(key, 0.0)
        self.marks[key] = value
        return d

    def say(self, text: str) -> None:
        if not self.quiet:  # one write per line: lines of ranks sharing a pipe or file never mix
            sys.stdout.write(self.prefix + text + "\n")
            sys.stdout.flush()

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                if v is not None:
                    self.writer.add_scalar(tag, float(v), step)
            self.writer.flush()

    def _common(self, stages, seconds: float, samples: float) -> dict:
        tb = {"throughput/samples_per_s": samples / seconds if seconds > 0 else 0.0, "time/epoch_s": seconds}
        for s in stages:
            tb[f"lr/block{s.index}"] = s.optimizer.param_groups[0]["lr"]
        peak = self.memory.peak_bytes() if self.memory is not None else None
        if peak is not None:
            tb["memory/peak_mib"] = peak / 2 ** 20
        return tb

    # ------------------------------------------------------------------ single-process modes
    def epoch(self, epoch: int, total: int, stages, ev: dict | None, block: int | None = None) -> None:
        now = time.perf_counter()
        seconds, self.t0 = now - self.t0, now
        samples = max(self._delta(f"samples{s.index}", s.stats.samples) for s in stages)
        losses = self.take_losses()
        tb = self._common(stages, seconds, samples)
        tb.update({f"loss/block{j}": v for j, v in losses.items()})
        where = f"block {block} " if block is not None else ""
        line = f"{where}epoch {epoch + 1}/{total}  loss {_accs(losses)}"
        if ev is not None:
            accs = {s.index: a for s, a in zip(stages, ev["layer_acc"])}
            tb.update({f"test_acc/block{j}": a for j, a in accs.items()})
            tb["test_acc/ensemble"] = ev["ensemble_acc"]
            line += f"  test_acc {_accs(accs)} (ensemble {ev['ensemble_acc']:.4f})"
        line += f"  {tb['throughput/samples_per_s']:.0f} samples/s  {seconds:.2f}s"
        self.say(line)
        self.scalars(epoch + 1, tb)

    # ------------------------------------------------------------------ a torchrun rank
    def rank_epoch(self, epoch: int, total: int, stages, metrics: dict, replay: dict | None,
                   eval_follows: bool = False) -> None:
        """eval_follows: an evaluation of this epoch comes next; its accuracies join this line."""
        self.flush()
        now = time.perf_counter()
        seconds, self.t0 = now - self.t0, now
        samples = max(self._delta(f"samples{s.index}", s.stats.samples) for s in stages)
        losses = self.take_losses()
        compute = self._delta("compute", metrics["compute_s"])
        comm = self._delta("comm", metrics["comm_s"])
        idle = self._delta("idle", metrics["idle_s"])
        tb = self._common(stages, seconds, samples)
        tb.update({f"loss/block{j}": v for j, v in losses.items()})
        tb.update({"time/compute_s": compute, "time/comm_s": comm, "time/idle_s": idle})
        share = (lambda x: 100 * x / seconds) if seconds > 0 else (lambda x: 0.0)
        no_loss = "(no steps)" if any(s.training for s in stages) else "(budget done)"
        line = (f"epoch {epoch + 1}/{total}  loss {_accs(losses) or no_loss}  "
                f"{tb['throughput/samples_per_s']:.0f} samples/s  compute {share(compute):.0f}%  "
                f"blocked {share(comm):.0f}%  idle {share(idle):.0f}%")
        if replay is not None:
            dropped = self._delta("dropped", replay["dropped"])
            line += (f"  buffer {replay['occupancy_mean']:.1f} (max {replay['occupancy_max']})  "
                     f"dropped {dropped:.0f}  staleness {replay['staleness_mean']:.1f} (max {replay['staleness_max']})")
            tb.update({f"replay/{k}": v for k, v in replay.items() if isinstance(v, (int, float))})
        self.scalars(epoch + 1, tb)
        self.pending = (epoch, line)
        if not eval_follows:
            self.flush()

    def rank_eval(self, epoch: int, layer_acc: dict, ensemble: float | None) -> None:
        acc = f"test_acc {_accs(layer_acc)}" + (f" (ensemble {ensemble:.4f})" if ensemble is not None else "")
        if self.pending is not None and self.pending[0] == epoch:
            e, line = self.pending
            self.pending = (e, line.replace("  loss ", f"  {acc}  loss ", 1))
            self.flush()
        else:
            self.flush()
            self.say(f"eval after epoch {epoch + 1}  {acc}")
        tb = {f"test_acc/block{j}": a for j, a in layer_acc.items()}
        if ensemble is not None:
            tb["test_acc/ensemble"] = ensemble
        self.scalars(epoch + 1, tb)

    def flush(self) -> None:
        """Print a rank's epoch line that waited for its evaluation."""
        if self.pending is not None:
            self.say(self.pending[1])
            self.pending = None

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
