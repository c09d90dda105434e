"""Weights files in timm's and in the official DINOv2 format load to the same trace; the CLI end to end;
the cache; every profile's names exist in timm's registry."""
import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from regcls.data import DATASETS, SHIPPED
from regcls.errors import RegclsError
from regcls.models import create, load_checkpoint
from regcls.profiles import PROFILES
from regcls.trace import trace_batch
from regcls.tracefile import load_trace

ARCH = "vit_small_patch14_reg4_dinov2"
SET = dict(embed_dim=48, depth=2, num_heads=3)


def to_official_dinov2(sd: dict, model) -> dict:
    """The inverse of timm's DINOv2 conversion: the key layout of facebookresearch/dinov2 checkpoints."""
    out = {k: v.clone() for k, v in sd.items()}
    pos0 = torch.randn(1, 1, model.embed_dim)  # official pos_embed also has a [CLS] slot
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - pos0
        out["pos_embed"] = torch.cat([pos0, out["pos_embed"]], dim=1)
    out["mask_token"] = torch.zeros(1, model.embed_dim)
    return {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3") if "swiglu" in k else k: v
            for k, v in out.items()}


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = create(ARCH, pretrained=False, img_size=56, overrides=SET)
    from regcls.planted import plant
    return plant(model, "patch_integrator")


def test_official_dinov2_and_timm_checkpoints_give_same_trace(tmp_path, reference):
    x = torch.randn(2, 3, 56, 56)
    want = trace_batch(reference, x)
    sd = reference.state_dict()
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "timm.safetensors"))
    torch.save(to_official_dinov2(sd, reference), tmp_path / "dinov2_official.pth")
    for f in ("timm.safetensors", "dinov2_official.pth"):
        m = create(ARCH, pretrained=False, img_size=56, overrides=SET)
        load_checkpoint(m, tmp_path / f)
        got = trace_batch(m, x)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=f"{f}: {k}")


def test_official_checkpoint_resampled_to_other_resolution(tmp_path, reference):
    torch.save(to_official_dinov2(reference.state_dict(), reference), tmp_path / "w.pth")
    m = create(ARCH, pretrained=False, img_size=84, overrides=SET)  # 6x6 grid from a 4x4 checkpoint
    load_checkpoint(m, tmp_path / "w.pth")
    assert m.pos_embed.shape[1] == 36


def test_mismatched_checkpoint_names_keys(tmp_path, reference):
    sd = reference.state_dict()
    sd.pop("blocks.1.norm1.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    m = create(ARCH, pretrained=False, img_size=56, overrides=SET)
    with pytest.raises(RegclsError, match=r"missing keys: blocks\.1\.norm1\.weight.*unexpected keys: extra\.weight"):
        load_checkpoint(m, tmp_path / "bad.pth")


def test_pickled_code_in_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    m = create(ARCH, pretrained=False, img_size=56, overrides=SET)
    with pytest.raises(RegclsError, match="cannot read checkpoint"):
        load_checkpoint(m, tmp_path / "evil.pth")


def test_unknown_and_unsupported_models():
    with pytest.raises(RegclsError, match="closest timm names: vit_small_patch14_dinov2"):
        create("vit_smal_patch14_dinov2", pretrained=False, img_size=56)
    with pytest.raises(RegclsError, match="not a timm VisionTransformer"):
        create("resnet18", pretrained=False, img_size=56)
    with pytest.raises(RegclsError, match="no \\[CLS\\] token"):
        create("vit_small_patch16_224", pretrained=False, img_size=32,
               overrides=dict(class_token=False, global_pool="avg", depth=1))


def test_hub_weights_offline_fail_fast_with_advice():
    import time
    t = time.time()
    with pytest.raises(RegclsError, match="not in the hub cache .* pass --checkpoint FILE"):
        create("vit_small_patch14_dinov2.lvd142m", pretrained=True, img_size=56)
    assert time.time() - t < 20


def test_profiles_name_real_timm_weights_and_datasets():
    pretrained = set(timm.list_pretrained())
    for prof in PROFILES.values():
        for m in prof.models + tuple(m for _, ms in prof.appendix for m in ms):
            assert timm.is_model(m.arch), m.arch
            if m.weights == "hub":
                assert m.name in pretrained, m.name
        for ds in (prof.dataset, prof.labelled):
            assert ds in DATASETS or ds in SHIPPED
    for src in DATASETS.values():
        assert src.url.startswith("http") and src.size > 1e8 and src.checksum.split(":")[0] in ("md5", "sha256")


def _write_images(folder, n=5):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + i * 10, 60, 3), dtype=np.uint8)).save(folder / f"im{i}.png")


def test_cli_trace_end_to_end(tmp_path):
    _write_images(tmp_path / "imgs")
    out = tmp_path / "t.npz"
    cmd = [sys.executable, "-m", "regcls", "trace", "--model", ARCH, "--random", "--set", "embed_dim=48",
           "--set", "depth=2", "--set", "num_heads=3", "--images", str(tmp_path / "imgs"), "--img-size", "56",
           "--batch-size", "2", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    tr = load_trace(out)
    assert list(tr["image_ids"]) == [f"im{i}.png" for i in range(5)]
    assert tr["cls_attn"].shape == (5, 3, 5 + 16) and tr["cls_attn"].dtype == np.float32
    meta = tr["meta"]
    for key in ("model", "weights", "dataset", "img_size", "n_images", "regcls_version", "grid"):
        assert key in meta
    assert meta["num_registers"] == 4 and meta["grid"] == [4, 4] and meta["n_images"] == 5
    assert (tr.num_prefix, tr.num_registers, tr.grid, tr.n_images, tr.meta) == (5, 4, (4, 4), 5, meta)
    assert not (tmp_path / "t.npz.parts").exists()


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "regcls", "trace", "--model", "vit_nope", "--images", str(tmp_path),
                        "--out", str(tmp_path / "x.npz")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")


def test_plan_lists_downloads():
    r = subprocess.run([sys.executable, "-m", "regcls", "plan", "--profile", "paper"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "vit_giant_patch14_reg4_dinov2.lvd142m" in r.stdout and "val2017.zip" in r.stdout
    assert "63 traces (" in r.stdout and r.stdout.count("\n  trace ") == 63      # every trace the chapters read
    assert "5000 images" in r.stdout and "PFLOP" in r.stdout and " GB of hub weights" in r.stdout
    lines = {tuple(line.split()[:3]) for line in r.stdout.splitlines()}
    assert ("trace", "L+ttr", "vit_large_patch14_dinov2.lvd142m") in lines                  # beyond the paper, too
    assert ("model", "H+", "v3") in lines and "vit_huge_plus_patch16_dinov3.lvd1689m" in r.stdout
    assert sum(line.startswith("  trace g+reg fixed ") for line in r.stdout.splitlines()) == 2   # both datasets


def test_plan_of_the_colab_profile_lists_every_size_with_and_without_registers():
    r = subprocess.run([sys.executable, "-m", "regcls", "plan", "--profile", "colab"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = {tuple(line.split()[:2]) for line in r.stdout.splitlines() if line.startswith("  trace ")}
    assert {("trace", f"{s}{reg}") for s in "SBLg" for reg in ("", "+reg")} <= lines
    assert "vit_giant_patch14_reg4_dinov2.lvd142m         coco-val2017 at 518 px, 200 images" in r.stdout
    assert "coco-val2017 at 224 px, 1000 images" in r.stdout


def test_cache_returns_same_arrays_without_recomputing(monkeypatch, smoke):
    from regcls import cache, models
    spec = smoke.model("S", True)
    first = cache.get_trace(spec, "samples", img_size=smoke.img_size, progress=False)
    monkeypatch.setattr(models, "build", lambda *a, **k: pytest.fail("recomputed a cached trace"))
    again = cache.get_trace(spec, "samples", img_size=smoke.img_size, progress=False)
    for k in ("cls_attn", "skip", "cls_final"):
        np.testing.assert_array_equal(first[k], again[k])
    assert json.dumps(first["meta"]) == json.dumps(again["meta"])


def test_the_other_crop_is_its_own_trace_and_records_its_geometry(smoke):
    from regcls import cache
    spec = smoke.model("S", True)
    default = cache.get_trace(spec, "samples", img_size=smoke.img_size, limit=6, progress=False)
    cropped = cache.get_trace(spec, "samples", img_size=smoke.img_size, limit=6, progress=False, crop_pct=0.875)
    assert default["meta"]["geometry"] == f"{smoke.img_size}-1.0-bicubic-center"
    assert cropped["meta"]["geometry"] == f"{smoke.img_size}-0.875-bicubic-center"
    assert not np.allclose(default["cls_final"], cropped["cls_final"])   # other pixels, other outputs
    key = f"{spec.name} on samples at {smoke.img_size} px"
    assert cache.PRECISIONS[key] == "float32"      # what the chapter's last line reports


def test_ibot_checkpoint_format_loads(tmp_path):
    """iBOT's released teacher checkpoints: a 'state_dict' with 'module.backbone.' keys, a projection head and
    a mask embedding. Tested on random weights in that key format (the real files cannot be fetched offline)."""
    torch.manual_seed(0)
    arch, over = "vit_small_patch16_224", dict(embed_dim=48, depth=2, num_heads=3)
    ref = create(arch, pretrained=False, img_size=48, overrides=over)
    sd = {f"module.backbone.{k}": v for k, v in ref.state_dict().items()}
    sd["module.backbone.masked_embed"] = torch.zeros(48)
    sd["module.head.mlp.0.weight"] = torch.zeros(8, 48)
    torch.save({"state_dict": sd, "epoch": 800}, tmp_path / "ibot.pth")
    m = create(arch, pretrained=False, img_size=48, overrides=over)
    load_checkpoint(m, tmp_path / "ibot.pth")
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(trace_batch(m, x)["cls_final"], trace_batch(ref, x)["cls_final"])


def test_a_change_in_the_code_that_makes_a_trace_changes_its_cache_key(tmp_path, monkeypatch):
    """After a fix in trace.py, planted.py, models.py or the image pipeline, no trace (or image store) computed by
    the old code is read back."""
    import shutil

    from regcls import cache, files
    lib = tmp_path / "regcls"
    shutil.copytree(files.LIB_ROOT, lib)
    monkeypatch.setattr(files, "LIB_ROOT", lib)
    before = {names: files.source_digest(names) for names in (files.TRACE_SOURCES, files.STORE_SOURCES)}
    for name in ("trace.py", "planted.py", "models.py", "data.py"):
        with open(lib / name, "a") as f:
            f.write("\n# a fix\n")
        after = files.source_digest()
        assert after != before[files.TRACE_SOURCES], name
        before[files.TRACE_SOURCES] = after
    assert files.source_digest(files.STORE_SOURCES) != before[files.STORE_SOURCES]
    # and the keys use it: the same request lands in another file
    smoke = PROFILES["smoke"]
    spec = smoke.model("S", True)
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path / "c"))
    first = cache.get_trace(spec, "samples", img_size=28, limit=2, progress=False)
    stores = set((tmp_path / "c" / "stores").rglob("*.npz"))
    with open(lib / "data.py", "a") as f:
        f.write("\n# another fix\n")
    second = cache.get_trace(spec, "samples", img_size=28, limit=2, progress=False)
    assert len(list((tmp_path / "c" / "traces").glob("*.npz"))) == 2
    assert first["meta"]["cache_key"] != second["meta"]["cache_key"]
    same = {"cache_key": 0, "trace_seconds": 0}   # what differs: the key, and the time each took
    assert {**first["meta"], **same} == {**second["meta"], **same}
    assert len(set((tmp_path / "c" / "stores").rglob("*.npz")) - stores) == 1


def _legacy_hf_names(sd: dict) -> dict:
    """transformers 5's names back to those of the hub's DINOv2 files (what a user downloads)."""
    out = {}
    for k, v in sd.items():
        for new, old in ((".attention.q_proj.", ".attention.attention.query."), (".attention.k_proj.", ".attention.attention.key."),
                         (".attention.v_proj.", ".attention.attention.value."), (".attention.o_proj.", ".attention.output.dense."),
                         (".mlp.down_proj.", ".mlp.weights_out.")):
            k = k.replace(new, old)
        out[k] = v
    for k in [k for k in out if ".mlp.gate_proj." in k]:
        up = k.replace("gate_proj", "up_proj")
        out[k.replace("gate_proj", "weights_in")] = torch.cat([out.pop(k), out.pop(up)])
    return out


@pytest.mark.parametrize("kind", ["plain", "registers", "swiglu", "classifier"])
@pytest.mark.parametrize("names", ["hub", "transformers5"])
def test_a_hugging_face_dinov2_checkpoint_loads_and_computes_what_transformers_computes(tmp_path, kind, names):
    """A Dinov2Model / Dinov2WithRegistersModel (random weights, random LayerScale) saved as the hub saves it: loaded
    with --checkpoint into the timm model, the final tokens equal transformers' own last_hidden_state in float64."""
    from safetensors.torch import save_file
    from transformers import (Dinov2Config, Dinov2ForImageClassification, Dinov2Model, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersModel)

    torch.manual_seed(0)
    common = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192, image_size=56,
                  patch_size=14)
    if kind == "registers":
        hf, arch = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**common, num_register_tokens=4)), \
            "vit_small_patch14_reg4_dinov2"
    elif kind == "classifier":
        hf, arch = Dinov2ForImageClassification(Dinov2Config(**common, num_labels=5)), "vit_small_patch14_dinov2"
    else:
        hf = Dinov2Model(Dinov2Config(**common, use_swiglu_ffn=kind == "swiglu"))
        arch = "vit_giant_patch14_dinov2" if kind == "swiglu" else "vit_small_patch14_dinov2"
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lambda1" in name or "register_tokens" in name or "cls_token" in name:
                p.normal_()   # LayerScale and tokens away from their initial values: a wrong mapping shows
            if "cls_token" in name or "position_embeddings" in name:
                # timm's filter folds the [CLS] position into the token in float32: values with short mantissas
                # (bfloat16's) add exactly, so that the comparison can stay at float64 precision
                p.copy_(p.bfloat16().float())
    hf = hf.double().eval()
    sd = {k: v.float().contiguous() for k, v in hf.state_dict().items()}
    save_file(_legacy_hf_names(sd) if names == "hub" else sd, str(tmp_path / "model.safetensors"))
    model = create(arch, pretrained=False, img_size=56, overrides=dict(embed_dim=48, depth=2, num_heads=3))
    load_checkpoint(model, tmp_path / "model.safetensors")
    model = model.double().eval()
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        want = (hf.dinov2 if kind == "classifier" else hf)(pixel_values=x).last_hidden_state
        got = model.forward_features(x)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-10, atol=1e-10)


def test_a_hugging_face_checkpoint_with_unknown_keys_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"embeddings.patch_embeddings.projection.weight": torch.zeros(48, 3, 14, 14),
               "encoder.layer.0.attention.rotary.weight": torch.zeros(4)}, str(tmp_path / "odd.safetensors"))
    model = create("vit_small_patch14_dinov2", pretrained=False, img_size=56, overrides=dict(embed_dim=48, depth=2, num_heads=3))
    with pytest.raises(RegclsError, match="does not know: encoder.layer.0.attention.rotary.weight"):
        load_checkpoint(model, tmp_path / "odd.safetensors")
