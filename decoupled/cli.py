"""`decoupled train ...`: the one entry point, the same under python -m, the console script,
torchrun and launch/train.py."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        from .train import default_out, format_summary, train  # heavy imports after validation
        out = out or default_out()
        summary = train(cfg, out, resume=bool(args.resume))
    except ConfigError as e:
        print(f"decoupled: config error: {e}", file=sys.stderr)
        return 2
    if summary is not None:  # rank 0
        print(format_summary(summary))
        print(f"run directory: {out}")
    return 0
