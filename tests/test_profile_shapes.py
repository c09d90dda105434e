"""Every chapter runs on a profile shaped like ``laptop`` (S and B only, fewer appendix models), so a chapter
that indexes a model size the profile lacks fails here in seconds, not after a user downloads 8 GB."""
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.name for p in (ROOT / "chapters").glob("*.ipynb") if p.name != "summary_claims.ipynb")


def run_notebook(name: str) -> None:
    nb = nbformat.read(ROOT / "chapters" / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("name", CHAPTERS + ["summary_claims.ipynb"])
def test_chapter_runs_on_a_laptop_shaped_profile(name, monkeypatch):
    monkeypatch.setenv("REGCLS_PROFILE", "smoke-laptop")
    run_notebook(name)


def test_claims_needing_missing_sizes_are_not_testable(monkeypatch):
    from regcls.claims import check
    from regcls.profiles import PROFILES

    lap = PROFILES["smoke-laptop"]
    row = check("3.1", "c", "p", "0.1", True, lap, needs=("L", "g"))
    assert row.agrees is None and row.verdict == "not testable on this profile" and "needs L, g" in row.ours
    assert check("3.3", "c", "p", "0.1", False, lap, needs=("S",)).agrees is False
    assert check("3.3", "c", "p", "0.1", True, PROFILES["smoke"], needs=("L", "g")).agrees is True
