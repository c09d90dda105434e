"""The maps of the last-layer [CLS] over the patches (regcls.maps): rank agreement, the rebuilt outputs, and the two
planted known answers (values of equal norm: the attention and contribution maps agree; very unequal: they do
not). The trace arrays themselves are tested against timm in tests/test_trace_exact.py."""
import numpy as np
import pytest

from regcls import maps as Mp
from regcls.cache import get_trace
from regcls.metrics import cka, cosine
from regcls.profiles import MAP_CONTROLS
from regcls.tracefile import MAPS, TOP_PERCENT


def test_spearman_per_row():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = np.array([[10.0, 20.0, 35.0, 400.0], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_allclose(Mp.spearman(a, b), [1.0, -1.0])
    c = np.array([[2.0, 1.0, 4.0, 3.0]])
    assert Mp.spearman(a[:1], c)[0] == pytest.approx(0.6)     # 1 - 6 * 4 / (4 * 15)


@pytest.fixture(scope="module")
def controls(smoke):
    return {name: get_trace(spec, smoke.dataset, img_size=smoke.img_size, progress=False)
            for name, spec in MAP_CONTROLS.items()}


def test_equal_value_norms_make_the_attention_and_contribution_maps_agree(controls):
    t = controls["equal value norms"]
    assert Mp.rank_agreement(t)["attn ~ norm"] > 0.999
    m = Mp.patch_maps(t)
    ratio = m["norm"] / m["attn"]                                 # contribution = attention x one constant
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-4)
    for k in TOP_PERCENT:                                         # the same patches, the same rebuilt output
        np.testing.assert_allclose(t[f"rebuilt_attn_{k}"], t[f"rebuilt_norm_{k}"], rtol=1e-5, atol=1e-6)


def test_unequal_value_norms_make_them_disagree(controls):
    t = controls["unequal value norms"]
    assert Mp.rank_agreement(t)["attn ~ norm"] < 0.5
    rows = {(r["map"], r["top %"]): r for r in Mp.rebuilt_closeness(t)}
    assert set(rows) == {(m, k) for m in MAPS for k in TOP_PERCENT}
    # the patches with the largest contributions rebuild the patch part better than those with the most attention
    assert rows["norm", 10]["CKA patch part"] > rows["attn", 10]["CKA patch part"] + 0.1


# ------------------------------------------------------------- the output without the projection bias (float64)

def _contributions_trace(z: np.ndarray, rest: np.ndarray, bias: np.ndarray) -> dict:
    """A trace's arrays computed as the tracer computes them, from per-patch contributions ``z`` (n, Np, D), the
    [CLS] and register parts together ``rest`` (n, D) and the projection bias (D,): the direct computation."""
    patch = z.sum(axis=1)
    full = patch + rest + bias
    unit = full / np.linalg.norm(full, axis=-1, keepdims=True)
    return {"attn_out_patch": patch, "attn_out_full": full, "attn_out_bias": bias,
            "contrib_proj": np.einsum("npd,nd->np", z, unit), "contrib_norm_ls": np.linalg.norm(z, axis=-1)}


def _direct_projection_without_bias(z, t):
    u = t["attn_out_full"] - t["attn_out_bias"]
    return np.einsum("npd,nd->np", z, u / np.linalg.norm(u, axis=-1, keepdims=True))


def test_the_projection_on_the_output_without_bias_lies_within_its_bound():
    rng = np.random.default_rng(0)
    z, rest = rng.standard_normal((20, 30, 16)), rng.standard_normal((20, 16))
    bias = 3 * rng.standard_normal(16)
    t = _contributions_trace(z, rest, bias)
    known, bound = Mp.projection_without_bias(t)
    exact = _direct_projection_without_bias(z, t)
    assert (np.abs(exact - known) <= bound + 1e-12).all()
    assert np.abs(exact - known).max() > 0.1 * bound.max()                   # the bias moves them: a real bound
    leverage = Mp.bias_leverage(t)                                            # ... per cosine: |b| / |u|
    cos_gap = np.abs(exact - known) / t["contrib_norm_ls"]
    assert (cos_gap <= leverage[:, None] + 1e-12).all()
    np.testing.assert_allclose(leverage, np.linalg.norm(bias) / np.linalg.norm(t["attn_out_full"] - bias, axis=-1))
    np.testing.assert_allclose(exact.sum(axis=1),                             # the sum over the patches is exact
                               np.einsum("nd,nd->n", t["attn_out_patch"], (u := t["attn_out_full"] - bias))
                               / np.linalg.norm(u, axis=-1), rtol=1e-12)
    np.testing.assert_array_equal(known.argsort(axis=1), t["contrib_proj"].argsort(axis=1))   # the same map's ranks


def test_the_bound_is_attained_and_vanishes_without_bias():
    rng = np.random.default_rng(1)
    rest, bias = rng.standard_normal((4, 8)), rng.standard_normal(8)
    z = rng.standard_normal((4, 6, 8))
    z[:, 0] = 2.0 * bias                                                     # a contribution along the bias
    t = _contributions_trace(z, rest, bias)
    known, bound = Mp.projection_without_bias(t)
    np.testing.assert_allclose(np.abs(_direct_projection_without_bias(z, t) - known)[:, 0], bound[:, 0], rtol=1e-12)
    t0 = _contributions_trace(z, rest, np.zeros(8))
    known0, bound0 = Mp.projection_without_bias(t0)
    assert not bound0.any() and (Mp.bias_leverage(t0) == 0).all()
    np.testing.assert_allclose(known0, _direct_projection_without_bias(z, t0), rtol=1e-12)   # exact without bias


def test_the_trace_does_not_fix_the_projection_on_the_output_without_bias():
    """Why :func:`regcls.maps.projection_without_bias` gives a bound: two sets of contributions with every stored
    per-patch array and every total the same, whose projections on the output without the bias differ."""
    e = np.eye(5)
    y, bias = 6.0 * e[0] + 1.5 * e[1], 1.5 * e[1]          # the output (with the bias) and the bias
    uy = y / np.linalg.norm(y)
    w = 1.5 * e[0] - 6.0 * e[1]
    uw = w / np.linalg.norm(w)                             # across the output's direction, not across the bias
    a = np.stack([1.0 * uy + 0.5 * uw, 2.0 * uy - 0.5 * uw])[None]       # patch contributions, one way ...
    b = np.stack([1.0 * uy + 0.5 * e[3], 2.0 * uy - 0.5 * e[3]])[None]   # ... and another
    rest = (y - bias - a[0].sum(axis=0))[None]             # the [CLS] and register parts: the same for both
    ta, tb = _contributions_trace(a, rest, bias), _contributions_trace(b, rest, bias)
    for key in ta:                                         # every stored array the same ...
        np.testing.assert_allclose(ta[key], tb[key], rtol=0, atol=1e-14)
    np.testing.assert_allclose(ta["attn_out_full"][0], y, atol=1e-14)
    pa, pb = _direct_projection_without_bias(a, ta), _direct_projection_without_bias(b, tb)
    assert abs(pa[0, 0] - pb[0, 0]) > 0.1                  # ... the projections on y - b not
    known, bound = Mp.projection_without_bias(ta)
    assert (np.abs(pa - known) <= bound).all() and (np.abs(pb - known) <= bound).all()


def test_closeness_is_judged_against_the_output_without_bias():
    rng = np.random.default_rng(2)
    z, rest = rng.standard_normal((40, 20, 8)), rng.standard_normal((40, 8))
    bias = 5 * rng.standard_normal(8)
    t = _contributions_trace(z, rest, bias)
    t["rebuilt_attn_10"] = z[:, :2].sum(axis=1)
    row, = Mp.rebuilt_closeness(t, maps=("attn",), percents=(10,))
    without = t["attn_out_full"] - bias
    assert row["cos output"] == pytest.approx(float(np.median(cosine(t["rebuilt_attn_10"], without))))
    assert abs(row["cos output"] - float(np.median(cosine(t["rebuilt_attn_10"], t["attn_out_full"])))) > 0.05
    # CKA centres its inputs: the bias, one constant for every image, never changed it
    assert row["CKA output"] == pytest.approx(cka(t["rebuilt_attn_10"], t["attn_out_full"]), rel=1e-12)


# ------------------------------------------------------- the chapter's claims on the planted known answers

def test_the_maps_claims_on_the_planted_known_answers(controls, smoke):
    from regcls.rules import maps_checks

    equal = maps_checks("Beyond", controls["equal value norms"], smoke, label="equal", n_boot=100)
    assert [r.agrees for r in equal] == [False, False]     # one ranking, the same top patches: no difference
    assert "paired difference 0.000 [0.000, 0.000]" in equal[1].ours
    unequal = maps_checks("Beyond", controls["unequal value norms"], smoke, label="unequal", n_boot=100)
    assert [r.agrees for r in unequal] == [True, True]     # the long values rebuild the patch part, not the attended
    d = Mp.rebuilt_contrast(controls["unequal value norms"], 10, n_boot=100)
    assert d.low > 0.05                                    # built: 0.14 [0.08, 0.21]
    assert Mp.rebuilt_contrast(controls["unequal value norms"], 10, "attn", "norm", n_boot=100).high < 0
