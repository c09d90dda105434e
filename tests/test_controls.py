"""Positive and negative controls: every analysis must find what the planted models were built to show
(see the expected values in regcls.planted), and must not find it in the negative control."""
import numpy as np
import pytest

from regcls import metrics as M
from regcls.cache import get_trace
from regcls.planted import HIGH
from regcls.probe import linear_probe


@pytest.fixture(scope="module")
def tr(smoke):
    """Traces of the planted smoke models on the shipped images: tr(size, registers, labelled=False)."""
    cache = {}

    def get(size, registers, labelled=False):
        key = (size, registers, labelled)
        if key not in cache:
            ds = smoke.labelled if labelled else smoke.dataset
            cache[key] = get_trace(smoke.model(size, registers), ds, img_size=smoke.img_size, progress=False)
        return cache[key]
    return get


POS_REG, NEG = ("g", True), ("S", True)     # register_reader, patch_integrator (with registers)
POS_SKIP, NEG_NOREG = ("g", False), ("S", False)  # skip_dominated, patch_integrator (no registers)


def test_smoke_sizes_are_the_planted_controls(smoke):
    assert smoke.model("g", True).weights == "planted:register_reader"
    assert smoke.model("g", False).weights == "planted:skip_dominated"
    assert smoke.model("S", True).weights == smoke.model("S", False).weights == "planted:patch_integrator"


def test_shares(tr):
    pos, neg = M.shares(tr(*POS_REG)), M.shares(tr(*NEG))
    assert pos["reg"].min() > 0.95
    assert neg["patch"].min() > 0.9 and neg["reg"].max() < 0.1


def test_knockout_cka(tr):
    kp, kn = M.knockout(tr(*POS_REG)), M.knockout(tr(*NEG))
    assert M.cka(kp["full"], kp["reg"]) > 0.95
    assert M.cka(kp["full"], kp["patch"]) < 0.3          # built: 0.18 (a reader with half the query reaches 0.43)
    assert M.cka(kp["full"], kp["patch"]) < M.cka(kp["full"], kp["reg"]) - 0.1
    assert M.cka(kn["full"], kn["patch"]) > 0.95
    assert M.cka(kn["full"], kn["patch"]) > M.cka(kp["full"], kp["patch"]) + 0.1
    assert (M.norms(kp["patch"] - kp["patch"].mean(0)) < 0.1 * M.norms(kp["full"] - kp["full"].mean(0))).mean() > 0.9


def test_skip_norms(tr):
    pos, neg = tr(*POS_SKIP), tr(*NEG_NOREG)
    assert (M.norms(pos["skip"]) > 5000 * M.norms(pos["attn_out_patch"])).all()   # built: > 11,000x (10x weaker fails)
    assert np.median(M.norms(neg["attn_out_patch"])) > 2 * np.median(M.norms(neg["skip"]))


def test_skip_cka(tr):
    sp, sn = M.skip_outputs(tr(*POS_SKIP)), M.skip_outputs(tr(*NEG_NOREG))
    assert M.cka(sp["standard"], sp["skip"]) > 0.99
    assert M.cka(sp["standard"], sp["patch"]) < 0.5    # its patch part holds positions, not image content
    assert M.cka(sn["standard"], sn["patch"]) > 0.95
    assert M.cka(sn["standard"], sn["skip"]) < M.cka(sp["standard"], sp["skip"]) - 0.03


def test_layer_cosine(tr):
    assert M.layer_cosine(tr(*POS_SKIP))[:, -2].min() > 0.99
    assert M.layer_cosine(tr(*NEG_NOREG))[:, -2].max() < 0.9


def test_high_norm_register(tr):
    pos, neg = tr(*POS_REG), tr(*NEG)
    hp, hn = M.highest_norm_token(pos), M.highest_norm_token(neg)
    assert hp.mode == 1 + HIGH and hp.mode_fraction == 1.0 and hp.ratio.min() > 3
    assert hn.mode_fraction < 0.5
    X = pos["prefix_penult"][:, 1 + HIGH]
    assert M.mean_pairwise_cosine(X) > 0.99
    assert M.mean_pairwise_cosine(neg["prefix_penult"][:, 1 + HIGH]) < 0.95
    dims, before = M.top_dims_mean(X, k=4)
    _, after = M.top_dims_mean(pos["prefix_penult_ln"][:, 1 + HIGH], dims=dims)
    assert (before > 100 * after).all()   # built: > 1,000x


def test_probe_reads_class_from_seemingly_constant_register(tr):
    lab = tr(*POS_REG, labelled=True)
    res = linear_probe(lab["prefix_penult"][:, 1 + HIGH], lab["labels"])
    assert res.accuracy > res.chance + 0.4
    shuffled = np.random.default_rng(0).permutation(lab["labels"])
    assert linear_probe(lab["prefix_penult"][:, 1 + HIGH], shuffled).accuracy < res.accuracy - 0.3


def test_oneshot(tr):
    def accuracy(trace, part):
        k, y = M.knockout(trace), trace["labels"]
        accs = []
        for seed in range(5):
            a, b = M.oneshot_split(y, seed)
            accs.append(M.oneshot(k["full"][a], y[a], {part: k[part][b]}, y[b], k=1)[part])
        return np.mean(accs)
    pos, neg = tr(*POS_REG, labelled=True), tr(*NEG, labelled=True)
    chance = 1 / len(np.unique(pos["labels"]))
    assert accuracy(pos, "patch") < chance + 0.15 < accuracy(pos, "reg") - 0.3
    assert accuracy(neg, "patch") > chance + 0.4


def test_attention_maps_hold_the_patch_share(tr):
    for size, reg in (POS_REG, NEG, POS_SKIP):
        t = tr(size, reg)
        maps = M.attention_maps(t)
        assert maps.shape[1:] == t.grid
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), M.shares(t)["patch"], rtol=1e-4)


def test_the_dinov3_stand_ins_are_planted_like_the_dinov2_ones(smoke):
    """The same planted kinds on timm's Eva (DINOv3's layout: rotary embedding, gamma_1 LayerScale, q_bias): the
    register reader attends to its registers and its register-only output carries the [CLS] output; the patch
    integrator attends to its patches."""
    v3 = {m.size: m for m in smoke.dinov3}
    reader = get_trace(v3["H+"], smoke.dataset, img_size=smoke.img_size, progress=False)
    integrator = get_trace(v3["S"], smoke.dataset, img_size=smoke.img_size, progress=False)
    assert v3["H+"].weights == "planted:register_reader" and v3["S"].weights == "planted:patch_integrator"
    assert M.shares(reader)["reg"].min() > 0.95
    assert M.shares(integrator)["patch"].min() > 0.9
    k = M.knockout(reader, level="val")
    assert M.cka(k["full"], k["reg"]) > 0.95 > M.cka(k["full"], k["patch"]) + 0.1


def test_a_register_reader_needs_a_query_bias():
    import timm

    from regcls.errors import RegclsError
    from regcls.planted import plant

    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=32, num_classes=0,
                              embed_dim=24, depth=2, num_heads=2)   # DINOv3 without qkv bias
    with pytest.raises(RegclsError, match="register_reader needs a query bias"):
        plant(model, "register_reader")
    plant(model, "patch_integrator")   # the other kinds need none


@pytest.mark.slow
def test_random_networks_fail_the_mirrors_dinov2_rule_and_the_planted_pattern_passes_it(smoke):
    """The appendix's "CLIP and iBOT mirror DINOv2" (Fig. 9) is a test only if a network without DINOv2's pattern fails
    it: the smoke profile's random-initialised CLIP and iBOT stand-ins, and a deep random ViT over a shallow one (whose
    deeper residual stream settles before its last block: the layer-wise half alone passes, the disconnect is
    missing), fail every "mirrors DINOv2" row; the planted pattern (the DeiT III stand-ins: a patch integrator, then a
    skip-dominated model) passes it."""
    from regcls.rules import appendix_mirrors_check
    from regcls.profiles import _tiny

    def row(family, specs):
        traces = {m.size: get_trace(m, smoke.dataset, img_size=smoke.img_size, limit=32, progress=False) for m in specs}
        M.same_images(traces.values())
        return appendix_mirrors_check(family, {s: M.layer_cosine(t) for s, t in traces.items()},
                                      {s: M.skip_outputs(t) for s, t in traces.items()}, smoke, [], n_boot=100)

    families = dict(smoke.appendix)
    deep_over_shallow = (_tiny("S", "vit_small_patch16_224", "random:2", embed_dim=48, depth=4, num_heads=3),
                         _tiny("L", "vit_large_patch16_224", "random:2", embed_dim=96, depth=12, num_heads=4))
    for family, specs in (("CLIP", families["CLIP"]), ("iBOT", families["iBOT"]), ("random deep/shallow", deep_over_shallow)):
        assert all(m.weights.startswith("random:") for m in specs)
        r = row(family, specs)
        assert r.agrees is False, f"{family}: a random network mirrors DINOv2: {r.rule}"
    r = row("DeiT III", families["DeiT III"])
    assert [m.weights for m in families["DeiT III"]] == ["planted:patch_integrator", "planted:skip_dominated"]
    assert r.agrees is True, r.rule
