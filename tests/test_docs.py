"""The documentation stays navigable: the README is a short front page (at most 15 kB) that links into
docs/, and every relative link in README.md and docs/ (anchors included) lands on something that exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchrun_utils import REPO

PAGES = [REPO / "README.md", REPO / "tests" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(path: Path) -> str:
    """The page without its code blocks (a `# comment` in a bash block is no heading, a[i](j) no link)."""
    return FENCE.sub("", path.read_text())


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.*?)\s*$", _prose(path), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_readme_is_a_front_page():
    size = (REPO / "README.md").stat().st_size
    assert size <= 15_000, f"README.md is {size} bytes: move detail into docs/ (limit 15000)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked offline
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_reachable_from_the_readme():
    """No orphan page: each docs/ file is linked from the README or from a page the README links to."""
    seen, todo = set(), [REPO / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.exists():
            continue
        seen.add(page)
        todo += [(page.parent / t.partition("#")[0]).resolve() for t in LINK.findall(_prose(page))
                 if not re.match(r"[a-z]+:", t) and t.partition("#")[0]]
    orphans = [str(p.relative_to(REPO)) for p in PAGES if p.resolve() not in seen]
    assert not orphans, f"pages no link reaches from README.md: {orphans}"


def test_quick_start_lines_are_marked_once():
    """.ci/run greps the `# tests` line and test_cli runs the `# main job` line: each must exist once."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert sum(bool(re.search(r"#\s*main job$", ln)) for ln in lines) == 1
    tests = [ln for ln in lines if re.search(r"# tests$", ln)]
    assert len(tests) == 1 and "pytest" in tests[0], tests


def _names(text: str, field: str) -> bool:
    """`field`, "field", `ranks[].field`, `layers[]`, `exit_curve: [...]`: the field in code or quotes."""
    return bool(re.search(rf"[`\"]([\w\[\].]*\.)?{re.escape(field)}(\[\])?(\.[\w\[\].]*)?[`\":]", text))


def test_summary_and_metrics_fields_are_documented(tmp_path):
    """summary.json and metrics.jsonl fields are public interface: every field a run writes is named
    in docs/ (docs/outputs.md, or the page of the feature that adds it)."""
    import json
    from decoupled.job import load
    from decoupled.run_job import train
    s = train(load(None, ["model.widths=[16,16]", "train.epochs=1", "data.limit_train=256", "train.quiet=true"]),
              tmp_path)
    fields = set(s) | {k for layer in s["layers"] for k in layer} | {k for rank in s["ranks"] for k in rank}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    docs = "".join(p.read_text() for p in PAGES)  # code blocks included: the summary's schema is one
    missing = sorted(f for f in fields | kinds if not _names(docs, f))
    assert not missing, f"fields a run writes that no docs page names: {missing}"


# Pages that describe the code as it is (results/ and the dated GPU review describe it as it was).
GUIDES = [REPO / "README.md", REPO / "tests" / "README.md",
          *[p for p in sorted((REPO / "docs").glob("*.md")) if p.name != "gpu-path-review.md"]]
PATH = re.compile(r"`((?:decoupled|engine|objectives|config|models|bench|tests|launch|analysis)/[^`\s]*)`")
EXAMPLES = {"decoupled/objectives/smoothed.py"}  # the file docs/extending.md walks through writing


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: str(p.relative_to(REPO)))
def test_code_paths_named_in_the_guides_exist(page):
    """A file, folder or test the guides name (`decoupled/engine/stage.py`, `engine/ranks/`,
    `tests/test_engine.py::test_x`) exists: when code moves, the page that points at it must follow."""
    missing = []
    for name in PATH.findall(page.read_text()):
        path, _, test = name.partition("::")
        full = REPO / path if path.split("/")[0] in ("decoupled", "tests", "launch", "analysis") else \
            REPO / "decoupled" / path
        if path in EXAMPLES or "{" in path or "<" in path:  # a pattern (rank{r}), not a path
            continue
        if not full.exists():
            missing.append(name)
        elif test and f"def {test.split('[')[0]}(" not in full.read_text():
            missing.append(f"{name} (no such test)")
    assert not missing, f"{page.relative_to(REPO)} names what does not exist: {missing}"
