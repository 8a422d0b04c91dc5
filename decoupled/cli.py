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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        from .train import default_out, format_summary, train  # heavy imports after validation
        out = args.out or default_out()
        summary = train(cfg, out)
    except ConfigError as e:
        print(f"decoupled: config error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"run directory: {out}")
    return 0
