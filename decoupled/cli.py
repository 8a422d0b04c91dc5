"""`decoupled train ...`: the one entry point, the same under python -m, the console script,
torchrun and launch/train.py."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import FALLBACKS, ConfigError, load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decoupled", description="Decoupled / layer-wise parallel training.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a network (mode, model, objective from the config)")
    t.add_argument("--config", help="TOML config file (default: small MLP on the embedded digits data)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=3 (repeatable)")
    t.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>)")
    t.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR from the last epoch every rank completed; its config.toml "
                        "is the base, --config/--set given here win (e.g. --set train.epochs=4 to extend)")
    e = sub.add_parser("eval", help="early-exit evaluation of a finished run: per-exit accuracy and the exit "
                                    "curve (accuracy vs inference FLOPs) into its summary.json and exit_curve.png")
    e.add_argument("--run", type=Path, required=True, metavar="DIR", help="the run directory")
    e.add_argument("--thresholds", metavar="T1,T2,...",
                   help="confidence thresholds to sweep (default: 0..1, denser near 1)")
    e.add_argument("--fallback", choices=FALLBACKS,
                   help="who answers when no exit passes (default: the run's objective.exit_fallback)")
    from .bench import add_parser as add_bench  # `decoupled bench ...`: every baseline side by side
    add_bench(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "eval":
        return _eval(args)
    if args.command == "bench":
        from .bench import main as bench_main
        try:
            return bench_main(args)
        except ConfigError as e:
            return _fail(f"config error: {e}", 2)
    try:
        if args.resume:
            if args.out and args.out != args.resume:
                raise ConfigError("--out and --resume name different folders; a resumed run stays in its folder")
            base = args.resume / "config.toml"
            if not base.is_file():
                raise ConfigError(f"--resume {args.resume}: no config.toml there; is it a run directory?")
            cfg = load(base, [], validate_now=False)
            if args.config:
                cfg = load(args.config, [], base=cfg, validate_now=False)
            cfg = load(None, args.overrides, base=cfg)
            out = args.resume
        else:
            cfg = load(args.config, args.overrides)
            out = args.out
        resume: bool | str = bool(args.resume)
        if not resume and out and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            resume = "auto"  # torchrun --max-restarts restarted us: pick up our own checkpoints
        from .console import format_summary  # heavy imports after validation
        from .train import train
        summary = train(cfg, out, resume=resume)
    except ConfigError as e:
        return _fail(f"config error: {e}", 2)
    except Exception as e:  # noqa: BLE001 - a training failure: say what, exit non-zero
        from .checkpoint import CheckpointError
        from .engine.stage import NonFiniteError
        from .engine.dist.transport import PeerError
        if not isinstance(e, (PeerError, NonFiniteError, CheckpointError)):
            raise
        return _fail(f"error: {e}", 1)
    if summary is not None:  # rank 0
        print(format_summary(summary))
        print(f"run directory: {summary['run_dir']}")
    return 0


def _eval(args) -> int:
    try:
        thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else None
    except ValueError:
        return _fail(f"--thresholds {args.thresholds!r}: expected comma-separated numbers, e.g. 0.5,0.9,0.99", 2)
    from .rescore import evaluate_run
    try:
        summary = evaluate_run(args.run, thresholds, args.fallback)
    except ConfigError as e:
        return _fail(f"config error: {e}", 2)
    print(f"{'threshold':>9} {'accuracy':>8} {'MFLOPs':>8}  exit fractions")
    for r in summary["exit_curve"]:
        print(f"{r['threshold']:9.3f} {r['accuracy']:8.4f} {r['avg_flops'] / 1e6:8.4f}  "
              + " ".join(f"{f:.3f}" for f in r["exit_fraction"]))
    print(f"exit curve: {args.run / 'summary.json'} and {args.run / 'exit_curve.png'}")
    return 0


def _fail(message: str, code: int) -> int:
    print(f"decoupled: {message}", file=sys.stderr)
    if "WORLD_SIZE" in os.environ:
        # Under torchrun a peer may be gone: exit now rather than risk a hang in process-group or
        # thread teardown at interpreter exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
