"""Test-time registers (regcls.testtime): the hooked model against an explicit float64 forward pass written out
per image, the extra token's place, the trace with it, and the neuron discovery on a planted model whose outlier
units are known."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import images, tiny
from regcls import planted
from regcls.cache import get_trace
from regcls.data import dataset_files, decode_images, eval_config
from regcls.errors import RegclsError
from regcls.models import build, layout
from regcls.profiles import PROFILES
from regcls.testtime import (DINOV2_L_NEURONS, FixedRegisters, TestTimeRegister, find_outlier_neurons,
                             register_means, signed_max)
from regcls.runner import run_trace
from regcls.trace import trace_batch, trace_meta
from regcls.tracefile import load_trace

TOL = dict(rtol=1e-9, atol=1e-9)


def explicit(model, x, neurons, at_end=False):
    """The method written out: embed, append (or insert after the prefix) a zero token, then every block by hand,
    the listed units moved image by image in a Python loop. Returns the final tokens with the extra token moved to
    index P (B, N + 1, D)."""
    P = model.num_prefix_tokens
    with torch.no_grad():
        t = model._pos_embed(model.patch_embed(x))
        zero = torch.zeros_like(t[:, :1])
        t = torch.cat([t, zero], 1) if at_end else torch.cat([t[:, :P], zero, t[:, P:]], 1)
        extra = t.shape[1] - 1 if at_end else P
        patches = torch.tensor([i for i in range(P, t.shape[1]) if i != extra])[:, None]
        for b, blk in enumerate(model.blocks):
            t = t + blk.ls1(blk.attn(blk.norm1(t)))
            h = blk.mlp.act(blk.mlp.fc1(blk.norm2(t)))
            units = torch.tensor(neurons.get(b, ()), dtype=torch.long)
            for i in range(len(x) if len(units) else 0):      # per image
                vals = h[i][:, units]
                s = vals.max() if vals.max() >= -vals.min() else vals.min()
                h[i, patches, units] = 0
                h[i, extra, units] = s
            t = t + blk.ls2(blk.mlp.fc2(h))
        t = model.norm(t)
    if at_end:   # the extra token back to index P, to compare with the hooked model's order
        t = torch.cat([t[:, :P], t[:, -1:], t[:, P:-1]], 1)
    return t


@pytest.fixture(params=["dinov2", "dinov2_reg4"])
def model(request):
    return tiny(request.param)


def test_signed_max_keeps_the_sign_of_the_larger_magnitude():
    h = torch.tensor([[[1.0, -3.0], [2.0, 0.5]], [[1.0, -0.5], [2.5, 0.0]]])
    assert signed_max(h).tolist() == [-3.0, 2.5]


def test_an_empty_list_only_adds_a_zero_token_and_its_place_does_not_matter(model):
    x = images(model)
    with TestTimeRegister(model, {}), torch.no_grad():
        got = model.forward_features(x)
    torch.testing.assert_close(got, explicit(model, x, {}), **TOL)
    torch.testing.assert_close(got, explicit(model, x, {}, at_end=True), **TOL)   # appended after the patches


def test_the_shift_equals_the_method_written_out_per_image(model):
    x = images(model, n=4)
    neurons = {0: (3, 40, 77), 2: (5,)}
    with TestTimeRegister(model, neurons), torch.no_grad():
        got = model.forward_features(x)
        alone = torch.cat([model.forward_features(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(got, explicit(model, x, neurons), **TOL)
    torch.testing.assert_close(got, explicit(model, x, neurons, at_end=True), **TOL)
    torch.testing.assert_close(got, alone, **TOL)      # each image its own maximum, not the batch's or the first's
    P = model.num_prefix_tokens
    with TestTimeRegister(model, {}), torch.no_grad():
        plain = model.forward_features(x)
    assert (got[:, P] - plain[:, P]).norm() > 1e-3      # the units moved something


def test_detach_restores_the_model_and_bad_lists_are_refused(model):
    x = images(model)
    with torch.no_grad():
        before = model.forward_features(x)
        with TestTimeRegister(model, {1: (2,)}):
            assert layout(model).num_registers == getattr(model, "num_reg_tokens", 0) + 1
            with pytest.raises(RegclsError, match="already has a test-time register"):
                TestTimeRegister(model, {})
        torch.testing.assert_close(model.forward_features(x), before, rtol=0, atol=0)
    assert layout(model).num_prefix == model.num_prefix_tokens
    with pytest.raises(RegclsError, match="block 9"):
        TestTimeRegister(model, {9: (1,)})
    with pytest.raises(RegclsError, match="unit 5000 of block 0"):
        TestTimeRegister(model, {0: (5000,)})
    with pytest.raises(RegclsError, match="DINOv3"):
        TestTimeRegister(tiny("dinov3"), {})


def test_the_trace_counts_it_as_a_register_and_stays_exact(model):
    x = images(model)
    R = getattr(model, "num_reg_tokens", 0)
    own = {}
    last = model.blocks[-1]
    with TestTimeRegister(model, {0: (3, 9)}):
        hooks = [last.register_forward_pre_hook(lambda m, a: own.__setitem__("in", a[0])),
                 last.ls1.register_forward_hook(lambda m, a, o: own.__setitem__("branch", o[:, 0]))]
        tr = trace_batch(model, x)
        for h in hooks:
            h.remove()
        meta = trace_meta(model)
    P = 1 + R + 1
    assert meta["num_registers"] == R + 1 and meta["num_prefix_tokens"] == P and meta["test_time_neurons"] == {"0": [3, 9]}
    torch.testing.assert_close(tr["attn_out_full"], own["branch"], **TOL)   # the parts add up to the model's branch
    torch.testing.assert_close(tr["skip"], own["in"][:, 0], **TOL)
    a = last.attn   # the [CLS] row, unfused, with the test-time register among the keys
    with torch.inference_mode():
        qkv = a.qkv(last.norm1(own["in"])).reshape(len(x), -1, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        row = ((qkv[0][:, :, :1] @ qkv[1].transpose(-2, -1)) * a.scale).softmax(-1)[:, :, 0]    # (B, H, N)
    torch.testing.assert_close(tr["cls_attn"], row, **TOL)
    torch.testing.assert_close(tr["attn_mass"][:, -1, :, 1], row[:, :, 1:P].sum(-1), **TOL)


def test_the_published_list_fits_dinov2_large():
    assert sum(len(u) for u in DINOV2_L_NEURONS.values()) == 45
    assert max(DINOV2_L_NEURONS) < 24 and all(0 <= u < 4096 for us in DINOV2_L_NEURONS.values() for u in us)
    spec = PROFILES["paper"].testtime
    assert spec.arch == "vit_large_patch14_dinov2" and dict(spec.testtime.neurons) == DINOV2_L_NEURONS
    assert spec.label == "L+ttr" and spec.describe()["test_time_register"]["neurons"]["17"][0] == 884


# ----------------------------------------------------------------------- the planted known answer

@pytest.fixture(scope="module")
def planted_case():
    smoke = PROFILES["smoke"]
    base = build(replace(smoke.testtime, testtime=None), smoke.img_size)
    imgs = dataset_files("samples", 12)
    geometry, mean, std = eval_config(base, smoke.img_size)
    x = decode_images(imgs.files, imgs.ids, geometry, progress=False).normalized(mean, std)[0:12]
    return smoke, base, x


def test_discovery_finds_the_planted_units(planted_case):
    _, base, x = planted_case
    assert find_outlier_neurons(base, x, top_k=2) == {planted.OUTLIER_BLOCK: planted.OUTLIER_UNITS}
    more = find_outlier_neurons(base, x, top_k=6)
    assert set(more[planted.OUTLIER_BLOCK][:2]) == set(planted.OUTLIER_UNITS)   # ranked first, then the rest


def test_a_model_without_outliers_gets_no_units():
    model = tiny("dinov2")
    with pytest.warns(UserWarning, match="no high-norm outliers"):
        assert find_outlier_neurons(model, images(model), top_k=4, factor=1e6) == {}


def test_the_test_time_register_takes_the_outliers_norm(planted_case, tmp_path):
    smoke, base, x = planted_case
    before = trace_batch(base, x)["token_norms_penult"]
    outliers = [1 + p for p in planted.OUTLIER_PATCHES]
    assert set(before.argmax(1).tolist()) <= set(outliers)
    model = build(smoke.testtime, smoke.img_size)        # the units found on the calibration images, as profiled
    assert model.test_time_neurons == {planted.OUTLIER_BLOCK: planted.OUTLIER_UNITS}
    ids = [f"{i}" for i in range(len(x))]
    meta = trace_meta(model, model="planted", weights="planted", dataset="samples", img_size=smoke.img_size,
                      model_spec=smoke.testtime.describe())
    tr = load_trace(run_trace(model, x, ids, out=tmp_path / "t.npz", meta=meta, progress=False))
    after = tr["token_norms_penult"]
    assert (after.argmax(1) == 1).all()                 # the test-time register has the highest norm
    assert np.max(after[:, 2:]) < 3 * np.median(after)  # and no patch is an outlier any more
    assert tr.num_registers == 1 and tr.label == "L+ttr" and tr.meta["test_time_neurons"] == {"1": [5, 17]}


# ----------------------------------------------------------------------- Fix-Reg-Mean

def test_fixed_registers_equal_the_method_written_out():
    model = tiny("dinov2_reg4")
    x = images(model, n=3)
    means = torch.randn(len(model.blocks), 4, model.embed_dim, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
    with FixedRegisters(model, means), torch.no_grad():
        got = model.forward_features(x)
        alone = torch.cat([model.forward_features(x[i:i + 1]) for i in range(len(x))])
    with torch.no_grad():                                   # by hand: overwrite the registers before every block
        t = model._pos_embed(model.patch_embed(x))
        for b, blk in enumerate(model.blocks):
            t = t.clone()
            t[:, 1:5] = means[b]
            t = blk(t)
        ref = model.norm(t)
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(got, alone, **TOL)                       # the same registers for every image
    assert model.fixed_register_means is None


def test_an_images_own_register_means_change_nothing_for_it():
    model = tiny("dinov2_reg4")
    x = images(model, n=2)
    with torch.no_grad():
        plain = model.forward_features(x[:1])
        with FixedRegisters(model, register_means(model, x[:1])):
            torch.testing.assert_close(model.forward_features(x[:1]), plain, **TOL)
            assert (model.forward_features(x[1:]) - plain).abs().max() > 1e-3   # another image's registers differ
        torch.testing.assert_close(model.forward_features(x[:1]), plain, rtol=0, atol=0)   # detached


def test_fixed_registers_refuse_what_they_cannot_fix():
    with pytest.raises(RegclsError, match="needs a model with registers"):
        FixedRegisters(tiny("dinov2"), torch.zeros(3, 0, 32))
    model = tiny("dinov2_reg4")
    with pytest.raises(RegclsError, match=r"this model needs \(3, 4, 32\)"):
        FixedRegisters(model, torch.zeros(3, 4, 16))


def test_the_calibration_images_follow_the_image_cap(monkeypatch):
    smoke = PROFILES["smoke"]
    assert smoke.with_fixed_registers(smoke.model("L", True), smoke.dataset).fix_registers.images == 16
    monkeypatch.setenv("REGCLS_LIMIT", "4")
    assert smoke.with_fixed_registers(smoke.model("L", True), smoke.dataset).fix_registers.images == 4


def test_a_fixed_trace_stores_its_means():
    smoke = PROFILES["smoke"]
    spec = smoke.with_fixed_registers(smoke.model("L", True), smoke.dataset)
    assert spec.fix_registers.calibration == smoke.labelled and spec.label == "L+reg fixed"   # the other images
    tr = get_trace(spec, smoke.dataset, img_size=smoke.img_size, limit=6, progress=False)
    means = build(spec, smoke.img_size).fixed_register_means                 # calibrated again: the same
    np.testing.assert_allclose(tr["register_means"], means.numpy(), rtol=1e-6)
    assert tr.label == "L+reg fixed" and len(tr.meta["fixed_register_means_sha256"]) == 16
    plain = get_trace(smoke.model("L", True), smoke.dataset, img_size=smoke.img_size, limit=6, progress=False)
    assert "register_means" not in plain and not np.allclose(plain["cls_final"], tr["cls_final"])
