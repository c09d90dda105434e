"""The chapters' cells are ones a reader can lift: every figure is its own cell with a caption and a name (so that
prose and the claims can refer to it), figures and computations sit in separate cells, and the imports are shown."""
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


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


def test_a_figure_of_the_paper_says_which_and_links_to_it():
    """A figure that redoes one of the paper's opens with its number, linked to the paper's figure (the book does not
    number figures itself: its numbers would clash with the paper's)."""
    captions = {c["metadata"]["mystnb"]["figure"]["name"]: c["metadata"]["mystnb"]["figure"]["caption"]
                for p in CHAPTERS for c in cells(p) if "figure" in c["metadata"].get("mystnb", {})}
    paper = {n: c for n, c in captions.items() if "Fig." in c}
    assert len(paper) >= 9, sorted(paper)
    for name, caption in paper.items():
        assert caption.count("Fig. ") == caption.count("[paper Fig. "), (name, caption)   # each one a link
        for fig, anchor in re.findall(r"\[paper Fig\. (\w+)\]\(https://arxiv\.org/html/2505\.05892#([\w.]+)\)", caption):
            assert anchor.endswith(f".F{fig.rstrip('ab')}"), (name, fig, anchor)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())   # (the site test checks no "Fig. N" shows)
    assert config["sphinx"]["config"]["numfig"] is False and config["latex"]["use_jupyterbook_latex"] is False


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_a_bar_chart_keeps_its_legend_beside_the_bars(path):
    for cell in cells(path):
        text = source(cell)
        if ".bar(" in text or "interval_bars(" in text:
            assert ".legend(" not in text, f"{path.stem}: a legend drawn over bars (plots.legend_beside puts it beside)"


def test_figure_names_are_unique_across_the_book():
    names = [c["metadata"]["mystnb"]["figure"]["name"] for p in CHAPTERS for c in cells(p)
             if "figure" in c["metadata"].get("mystnb", {})]
    assert len(names) == len(set(names)) and len(names) >= 14, names


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_the_import_cell_is_shown(path):
    first = next(c for c in cells(path) if "from regcls.page import Chapter" in source(c))
    assert "remove-input" not in first["metadata"].get("tags", []) and "remove-cell" not in first["metadata"].get("tags", [])


# The chapters state their results as output of their own code cells (``ch.finding``), so that Colab and Jupyter
# show the text with its numbers; a {glue:text} role in a Markdown cell shows there as raw markup. The one role
# left is the run time at the top of each page (the last cell measures it).
RUN_TIME = "*This page's numbers took {glue:text}`run_seconds:.0f` s to compute, its traces included"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_markdown_cell_cites_glued_values(path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for line in source(cell).splitlines():
            if "{glue:" in line:
                assert line.startswith(RUN_TIME) and line.count("{glue:") == 1, \
                    f"{path.stem}: a Markdown cell cites a glued value (use ch.finding in the code cell): {line!r}"


# The fastest chapter with a Finding (about 15 s on two CPU cores), and the Finding's paragraph as the book cited it
# before ch.finding: the notebook run outside the book must show this text with every role filled in.
FINDING_CHAPTER = "beyond_test_time_registers"
BOOK_FINDING = (
    "In this run {glue:text}`ttr_model` moves {glue:text}`ttr_units` units into its test-time register. The largest\n"
    "patch-token norm entering the last block falls from {glue:text}`ttr_outlier_before:.1f` to\n"
    "{glue:text}`ttr_outlier_after:.1f` times the median token norm (medians over the images). The last-layer [CLS]\n"
    "gives {glue:text}`ttr_share:.2f` of its attention over registers and patches to the test-time register; the\n"
    "knockout CKA of its register-only output is {glue:text}`ttr_ckar:.2f` and of its patch-only output\n"
    "{glue:text}`ttr_ckap:.2f`. The skip term's norm over the patches' contribution goes from\n"
    "{glue:text}`ttr_skip_before:.2f` to {glue:text}`ttr_skip_after:.2f` (medians): the table above says whether the\n"
    "[CLS] hands its reading to the new token, back to the patches, or keeps its skip term.")


def _as_book_shows(plain: str, spec: str) -> str:
    """A glued value as a {glue:text} role shows it: its text/plain repr read back, then formatted."""
    import ast
    try:
        value = ast.literal_eval(plain)
    except (SyntaxError, ValueError):
        value = plain
    return str(value) if spec in ("", "s") else format(value, spec)


@pytest.mark.slow
@pytest.mark.notebook
def test_a_chapter_run_outside_the_book_shows_its_finding_with_numbers():
    """As on Colab: nbclient, the python3 kernel, the chapter's folder as working directory, no Sphinx."""
    import os
    import re

    import nbformat
    from nbclient import NotebookClient

    path = CHAPTERS[0].parent / f"{FINDING_CHAPTER}.ipynb"
    env = dict(os.environ, REGCLS_PROFILE="smoke", HF_HUB_OFFLINE="1")
    assert "REGCLS_CACHE" in env   # tests/conftest.py: the chapter's caches go to the session's temporary folder
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute(env=env)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    shown = [str(v) for o in outputs for v in (list(o.get("data", {}).values()) + [o.get("text", "")])]
    assert not [s for s in shown if "{glue:" in s], "an output shows raw glue markup"

    glued = {o.metadata["scrapbook"]["name"]: o.data[o.metadata["scrapbook"]["mime_prefix"] + "text/plain"]
             for o in outputs if "scrapbook" in o.get("metadata", {})}
    roles = re.findall(r"\{glue:text\}`([^`:]+):?([^`]*)`", BOOK_FINDING)
    numbers = {key: _as_book_shows(glued[key], spec) for key, spec in roles}
    expected = re.sub(r"\{glue:text\}`([^`:]+):?[^`]*`", lambda m: numbers[m.group(1)], BOOK_FINDING)

    findings = [o.data["text/markdown"] for o in outputs
                if "text/markdown" in o.get("data", {}) and o.data["text/markdown"].startswith("## Finding")]
    assert len(findings) == 1, f"{len(findings)} Finding outputs (one expected): {findings}"
    missing = [f"{key} = {text}" for key, text in numbers.items() if text not in findings[0]]
    assert not missing, f"numbers of the Finding not shown: {missing}\n{findings[0]}"
    assert findings[0] == "## Finding\n\n" + expected
