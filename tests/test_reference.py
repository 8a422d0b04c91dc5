"""The key reference in docs/configuration.md is generated from the config dataclasses' field
comments (python -m decoupled.reference) and is current."""
import dataclasses

from decoupled.config.reference import BEGIN, END, field_docs, spliced
from decoupled.job import CHOICES, SCHEMA, JobConfig
from decoupled.objectives.cascade import Cascade
from decoupled.reference import DOC, main


def test_committed_reference_is_current():
    assert main(["--check"]) == 0, "run: python -m decoupled.reference"


def test_every_key_is_in_the_reference():
    text = DOC.read_text().split(BEGIN, 1)[1].split(END, 1)[0]
    for s in dataclasses.fields(JobConfig):
        for cls in CHOICES.get(s.name, {}).values() or [type(getattr(JobConfig(), s.name))]:
            for f in dataclasses.fields(cls):
                assert f"`{s.name}.{f.name}`" in text


def test_field_comments_are_the_documentation():
    docs = field_docs(Cascade.Config)  # a nested plug-in Config: the comment block above, the one after
    assert docs["cascade_initial_epochs"].startswith("block j (0-based) trains")
    assert docs["cascade_epoch_increment"] == "extra epochs per block of depth (see above)"


def test_splice_keeps_the_rest_of_the_page():
    page = f"# Configuration\n\nintro\n\n{BEGIN}\nSTALE-TEXT\n{END}\n\nafter\n"
    out = spliced(SCHEMA, page)
    assert out.startswith("# Configuration\n\nintro\n\n") and out.endswith("\n\nafter\n") and "STALE-TEXT" not in out
    assert spliced(SCHEMA, "").count(BEGIN) == 1
