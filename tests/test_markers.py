"""The markers select what they say (pyproject.toml registers them; tests/README.md explains them):
`torchrun` is found from the tests' source (note [torchrun marker] in markers.py), `gpu` covers tests/gpu/."""
from __future__ import annotations

import subprocess
import sys

from markers import launching
from torchrun_utils import REPO, env


def _collected(*args: str) -> set[str]:
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                       env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 5), p.stdout[-3000:] + p.stderr[-3000:]  # 5: every test deselected
    return {line.split("[")[0] for line in p.stdout.splitlines() if "::" in line}


def test_torchrun_is_found_through_helpers_and_fixtures():
    found = launching(REPO / "tests" / "test_firstrun.py")
    # decoupled([... "--nproc-per-node" ...]) starts torchrun through the file's subprocess helper; the
    # helper itself launches nothing by itself
    assert {"test_tensorboard_scalars_async_ranks", "two_ranks"} <= found and "decoupled" not in found
    # names torch.distributed.run but only builds the command; trains in this process
    assert not {"test_strip_flag_and_the_shared_command", "test_single_process_lines_and_quiet"} & found


def test_markers_select_their_tests():
    """One collection (it imports torch: seconds): torchrun tests found through fixtures, by hand and
    directly; single-process ones left out; tests/gpu/ all gpu, and the gpu marker nowhere else."""
    got = _collected("-m", "torchrun or gpu", "tests/gpu", "tests/test_firstrun.py", "tests/test_cli.py",
                     "tests/test_engine.py")
    assert {"tests/test_firstrun.py::test_report_writes_figures_and_page",  # through the two_ranks fixture
            "tests/test_cli.py::test_torchrun_one_process",
            "tests/test_cli.py::test_readme_main_command",  # marked by hand: the command comes from the README
            "tests/test_engine.py::test_resume_extends_a_sync_run_bit_for_bit"} <= got, got
    assert not {"tests/test_cli.py::test_python_m", "tests/test_firstrun.py::test_strip_flag_and_the_shared_command",
                "tests/test_engine.py::test_sync_in_one_process_equals_simultaneous"} & got
    assert any(t.startswith("tests/gpu/") for t in got), got
