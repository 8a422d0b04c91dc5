"""`decoupled bench`: every way to train one model split, measured side by side on the same cores.
A package beside the library: it imports the library, never the reverse (cli.py wires the
subcommand lazily). launcher.py runs and supervises a job's processes (shared with analysis/ablate.py),
cluster.py emulates nodes joined by shaped links (--nodes, --link), resume.py reuses finished rows,
runner.py holds what the runs share, rows.py defines and reads the rows, report.py writes bench.md /
bench.png, sweep.py the depth sweep, stages.py, dataparallel.py and gpipe.py are the workers it
launches (strategies.py: how each data-parallel row wraps the network; knobs.py: their bench flags;
the pipelines' split search is decoupled/plan/model.py's best_split)."""
from .cli import add_parser, main
from .rows import DEFAULT_ROWS, ROWS, bench, bound, bound_samples_per_s, pipeline_row
from ..plan.model import best_split
from .runner import median, timed
from .sweep import parse_lists

__all__ = ["add_parser", "main", "DEFAULT_ROWS", "ROWS", "best_split", "bench", "bound", "bound_samples_per_s",
           "pipeline_row", "median", "timed", "parse_lists"]
