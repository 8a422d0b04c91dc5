"""Figures from run directories and bench folders (the code lives in decoupled/report/plots.py, so
the installed `decoupled report` uses it too; that command also writes a markdown page).

    python analysis/plots.py runs/ablate runs/bench_cpu --out plots/
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from decoupled.report.plots import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
