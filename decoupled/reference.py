"""`python -m decoupled.reference [--check]`: write the key reference of every job setting into
docs/configuration.md, between its markers (config/reference.py renders it from the Config
dataclasses and their field comments); --check: exit 1 when the committed file is not current."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config.reference import spliced
from .job import SCHEMA

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m decoupled.reference", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check that the file is current")
    p.add_argument("--path", type=Path, default=DOC)
    args = p.parse_args(argv)
    text = args.path.read_text() if args.path.is_file() else ""
    want = spliced(SCHEMA, text)
    if args.check:
        if text != want:
            print(f"{args.path}: the key reference is out of date; run python -m decoupled.reference", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
