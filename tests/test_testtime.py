"""Test-time registers (regcls.testtime): the hooked model against an explicit float64 forward pass written out
per image, the extra token's place, the trace with it; the neuron search -- by default the published one (Jiang et
al.'s repository), each setting pinned and the ranking against the procedure written out image by image, the
[CLS] and registers never outliers, our earlier search as a variant that reproduces it -- and on a planted model
whose outlier units are known."""
import copy
import inspect
import json
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch

from helpers import images, tiny
from regcls import planted
from regcls.cache import get_trace
from regcls.data import dataset_files, decode_images, eval_config
from regcls.errors import RegclsError
from regcls.models import build, calibration_images, layout
from regcls.planted import _reinit, _reserve
from regcls.profiles import PLANTED_THRESHOLD, PROFILES
from regcls.profiles import TestTime as RegisterSpec   # (not a test class)
from regcls.testtime import (DINOV2_L_NEURONS, PUBLISHED, PUBLISHED_THRESHOLD, PUBLISHED_TOP_K, RELATIVE, SEARCHES,
                             FixedRegisters, OutlierSearch, TestTimeRegister, find_outlier_neurons, outlier_tokens,
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


# ----------------------------------------------------------------------- the search: the published one by default

def test_the_default_search_is_the_published_one():
    """Jiang et al.'s repository (nickjiang2378/test-time-registers at 860df43): configs/dinov2_large.yaml (threshold
    150, detect_outliers_layer -2, highest_layer 17, top_k 50), shared/algorithms.py (per-image means over the
    outliers, averaged over the images with one; the sparsity filter register_neurons.ipynb turns on)."""
    assert (PUBLISHED_THRESHOLD, PUBLISHED_TOP_K) == (150.0, 50)
    assert SEARCHES["published"] is PUBLISHED and PUBLISHED == OutlierSearch()
    assert PUBLISHED.threshold == 150.0 and PUBLISHED.relative is False      # an absolute norm
    assert PUBLISHED.detect_layer == -2                                      # the second-to-last block's output
    assert PUBLISHED.highest_layer == 17                                     # blocks 0-17 searched
    assert PUBLISHED.prefix_tokens is False                                  # patches only (ours: see the docs)
    assert PUBLISHED.ranking == "per_image" and PUBLISHED.sparsity_filter is True
    params = inspect.signature(find_outlier_neurons).parameters
    assert params["top_k"].default == 50 and params["search"].default == "published"
    assert inspect.signature(outlier_tokens).parameters["search"].default == "published"
    assert RegisterSpec().top_k == 50 and RegisterSpec().search == PUBLISHED
    assert "search" not in RegisterSpec(calibration="imagenetv2").describe()     # the default is not recorded
    assert RELATIVE == OutlierSearch(threshold=3.0, relative=True, detect_layer=-3, highest_layer=-3,
                                     prefix_tokens=True, ranking="pooled", sparsity_filter=False)
    for tt in (RegisterSpec(calibration="c", images=4, top_k=3, search=RELATIVE),
               RegisterSpec(calibration="c", images=4, top_k=3, search=replace(PUBLISHED, threshold=50.0))):
        assert RegisterSpec.from_description(json.loads(json.dumps(tt.describe()))) == tt
    laptop = PROFILES["laptop"].testtime.testtime                             # ViT-B: no published settings
    assert laptop.search.changes() == {"threshold": 3.0, "relative": True, "highest_layer": 8}
    assert laptop.top_k == 16
    assert PROFILES["smoke"].testtime.testtime.search.changes() == {"threshold": PLANTED_THRESHOLD}


def scaled_tiny():
    """A tiny DINOv2 whose patch-token norms grow through the blocks across 150 (its patch embedding and
    LayerScale scaled up; median 83, 156 and 191 at the three blocks' outputs), with a [CLS] of norm about 2,800."""
    model = tiny("dinov2")
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(3.0)
        model.cls_token.fill_(500.0)
        for blk in model.blocks:
            blk.ls1.gamma.mul_(30.0)
            blk.ls2.gamma.mul_(30.0)
    return model


def block_output_norms(model, x):
    outs = {}
    hooks = [blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.norm(dim=-1)))
             for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    return outs


def test_outliers_are_patches_above_norm_150_at_the_second_to_last_blocks_output():
    model = scaled_tiny()
    x = images(model, n=6)
    norms = block_output_norms(model, x)                   # blocks 0, 1, 2: -2 is block 1
    expected = norms[1] > 150
    expected[:, 0] = False                                 # the [CLS] is never one
    assert 0 < int(expected.sum()) < expected[:, 1:].numel()    # the threshold cuts through the patches
    assert (norms[1][:, 0] > 150).all()                    # the [CLS] would count
    got = outlier_tokens(model, x)
    assert torch.equal(got, expected)
    patches = torch.arange(norms[1].shape[1]) > 0
    for other in (0, 2):                                   # another block's output gives another answer ...
        assert not torch.equal(got, (norms[other] > 150) & patches)
    assert not torch.equal(got, (norms[1] > 3 * norms[1].median()) & patches)   # ... and so does 3 x the median


def test_prefix_tokens_never_count_as_outliers():
    model = tiny("dinov2_reg4")
    with torch.no_grad():
        model.cls_token.fill_(50.0)
        model.reg_token.fill_(50.0)                        # [CLS] and registers of huge norm
    x = images(model, n=3)
    norms = block_output_norms(model, x)[1]
    t = float(norms[:, 5:].max())                          # above every patch, below every prefix token
    assert (norms[:, :5] > t).all()
    assert not outlier_tokens(model, x, threshold=t).any()
    assert outlier_tokens(model, x, threshold=t, prefix_tokens=True)[:, :5].all()
    with pytest.warns(UserWarning, match="no high-norm outliers"):
        assert find_outlier_neurons(model, x, threshold=t) == {}


def deep_tiny(depth: int):
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, embed_dim=32, depth=depth, num_heads=2,
                              num_classes=0, img_size=28)
    with torch.no_grad():
        _reinit(model, torch.Generator().manual_seed(depth))
    return model.double().eval()


def test_blocks_up_to_17_are_searched_and_50_units_kept():
    model = deep_tiny(20)
    x = images(model, n=2)
    everything = find_outlier_neurons(model, x, top_k=10 ** 9, threshold=0.0, sparsity_filter=False)
    assert sorted(everything) == list(range(18))           # blocks 0-17 of 20, none after
    assert sum(len(u) for u in find_outlier_neurons(model, x, threshold=0.0).values()) == 50
    assert sorted(find_outlier_neurons(model, x, top_k=10 ** 9, threshold=0.0, sparsity_filter=False,
                                       highest_layer=-3)) == list(range(18))   # negative: from the end
    shallow = tiny("dinov2")                               # 3 blocks: every block
    assert sorted(find_outlier_neurons(shallow, images(shallow), top_k=10 ** 9, threshold=0.0,
                                       sparsity_filter=False)) == [0, 1, 2]
    with pytest.raises(RegclsError, match="detection at block 3"):
        find_outlier_neurons(shallow, images(shallow), detect_layer=3)


def published_search(model, x, top_k, threshold, highest_layer=17, sparsity=True):
    """The published search written out image by image: the norms at the second-to-last block's output, the
    outliers above ``threshold`` (patches only); per block and unit the mean |activation| over the image's outliers,
    zero where fewer than half the image's tokens are below 0.5; the mean over the images with an outlier; all
    (block, unit) pairs sorted by it, those of blocks above ``highest_layer`` dropped, the first ``top_k`` kept."""
    P, L = model.num_prefix_tokens, len(model.blocks)
    per_image = []
    for i in range(len(x)):
        out, act = {}, {}
        hooks = [model.blocks[L - 2].register_forward_hook(lambda m, a, o: out.__setitem__("x", o[0]))]
        hooks += [blk.mlp.fc2.register_forward_pre_hook(lambda m, a, b=b: act.__setitem__(b, a[0][0]))
                  for b, blk in enumerate(model.blocks)]
        with torch.no_grad():
            model.forward_features(x[i:i + 1])
        for h in hooks:
            h.remove()
        where = [t for t in range(P, out["x"].shape[0]) if out["x"][t].norm() > threshold]
        if not where:
            continue
        rows = []
        for b in range(L):
            score = act[b][where].abs().mean(dim=0)
            if sparsity:
                score = score * ((act[b] < 0.5).sum(dim=0) >= 0.5 * act[b].shape[0])
            rows.append(score)
        per_image.append(torch.stack(rows))
    mean = torch.stack(per_image).mean(dim=0)              # (blocks, units)
    ranked = [(k // mean.shape[1], k % mean.shape[1]) for k in mean.flatten().argsort(descending=True).tolist()]
    found = {}
    for b, u in [(b, u) for b, u in ranked if b <= highest_layer][:top_k]:
        found.setdefault(b, []).append(u)
    return {b: tuple(us) for b, us in sorted(found.items())}


def test_units_are_ranked_as_published():
    model = tiny("dinov2")
    dense = (7, 70, 100)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.bias[list(dense)] = 3.0    # dense units: large on every token
    x = images(model, n=6)
    norms = block_output_norms(model, x)[1][:, 1:]
    a = norms.max(dim=1).values.min()                      # above the largest norm of one image: it has no
    t = float((a + norms[norms > a].min()) / 2)            # outlier (and no norm near the threshold), ...
    counts = (norms > t).sum(dim=1)
    assert len(set(counts.tolist())) > 2 and (counts == 0).any()   # ... the others different numbers
    got = find_outlier_neurons(model, x, top_k=12, threshold=t)
    assert got == published_search(model, x, 12, t)
    assert not set(dense) & set(got.get(0, ()))           # the sparsity filter drops the dense units ...
    unfiltered = find_outlier_neurons(model, x, top_k=12, threshold=t, sparsity_filter=False)
    assert unfiltered == published_search(model, x, 12, t, sparsity=False)
    assert set(dense) <= set(unfiltered[0])                # ... which rank first without it
    pooled = find_outlier_neurons(model, x, top_k=12, threshold=t, ranking="pooled")
    assert pooled != got                                   # the per-image mean decides the order


# ----------------------------------------------------------------------- the variant: our earlier search

def old_find_outlier_neurons(model, images, top_k, last_block=None, factor=3.0, batch_size=16):
    """The search as this project had it before it followed the published one (commit bf42280), unchanged."""
    blocks = model.blocks
    probe_at = len(blocks) - 2
    last_block = probe_at - 1 if last_block is None else last_block
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    seen = {}
    hook = blocks[probe_at].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        norms = []
        with torch.inference_mode():
            for x in batches:
                model.forward_features(x)
                norms.append(seen["x"].float().norm(dim=-1))
    finally:
        hook.remove()
    norms_ = torch.cat(norms)
    outlier = norms_ > factor * norms_.median()
    if not outlier.any():
        return {}
    hidden = blocks[0].mlp.fc2.in_features
    score = torch.zeros(last_block + 1, hidden, dtype=torch.float64)
    mask = {}

    def accumulate(b):
        def hook(_mod, args):
            score[b] += args[0].abs()[mask["m"]].double().sum(dim=0).cpu()
        return hook

    handles = [blocks[b].mlp.fc2.register_forward_pre_hook(accumulate(b)) for b in range(last_block + 1)]
    try:
        at = 0
        with torch.inference_mode():
            for x in batches:
                mask["m"] = outlier[at:at + len(x)].to(x.device)
                at += len(x)
                model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    score /= int(outlier.sum())
    order = score.flatten().argsort(descending=True)[:top_k]
    found = {}
    for k in order.tolist():
        found.setdefault(k // hidden, []).append(k % hidden)
    return {b: tuple(us) for b, us in sorted(found.items())}


@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg4"])
def test_the_relative_variant_is_the_earlier_search(family):
    model = deep_tiny(6) if family == "dinov2" else tiny(family)
    with torch.no_grad():
        model.cls_token.mul_(20.0)                         # a high-norm [CLS]: the variant counts it
    x = images(model, n=5)
    assert outlier_tokens(model, x, "relative", threshold=1.3)[:, 0].any()
    for k, factor in ((5, 1.3), (40, 1.1)):
        old = old_find_outlier_neurons(model, x, k, factor=factor, batch_size=2)
        assert old and find_outlier_neurons(model, x, k, "relative", batch_size=2, threshold=factor) == old


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
    smoke, base, x = planted_case
    search = smoke.testtime.testtime.search                # the published search, the planted model's threshold
    assert search == replace(PUBLISHED, threshold=PLANTED_THRESHOLD)
    assert find_outlier_neurons(base, x, top_k=2, search=search) == {planted.OUTLIER_BLOCK: planted.OUTLIER_UNITS}
    more = find_outlier_neurons(base, x, top_k=6, search=search)
    assert more[planted.OUTLIER_BLOCK][:2] == planted.OUTLIER_UNITS   # ranked first, then the rest
    assert find_outlier_neurons(base, x, 2, "relative") == {planted.OUTLIER_BLOCK: planted.OUTLIER_UNITS}


@pytest.mark.parametrize("profile", ["smoke", "smoke-laptop"])
def test_the_planted_threshold_separates_the_planted_outliers(profile):
    """Why the smoke profiles replace the published threshold: the planted outliers' norms straddle 150, and
    PLANTED_THRESHOLD lies between them and every other token's norm, on the calibration images."""
    spec = PROFILES[profile].testtime
    base = build(replace(spec, testtime=None), PROFILES[profile].img_size)
    x = calibration_images(base, spec.testtime.calibration, spec.testtime.images, PROFILES[profile].img_size)
    norms = block_output_norms(base, x)[len(base.blocks) - 2]
    planted_at = [base.num_prefix_tokens + p for p in planted.OUTLIER_PATCHES]
    others = torch.ones(norms.shape[1], dtype=torch.bool)
    others[planted_at] = False
    assert norms[:, planted_at].min() > 2 * PLANTED_THRESHOLD and norms[:, others].max() < PLANTED_THRESHOLD / 2
    assert norms[:, planted_at].min() < PUBLISHED_THRESHOLD < norms[:, planted_at].max()
    assert set(torch.nonzero(outlier_tokens(base, x, spec.testtime.search))[:, 1].tolist()) == set(planted_at)


def test_a_high_norm_cls_does_not_make_its_units_count(planted_case):
    """The planted model with a unit of block 0 that fires on the [CLS] only and makes it the highest-norm token:
    the published search (patches only) still finds the planted units; counting the [CLS] would take its unit."""
    smoke, base, x = planted_case
    model = copy.deepcopy(base)
    C, u = torch.arange(8, 12), 40                         # dimensions only the [CLS] carries, and its unit
    with torch.no_grad():
        _reserve(model, C)
        model.cls_token[..., C] = 3.0
        mlp = model.blocks[0].mlp
        mlp.fc1.weight[u] = 0.0
        mlp.fc1.weight[u, C] = 30.0
        mlp.fc1.bias[u] = -5.0
        mlp.fc2.weight[C, u] = 2.0
    search = smoke.testtime.testtime.search
    norms = block_output_norms(model, x)[len(model.blocks) - 2]
    assert (norms[:, 0] > PUBLISHED_THRESHOLD).all() and (norms.argmax(dim=1) == 0).all()
    assert find_outlier_neurons(model, x, top_k=2, search=search) == {planted.OUTLIER_BLOCK: planted.OUTLIER_UNITS}
    assert u not in find_outlier_neurons(model, x, top_k=20, search=search).get(0, ())
    assert u in find_outlier_neurons(model, x, top_k=2, search=search, prefix_tokens=True).get(0, ())


def test_a_model_without_outliers_gets_no_units():
    model = tiny("dinov2")
    with pytest.warns(UserWarning, match="no high-norm outliers"):
        assert find_outlier_neurons(model, images(model), top_k=4, threshold=1e6) == {}
    with pytest.warns(UserWarning, match="no high-norm outliers"):
        assert find_outlier_neurons(model, images(model), top_k=4, search="relative", threshold=1e6) == {}


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
