"""The chapters' cells are ones a reader can lift: every figure is its own cell with a caption and a name (so that
prose and the claims can refer to it), figures and computations sit in separate cells, and the imports are shown."""
import json
from pathlib import Path

import pytest

CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "chapters").glob("*.ipynb"))


def cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_figure_is_a_named_captioned_cell_of_its_own(path):
    for cell in cells(path):
        text = source(cell)
        figure = cell["metadata"].get("mystnb", {}).get("figure")
        if "plt.show()" not in text:
            assert figure is None, f"{path.stem}: a figure name on a cell that draws none: {text[:80]!r}"
            continue
        assert figure and figure.get("caption") and figure.get("name", "").startswith("fig-"), \
            f"{path.stem}: a figure without a caption and a name: {text[:80]!r}"
        assert text.count("plt.show()") == 1 and text.rstrip().endswith("plt.show()"), \
            f"{path.stem}: {figure['name']} shows more than its figure (split the cell)"
        assert "ch.traces(" not in text and "def " not in text, \
            f"{path.stem}: {figure['name']} also computes (give the computation its own cell)"


def test_figure_names_are_unique_across_the_book():
    names = [c["metadata"]["mystnb"]["figure"]["name"] for p in CHAPTERS for c in cells(p)
             if "figure" in c["metadata"].get("mystnb", {})]
    assert len(names) == len(set(names)) and len(names) >= 14, names


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_the_import_cell_is_shown(path):
    first = next(c for c in cells(path) if "from regcls.page import Chapter" in source(c))
    assert "remove-input" not in first["metadata"].get("tags", []) and "remove-cell" not in first["metadata"].get("tags", [])
