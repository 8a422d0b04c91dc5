"""`decoupled bench`: every way to train one model split, measured side by side on the same cores.
A package beside the library: it imports the library, never the reverse (cli.py wires the
subcommand lazily). runner.py runs processes (shared with analysis/ablate.py), rows.py defines and
reads the rows, report.py writes bench.md / bench.png, sweep.py the depth sweep, stages.py,
dataparallel.py and gpipe.py are the workers it launches (strategies.py: how each data-parallel row
wraps the network; knobs.py: their bench flags), split.py the pipelines' split search."""
from .cli import add_parser, main
from .rows import DEFAULT_ROWS, ROWS, bench, bound, bound_samples_per_s, pipeline_row
from ..plan.model import best_split
from .runner import median, timed
from .sweep import parse_lists

__all__ = ["add_parser", "main", "DEFAULT_ROWS", "ROWS", "best_split", "bench", "bound", "bound_samples_per_s",
           "pipeline_row", "median", "timed", "parse_lists"]
