"""The bad-input catalogue in docs/bad-inputs.md is backed by tests: every row names one that exists.

The catalogue promises users what each bad input gets; this keeps the promise from drifting
away from the suite. A row's test is ``tests/path.py::test_name`` (with an optional
``[param-id]``); the function must be defined in that file, and each area keeps its rows.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "docs" / "bad-inputs.md"
AREAS = {"core", "CLI", "FiftyOne", "napari", "Label Studio", "app"}
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(\[[^\]`]*\])?`")


def catalogue_rows() -> list[list[str]]:
    """Every row of the four-column tables (not their headers), whatever its area says."""
    rows = []
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] != "area" and not set(cells[0]) <= {"-"}:
            rows.append(cells)
    return rows


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")}


def test_catalogue_covers_every_area_with_at_least_forty_rows():
    rows = catalogue_rows()
    assert len(rows) >= 40, f"only {len(rows)} rows in {CATALOGUE.name}"
    assert {row[0] for row in rows} == AREAS, "every row's area is one of AREAS, and every area has rows"
    assert all(row[1] and row[2] for row in rows), "every row says the bad input and what it gets"


def test_every_catalogue_row_names_a_test_that_exists():
    missing = []
    for area, bad_input, _, test in catalogue_rows():
        match = TEST_ID.fullmatch(test)
        assert match, f"row {bad_input!r} ({area}) does not name a test as `tests/file.py::test_name`: {test!r}"
        path = ROOT / match.group(1)
        if not path.is_file() or match.group(2) not in defined_tests(path):
            missing.append(test)
    assert not missing, f"catalogue rows name tests that do not exist: {missing}"
