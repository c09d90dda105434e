"""A profile of your own from a TOML file: models by timm name with hub, random or checkpoint weights (a Hugging Face
DINOv2 file among them), settings over a base profile, its claims recorded under its own name, and one-line errors
that name the file and the entry."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regcls import cache
from regcls.claims import ClaimCheck, collect, record
from regcls.errors import RegclsError
from regcls.profiles import PROFILES, active_profile, profile_from_file

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 48, "depth": 2, "num_heads": 3}


def hf_checkpoint(path: Path) -> Path:
    """A Hugging Face Dinov2WithRegistersModel with random weights, saved as the hub saves it."""
    from safetensors.torch import save_file
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    hf = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                                            intermediate_size=192, image_size=56, patch_size=14,
                                                            num_register_tokens=4))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    return path


def write_profile(folder: Path, body: str = "") -> Path:
    hf_checkpoint(folder / "weights" / "model.safetensors")
    text = f'''name = "my-dinov2"
base = "smoke"
limit = 12
note = "two models of mine"
{body}
[[models]]
size = "L"
arch = "vit_large_patch14_reg4_dinov2"
weights = "checkpoint:weights/model.safetensors"
overrides = {{ embed_dim = 48, depth = 2, num_heads = 3 }}

[[models]]
size = "S"
arch = "vit_small_patch14_reg4_dinov2"
weights = "random:3"
overrides = {{ embed_dim = 48, depth = 2, num_heads = 3 }}

[[models]]
size = "L"
label = "CLIP-L"
arch = "vit_large_patch14_clip_224"
weights = "random:4"
overrides = {{ embed_dim = 48, depth = 2, num_heads = 3 }}
'''
    (folder / "my.toml").write_text(text)
    return folder / "my.toml"


def test_a_profile_file_names_its_models_and_takes_the_rest_from_its_base(tmp_path, monkeypatch):
    path = write_profile(tmp_path)
    monkeypatch.setenv("REGCLS_PROFILE", str(path))
    p = active_profile(verbose=False)
    assert p.name == "my-dinov2" and p.limit == 12 and p.note == "two models of mine"
    assert [m.label for m in p.models] == ["S+reg", "L+reg", "CLIP-L"]   # in the chapters' order, labels kept
    assert p.models[1].weights == f"checkpoint:{tmp_path / 'weights' / 'model.safetensors'}"   # from the file's folder
    assert p.dataset == PROFILES["smoke"].dataset and p.img_size == PROFILES["smoke"].img_size
    assert p.testtime == PROFILES["smoke"].testtime                       # the chapters beyond the paper: the base's


def test_a_profile_files_model_traces_from_its_hugging_face_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path / "cache"))
    p = profile_from_file(write_profile(tmp_path))
    large = p.models[1]
    meta = cache.trace_for(p, large, img_size=28, progress=False)["meta"]
    assert meta["weights"].startswith("checkpoint:model.safetensors:sha256=") and meta["n_images"] == 12


def test_a_profile_files_claims_are_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path / "cache"))
    p = profile_from_file(write_profile(tmp_path))
    row = ClaimCheck("3.1", "a claim", "paper", "ours", True, p.name)
    record("sec3_1", [row])
    record("sec3_1", [ClaimCheck("3.1", "a claim", "paper", "the book's", False, "smoke")])
    assert [c.ours for c in collect("my-dinov2")] == ["ours"] and [c.ours for c in collect("smoke")] == ["the book's"]


@pytest.mark.parametrize("body, message", [
    ('colour = "red"', "unknown settings colour"),
    ('img_size = "big"', "img_size = 'big' is not an integer"),
])
def test_a_profile_file_with_a_wrong_setting_says_which(tmp_path, body, message):
    with pytest.raises(RegclsError, match=message):
        profile_from_file(write_profile(tmp_path, body))


@pytest.mark.parametrize("text, message", [
    ('name = "smoke"\n', "the book's own profile"),
    ('base = "smoke"\n', "give it a name"),
    ('name = "x"\nbase = "huge"\n', "unknown base profile 'huge'"),
    ('name = "x"\n[[models]]\nsize = "XL"\narch = "vit_small_patch14_dinov2"\n', "models\\[0\\] size 'XL'"),
    ('name = "x"\n[[models]]\nsize = "S"\narch = "vit_smal_patch14_dinov2"\n', "unknown model 'vit_smal_patch14_dinov2'"),
    ('name = "x"\n[[models]]\nsize = "S"\narch = "vit_small_patch14_dinov2"\nweights = "ftp:x"\n', "weights 'ftp:x'"),
    ('name = "x"\n[[models]]\nsize = "S"\narch = "vit_small_patch14_dinov2"\n[[models]]\nsize = "S"\n'
     'arch = "vit_small_patch14_dinov2"\n', "share a size"),
    ('name = \n', "profile file"),
    ('name = "x"\n[[models]]\nsize = "S"\narch = "vit_small_patch14_dinov2"\noverrides = { img_size = 28 }\n',
     "overrides img_size"),
    ('name = "x"\n[[models]]\nsize = "S"\narch = "vit_small_patch14_dinov2"\nweights = 3\n', "weights = 3 is not a string"),
    ('name = "x"\n[[models]]\narch = "vit_small_patch14_dinov2"\n', "models\\[0\\] needs size"),
])
def test_a_broken_profile_file_is_one_line_that_names_it(tmp_path, text, message):
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(RegclsError, match=message) as e:
        active_profile(str(tmp_path / "p.toml"), verbose=False)
    assert "\n" not in str(e.value)


def test_a_missing_profile_file_is_named(tmp_path):
    with pytest.raises(RegclsError, match="does not exist"):
        active_profile(str(tmp_path / "nothing.toml"))


CHAPTERS = sorted(p.stem for p in (ROOT / "chapters").glob("*.ipynb"))


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    """A fork's profile file (a Hugging Face checkpoint, CLIP-L by timm name with a label of its own) and one trace
    cache for every chapter run on it."""
    folder = tmp_path_factory.mktemp("fork")
    return write_profile(folder), folder / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("chapter", sorted(CHAPTERS, key=lambda c: c == "summary_claims"))
def test_every_chapter_runs_on_a_profile_file_without_edits(fork, chapter):
    """The fork's case: every chapter runs on the file's models, its claims land under the file's name, and every
    row names its models."""
    path, cache_dir = fork
    env = {**os.environ, "REGCLS_PROFILE": str(path), "REGCLS_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    code = (f"import nbformat; from nbclient import NotebookClient; "
            f"nb = nbformat.read({str(ROOT / 'chapters' / f'{chapter}.ipynb')!r}, as_version=4); "
            f"NotebookClient(nb, timeout=600, resources={{'metadata': {{'path': {str(ROOT / 'chapters')!r}}}}}).execute()")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [c.name for c in (cache_dir / "chapters").iterdir()] == ["my-dinov2"]   # its run record: the file's
    if chapter in ("your_model", "controls", "summary_claims"):   # no claim rows of their own
        return
    assert [c.name for c in (cache_dir / "claims").iterdir()] == ["my-dinov2"]
    rows = [r for f in (cache_dir / "claims" / "my-dinov2").glob("*.json") for r in json.loads(f.read_text())]
    dinov2 = [r for r in rows if r["section"] != "App."]   # the appendix rows name their family's models
    assert rows and all(r["models"] for r in rows) and all(
        "CLIP-L: vit_large_patch14_clip_224 (random:4)" in r["models"] and "model.safetensors" in r["models"]
        for r in dinov2)   # every row names its models
