"""A rebuilt page shows what the library computes now: jupyter-cache re-executes a notebook only when its cells
change, so ``make book`` drops the execution cache when the library's files change
(:func:`regcls.cache.prepare_build`). Built here on a one-page book whose notebook prints a metric, with a copy
of the library that the test edits."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from regcls.cache import prepare_build
from regcls.files import LIB_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.notebook]
JUPYTER_BOOK = Path(sys.executable).with_name("jupyter-book")



def _notebook(source: str, force: bool = False) -> str:
    import json

    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    if force:
        meta["mystnb"] = {"execution_mode": "force"}   # as the claims page
    return json.dumps({"cells": [{"cell_type": "markdown", "id": "a1", "metadata": {}, "source": ["# A page\n"]},
                                 {"cell_type": "code", "id": "a2", "metadata": {}, "execution_count": None,
                                  "outputs": [], "source": [source]}],
                       "metadata": meta, "nbformat": 4, "nbformat_minor": 5})


PAGE = _notebook("import numpy as np\nfrom regcls import metrics\nX = np.random.default_rng(0).normal(size=(20, 3))\n"
                 "print(f'CKA={metrics.cka(X, X + 0.1 * X ** 2):.6f}')\n")


def _book(tmp_path: Path) -> tuple[Path, Path]:
    lib = tmp_path / "lib" / "regcls"
    shutil.copytree(LIB_ROOT, lib, ignore=shutil.ignore_patterns("__pycache__"))
    book = tmp_path / "book"
    book.mkdir()
    (book / "_config.yml").write_text("title: t\nexecute:\n  execute_notebooks: cache\n  timeout: 300\n"
                                      "only_build_toc_files: true\n")
    (book / "_toc.yml").write_text("format: jb-book\nroot: page\n")
    (book / "page.ipynb").write_text(PAGE)
    return book, lib


def _build(book: Path, lib: Path, prepare: bool) -> str:
    if prepare:
        prepare_build(book / "_build", "smoke", lib_root=lib)
    env = {**os.environ, "PYTHONPATH": str(lib.parent)}   # the kernel imports the copy, not the checkout
    r = subprocess.run([str(JUPYTER_BOOK), "build", str(book), "--warningiserror"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    html = (book / "_build" / "html" / "page.html").read_text()
    printed = re.findall(r"CKA=(\d\.\d{6})", html)   # the cell's output (its source has no digits there)
    assert len(printed) == 1, printed
    return printed[0]


def test_editing_a_metric_changes_the_rebuilt_page(tmp_path):
    book, lib = _book(tmp_path)
    before = _build(book, lib, prepare=True)
    assert before.startswith("0.") and before != "0.250000"
    metrics = lib / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n\ndef cka(X, Y, debiased=False):  # edited\n    return 0.25\n")
    assert _build(book, lib, prepare=False) == before        # jupyter-cache alone shows the old number ...
    assert _build(book, lib, prepare=True) == "0.250000"      # ... make book's preparation the new one


def test_prepare_build_keeps_the_cache_for_the_same_library_and_drops_it_for_another_profile(tmp_path, capsys):
    build = tmp_path / "_build"
    assert prepare_build(build, "smoke") == []
    for sub in (".jupyter_cache", "jupyter_execute", ".doctrees", "html"):
        (build / sub).mkdir()
    assert prepare_build(build, "smoke") == []                               # nothing changed: all kept
    assert sorted(prepare_build(build, "paper")) == [".doctrees", ".jupyter_cache", "html", "jupyter_execute"]
    assert (build / ".profile").read_text().strip() == "paper"
    assert "library changed" not in capsys.readouterr().out


def test_the_claims_page_reads_what_a_rebuilt_chapter_recorded(tmp_path):
    """A chapter records a value, a page like the claims page (execution forced) shows it: after the chapter
    changes, the rebuilt claims page shows the new value (Sphinx alone would not read the unchanged page again)."""
    book = tmp_path / "book"
    book.mkdir()
    record = tmp_path / "record.txt"
    (book / "_config.yml").write_text("title: t\nexecute:\n  execute_notebooks: cache\nonly_build_toc_files: true\n")
    (book / "_toc.yml").write_text("format: jb-book\nroot: chapter\nchapters:\n- file: claims\n")
    chapter = book / "chapter.ipynb"
    chapter.write_text(_notebook(f"open({str(record)!r}, 'w').write('ONE')"))
    (book / "claims.ipynb").write_text(_notebook(f"print('RECORD=' + open({str(record)!r}).read())", force=True))

    def build(always):
        prepare_build(book / "_build", "smoke", always=always)
        r = subprocess.run([str(JUPYTER_BOOK), "build", str(book), "--warningiserror"], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        return re.findall(r"RECORD=([A-Z]+)", (book / "_build" / "html" / "claims.html").read_text())

    assert build(()) == ["ONE"]
    chapter.write_text(chapter.read_text().replace("ONE", "TWO"))
    assert build(()) == ["ONE"]                          # the forced page was not read again: stale
    chapter.write_text(chapter.read_text().replace("TWO", "THREE"))
    assert build((book / "claims.ipynb",)) == ["THREE"]  # make book touches it: read, run, current
