"""The lab notebooks: every `labs/NN_topic.py` is paired with an executed `labs/NN_topic.ipynb`.

nbval (run by `make test` over `labs/`) executes the .ipynb files; these tests make sure that what it executes is
what the .py sources say, that the committed notebooks carry their outputs, and that each lab follows the skeleton.
"""

from __future__ import annotations

import re
from pathlib import Path

import jupytext
import nbformat
import pytest

LABS = Path(__file__).resolve().parent.parent / "labs"
LAB_SOURCES = sorted(LABS.glob("[0-9][0-9]_*.py"))
FIX = "fix: run `make notebooks` (re-executes labs/NN_*.py into the paired .ipynb) and commit both files"
SKELETON = ("What you'll learn", "Build it", "Check it", "Play with it", "Summary", "Exercises")


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_labs():
    assert LAB_SOURCES, f"no labs/NN_topic.py found in {LABS}"


@pytest.mark.parametrize("source", LAB_SOURCES, ids=lambda p: p.name)
def test_pair_in_sync(source: Path):
    notebook = source.with_suffix(".ipynb")
    assert notebook.exists(), f"{notebook.name} is missing; {FIX}"
    text = jupytext.read(source)
    stored = nbformat.read(notebook, as_version=4)
    a, b = _cells(text), _cells(stored)
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        pytest.fail(f"{source.name} and {notebook.name} differ (first at cell {first}, {len(a)} vs {len(b)} cells); {FIX}")


@pytest.mark.parametrize("source", LAB_SOURCES, ids=lambda p: p.name)
def test_notebook_is_executed(source: Path):
    stored = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [c for c in stored.cells if c.cell_type == "code" and c.source.strip()]
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unexecuted, f"{source.with_suffix('.ipynb').name}: code cells {unexecuted} were not executed; {FIX}"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{source.with_suffix('.ipynb').name} has stored error outputs; {FIX}"
    assert any(c.get("outputs") for c in code), f"{source.with_suffix('.ipynb').name} has no outputs; {FIX}"


@pytest.mark.parametrize("source", LAB_SOURCES, ids=lambda p: p.name)
def test_lab_follows_skeleton(source: Path):
    markdown = "\n".join(c.source for c in jupytext.read(source).cells if c.cell_type == "markdown")
    missing = [h for h in SKELETON if h.lower() not in markdown.lower()]
    assert not missing, f"{source.name} lacks the lab skeleton sections {missing}"
    assert re.search(r"^# \d\d\. ", markdown, re.M), f"{source.name} should open with a '# NN. Title' heading"


@pytest.mark.parametrize("source", LAB_SOURCES, ids=lambda p: p.name)
def test_lab_has_a_checked_result_cell(source: Path):
    sources = [c.source for c in jupytext.read(source).cells if c.cell_type == "code"]
    assert any("# NBVAL_CHECK_OUTPUT" in s for s in sources), (
        f"{source.name}: mark its key seeded result cell with '# NBVAL_CHECK_OUTPUT' so nbval compares it on rerun"
    )
