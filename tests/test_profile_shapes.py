"""Every chapter runs on a profile shaped like ``laptop`` (S and B only, fewer appendix models), so a chapter
that indexes a model size the profile lacks fails here in seconds, not after a user downloads 8 GB."""
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
    assert row.agrees is None and "needs L, g" in row.ours   # shown as "not testable" (claims.table)
    assert check("3.3", "c", "p", "0.1", False, lap, needs=("S",)).agrees is False
    assert check("3.3", "c", "p", "0.1", True, PROFILES["smoke"], needs=("L", "g")).agrees is True


def test_limit_caps_every_dataset_and_keeps_two_images_per_class(monkeypatch):
    import numpy as np

    from regcls.data import dataset_files
    from regcls.profiles import PROFILES

    monkeypatch.setenv("REGCLS_LIMIT", "8")
    for name in ("smoke", "laptop", "paper"):
        p = PROFILES[name]
        assert p.sample(p.dataset) == (8, None)
        assert p.sample(p.labelled) == (8, 4)
    images = dataset_files("samples-crops", 8, classes=4)
    assert len(images) == 8 and np.array_equal(np.bincount(images.labels), [2, 2, 2, 2])
    assert all(images.ids[k].split("/")[0] == str(images.labels[k]) for k in range(8))   # labels stay with files
    tail = images[5:]                                                     # a slice keeps them in step
    assert tail.ids == images.ids[5:] and tail.files == images.files[5:] and list(tail.labels) == list(images.labels[5:])
    monkeypatch.delenv("REGCLS_LIMIT")
    assert PROFILES["laptop"].sample("imagenetv2") == (1000, 100) and PROFILES["paper"].sample("coco-val2017") == (None, None)


@pytest.mark.parametrize("raw", ["abc", "2", "-5"])
def test_limit_must_be_a_usable_number(raw, monkeypatch):
    from regcls.errors import RegclsError
    from regcls.profiles import image_cap

    monkeypatch.setenv("REGCLS_LIMIT", raw)
    with pytest.raises(RegclsError, match="REGCLS_LIMIT"):
        image_cap()


def test_claim_rows_say_which_code_computed_them():
    from regcls.claims import ClaimCheck, code_stamp

    now = ClaimCheck("3.1", "c", "p", "o", True, "smoke")
    assert now.stamp == code_stamp() and "library " in now.stamp and not now.stale
    old = ClaimCheck("3.1", "c", "p", "o", True, "smoke", stamp="commit 0000000, library 0123456789abcdef")
    assert old.stale


def test_a_trace_rebuilds_the_spec_it_was_traced_with():
    """``ModelSpec.from_description`` inverts ``describe`` through JSON (as a trace file stores it), for every model of
    every profile's workload, so that a trace's label is the spec's own."""
    import json

    from regcls.cache import workload
    from regcls.profiles import PROFILES, ModelSpec

    for profile in PROFILES.values():
        for job in workload(profile):
            assert ModelSpec.from_description(json.loads(json.dumps(job.spec.describe()))) == job.spec, job.spec


def test_the_colab_profile_has_every_size_and_fewer_images_at_the_other_resolution(monkeypatch):
    from regcls.profiles import PROFILES

    colab = PROFILES["colab"]
    assert colab.sizes(True) == colab.sizes(False) == ["S", "B", "L", "g"]     # every main claim can be judged
    assert colab.sample(colab.dataset) == (1000, None) == colab.sample(colab.dataset, img_size=224)
    assert colab.sample(colab.dataset, img_size=colab.alt_img_size) == (200, None)   # 518 px costs ~6x an image
    assert colab.sample(colab.labelled, img_size=colab.alt_img_size) == (1000, 100)  # labelled sets keep theirs
    monkeypatch.setenv("REGCLS_LIMIT", "8")
    assert colab.sample(colab.dataset, img_size=colab.alt_img_size) == (8, None)
    assert PROFILES["paper"].sample("coco-val2017", img_size=518) == (8, None)
    monkeypatch.delenv("REGCLS_LIMIT")
    assert PROFILES["paper"].sample("coco-val2017", img_size=518) == (None, None)   # no alt_limit: all images
