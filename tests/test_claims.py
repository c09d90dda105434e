"""Every kind of agreement rule on both sides of its threshold, in milliseconds (the chapters' rows are checked
again, slowly, through the smoke verdicts): a rule that silently passes, or drops a size, fails here."""
import numpy as np
import pytest

from regcls import claims as C
from regcls import rules as R
from regcls import metrics as M
from regcls.profiles import LESS_DATA, PROFILES


@pytest.mark.parametrize("rule, ok", [
    (C.above("x", 0.51, 0.5), True), (C.above("x", 0.5, 0.5), False), (C.above("x", 0.49, 0.5), False),
    (C.below("x", 0.49, 0.5), True), (C.below("x", 0.5, 0.5), False), (C.below("x", 0.51, 0.5), False),
    (C.within_factor("x", 0.003, 0.001, 3), True), (C.within_factor("x", 0.0034, 0.001, 3), False),
    (C.within_factor("x", 0.0003, 0.001, 3), False), (C.within_factor("x", 0.00034, 0.001, 3), True),
    (C.interval_above("d", (0.3, 0.11, 0.5), 0.1), True), (C.interval_above("d", (0.3, 0.09, 0.5), 0.1), False),
    (C.interval_above("d", (0.3, 0.1, 0.5), 0.1), False),
    (C.monotone("v", {"S": 0.1, "B": 0.2, "L": 0.3}), True), (C.monotone("v", {"S": 0.1, "B": 0.3, "L": 0.2}), False),
    (C.monotone("v", {"S": 0.1, "B": 0.1}), False),     # a tie is no rise without a tolerance
    (C.monotone("v", {"S": 0.3, "B": 0.2, "L": 0.1}, increasing=False), True),
    (C.monotone("v", {"S": 0.3, "B": 0.31, "L": 0.1}, increasing=False, tol=0.02), True),
    (C.monotone("v", {"S": 0.3, "B": 0.33, "L": 0.1}, increasing=False, tol=0.02), False),
    (C.monotone("v", {"S": 0.3}), False),                # one value shows no trend
    (C.all_of(C.above("a", 1, 0), C.below("b", 0, 1)), True), (C.all_of(C.above("a", 1, 0), C.below("b", 2, 1)), False),
    (C.interval_below("d", (0.1, 0.0, 0.24), 0.25), True), (C.interval_below("d", (0.1, 0.0, 0.26), 0.25), False),
    (C.interval_below("d", (0.1, 0.0, 0.25), 0.25), False),

    (C.rises_within("r", {"S": 1.0, "B": 0.6, "L": 2.0}, 2), True),     # a step back by less than 2x is level
    (C.rises_within("r", {"S": 1.0, "B": 0.5}, 2), False), (C.rises_within("r", {"S": 1.0, "B": 0.4, "L": 9.0}, 2), False),
    (C.rises_within("r", {"S": 1.0}, 2), False),
])
def test_each_rule_kind_on_both_sides(rule, ok):
    assert rule.ok is ok and isinstance(rule.text, str) and rule.text


def test_rule_texts_show_the_numbers_they_judge():
    assert C.interval_above("paired g - S", (0.3, 0.21, 0.4), 0.1).text == "paired g - S 0.30 [0.21, 0.40] above 0.10"
    assert C.monotone("share", {"S": 0.1, "g": 0.9}).text == "share rises with size: S 0.10 < g 0.90"
    assert "steps back of at most 0.02 allowed" in C.monotone("v", {"S": 1, "B": 0.5}, False, tol=0.02).text


def test_a_row_is_judged_by_its_rule_and_only_where_the_sizes_are_there():
    smoke, lap = PROFILES["smoke"], PROFILES["smoke-laptop"]
    calls = []

    def ours():
        calls.append(1)
        return "S 0.1"

    row = C.check("3.1", "c", "p", ours, lambda: C.above("S", 0.1, 0.5), smoke, needs=("S", "g"))
    assert row.agrees is False and row.rule == "S 0.10 > 0.50" and row.ours == "S 0.1" and calls == [1]
    row = C.check("3.1", "c", "p", ours, lambda: C.above("S", 0.1, 0.5), lap, needs=("S", "g"))
    assert row.agrees is None and "needs g" in row.ours and calls == [1]    # not computed where g is missing
    assert C.verdict(row) == "not testable"


def test_a_row_that_could_not_be_computed_is_neither_agreement_nor_failure():
    row = C.not_computed("App.", "iBOT: the appendix claims", "Figs. 7-9", "no iBOT checkpoint in REGCLS_CHECKPOINTS",
                         PROFILES["smoke"])
    assert row.agrees is None and row.status == "not computed" and C.verdict(row) == "not computed"
    assert row.ours.startswith("not computed: no iBOT checkpoint")
    assert C.verdict(C.ClaimCheck("3.1", "c", "p", "o", False, "smoke")) == "no"
    assert C.verdict(C.ClaimCheck("3.1", "c", "p", "o", True, "smoke")) == "yes"
    again = C.ClaimCheck(**{k: v for k, v in row.__dict__.items()})   # as the claims page reads a record
    assert C.verdict(again) == "not computed"


def _knockout(patch_cka: dict, reg_over_patch_in_g: bool, n=200, seed=0):
    """Knockout outputs whose patch-only part has roughly the given CKA with the full output, per size."""
    rng = np.random.default_rng(seed)
    out = {}
    for s, target in patch_cka.items():
        shared = rng.standard_normal((n, 6))
        noise = rng.standard_normal((n, 6))
        w = np.sqrt(max(1e-6, 1 / max(target, 1e-3) - 1))
        patch = shared + w * noise
        reg = shared * (3 if (s == "g" and reg_over_patch_in_g) else 0.1) + rng.standard_normal((n, 6))
        out[s] = {"full": shared, "patch": patch, "reg": reg}
    return out


def test_the_knockout_rules_on_both_sides():
    smoke = PROFILES["smoke"]
    good = R.knockout_checks("3.3", _knockout({"S": 0.99, "B": 0.98, "L": 0.6, "g": 0.2}, True), smoke, n_boot=50)
    assert [r.agrees for r in good] == [True, True, True]
    bad = R.knockout_checks("3.3", _knockout({"S": 0.97, "B": 0.7, "L": 0.6, "g": 0.9}, False), smoke, n_boot=50)
    assert [r.agrees for r in bad] == [False, False, False]     # B too low; no collapse; g reads its patches


def _maps_trace(unequal: bool, n=120, Np=40, D=8, seed=0) -> dict:
    """The arrays the maps claims read, built from per-patch contributions: values of one norm (the contribution
    follows the attention) or of norms spread 30-fold independently of it; the top 10% of each map rebuilt."""
    rng = np.random.default_rng(seed)
    attn = rng.dirichlet(np.full(Np, 20.0), size=n)                      # (n, Np) attention, mildly varying
    v = rng.standard_normal((n, Np, D))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    if unequal:
        v *= rng.uniform(0.1, 3.0, size=(n, Np, 1))
    z = attn[:, :, None] * v
    norm = np.linalg.norm(z, axis=-1)
    k = int(np.ceil(0.1 * Np))
    top = {m: np.argsort(-x, axis=1)[:, :k] for m, x in (("attn", attn), ("norm", norm))}
    cls = np.zeros((n, 1, 1 + Np))
    cls[:, 0, 1:] = attn
    return {"meta": {"num_prefix_tokens": 1}, "cls_attn": cls, "contrib_norm_ls": norm, "contrib_proj": norm,
            "attn_out_patch": z.sum(axis=1), "attn_out_full": z.sum(axis=1) + rng.standard_normal((n, D)),
            "attn_out_bias": rng.standard_normal(D),
            **{f"rebuilt_{m}_10": np.take_along_axis(z, t[:, :, None], axis=1).sum(axis=1) for m, t in top.items()}}


def test_the_maps_rules_on_both_sides():
    smoke = PROFILES["smoke"]
    assert [r.agrees for r in R.maps_checks("Beyond", _maps_trace(True), smoke, n_boot=100)] == [True, True]
    same = R.maps_checks("Beyond", _maps_trace(False), smoke, n_boot=100)
    assert [r.agrees for r in same] == [False, False]          # one ranking: the same top patches, no difference
    swapped = _maps_trace(True)                                # the attended patches rebuilding it better instead
    swapped["rebuilt_attn_10"], swapped["rebuilt_norm_10"] = swapped["rebuilt_norm_10"], swapped["rebuilt_attn_10"]
    rows = R.maps_checks("Beyond", swapped, smoke, n_boot=100)
    assert [r.agrees for r in rows] == [True, False] and "paired CKA difference" in rows[1].rule
    assert [r.agrees for r in R.maps_checks("Beyond", _maps_trace(True), PROFILES["smoke-laptop"])] == [None, None]

# --- Sec. 3.2, register norms: each row's rule on both sides, on synthetic numbers --------------------------------

def _norms(n=40, reg=30.0, other_regs=2.0, patch_max=2.0, top=3, seed=0):
    """Token norms (n, 1 + 4 registers + 20 patches): patches in [1, patch_max], the [CLS] 1.5, registers
    ``other_regs`` and token ``top`` at ``reg``."""
    rng = np.random.default_rng(seed)
    norms_ = np.concatenate([np.full((n, 1), 1.5), np.full((n, 4), other_regs), rng.uniform(1, patch_max, (n, 20))], 1)
    norms_[:, top] = reg
    return norms_


def _hn(norms_):
    from regcls.metrics import highest_norm_token
    return highest_norm_token({"token_norms_penult": norms_}, num_registers=4)


def test_the_highest_norm_row_reads_an_order_of_magnitude_as_a_lower_bound():
    smoke = PROFILES["smoke"]
    row = R.highest_norm_check("3.2", _hn(_norms(reg=70.0)), smoke)          # 35x the largest patch: an order
    assert row.agrees is True and "register 3" in row.ours                   # of magnitude, and more
    assert R.highest_norm_check("3.2", _hn(_norms(reg=10.0)), smoke).agrees is False   # 5x the largest patch
    assert R.highest_norm_check("3.2", _hn(_norms(reg=70.0, top=9)), smoke).agrees is False   # a patch is highest
    flip = _norms(reg=70.0)
    flip[::3, 2] = 80.0                                                      # another register is highest on a third
    assert R.highest_norm_check("3.2", _hn(flip), smoke).agrees is False
    shared = _norms(reg=70.0, other_regs=60.0)                               # registers share the norm: the row judges
    row = R.highest_norm_check("3.2", _hn(shared), smoke)                    # them against the non-register tokens
    assert row.agrees is True and "over the next token: median 1.2x" in row.ours
    assert "another register on 100%" in row.ours                            # and says that they share it


def _outlier_token(n=60, outlier=100.0, content=1.0, offset=0.0, seed=1):
    """(n, 50): 3 outlier dimensions at ``outlier`` plus image content (normal, scale ``content``) around ``offset``."""
    rng = np.random.default_rng(seed)
    X = offset + content * rng.standard_normal((n, 50))
    X[:, :3] += outlier
    return X


def test_the_outlier_dimension_row_needs_the_token_below_the_cls_reference_without_them():
    smoke = PROFILES["smoke"]
    cls = 0.5 + np.random.default_rng(2).standard_normal((60, 50))           # [CLS] cosine 0.18
    row = R.outlier_dims_check("3.2", _outlier_token(), cls, smoke, n_boot=100)
    assert row.agrees is True and "the [CLS] token 0.18" in row.ours
    still_constant = _outlier_token(offset=5.0, content=0.3)                 # cosine 0.996 without the outliers
    row = R.outlier_dims_check("3.2", still_constant, cls, smoke, n_boot=100)
    assert row.agrees is False and "0.99" in row.ours
    assert R.outlier_dims_check("3.2", _outlier_token(outlier=2.0), cls, smoke, n_boot=100).agrees is False  # no
    with pytest.raises(ValueError):                                          # outliers dominate; other images
        R.outlier_dims_check("3.2", _outlier_token(), cls[:10], smoke)


def test_the_keys_and_values_row_needs_the_layernormed_outliers_in_the_minority():
    smoke = PROFILES["smoke"]
    X = _outlier_token()
    scaled = X.copy()
    scaled[:, :3] *= 0.001                                                   # the LayerNorm's weight scales them down
    assert R.layernormed_outliers_check("3.2", X, scaled, smoke).agrees is True
    assert R.layernormed_outliers_check("3.2", X, X / 10, smoke).agrees is False   # they still dominate


def _norm_trace(n_outliers_per_image, registers, n=50, seed=3):
    """A trace of token norms (n, 1 + registers + 30 patches) with outlier patches (10x) on some images."""
    rng = np.random.default_rng(seed)
    P = 1 + registers
    norms_ = rng.uniform(40, 60, (n, P + 30))
    for i, k in enumerate(n_outliers_per_image):
        norms_[i, P:P + k] = 500.0
    return {"token_norms_penult": norms_, "image_ids": np.array([f"{i}.jpg" for i in range(n)]),
            "meta": {"num_prefix_tokens": P, "num_registers": registers, "model": f"reg{registers}"}}


def test_the_takeover_row_needs_outliers_without_registers_and_none_with_them_on_the_same_images():
    smoke = PROFILES["smoke"]
    plain = _norm_trace([2] * 45 + [0] * 5, 0)                               # 90% of the images carry outliers
    clean = _norm_trace([0] * 50, 4)
    row = R.high_norm_takeover_check("3.2", clean, plain, smoke, factor=3.0, n_boot=200)
    assert row.agrees is True and "90% without registers, 0% with" in row.ours
    some_left = _norm_trace([1] * 5 + [0] * 45, 4)                           # 10% of the images keep one
    assert R.high_norm_takeover_check("3.2", some_left, plain, smoke, factor=3.0, n_boot=200).agrees is False
    no_outliers = _norm_trace([0] * 50, 0)                                   # nothing to take over
    assert R.high_norm_takeover_check("3.2", clean, no_outliers, smoke, factor=3.0, n_boot=200).agrees is False
    few = _norm_trace([1] * 20 + [0] * 30, 0)                                # 40%: not most images
    assert R.high_norm_takeover_check("3.2", clean, few, smoke, factor=3.0, n_boot=200).agrees is False
    other = dict(clean, image_ids=np.array([f"x{i}.jpg" for i in range(50)]))
    from regcls.errors import RegclsError
    with pytest.raises(RegclsError):                                         # a paired contrast needs the same images
        R.high_norm_takeover_check("3.2", other, plain, smoke, factor=3.0).agrees
    row = R.high_norm_takeover_check("3.2", None, None, PROFILES["smoke-laptop"], factor=3.0)
    assert row.agrees is None and "needs g" in row.ours

# --- Appendix (Figs. 7-9): the rows of other training recipes, on synthetic numbers ------------------------------

def _skip_outputs(patch_cka: dict, n=300, seed=0):
    """Skip outputs whose patch-only part has roughly the given CKA with the standard output, per size."""
    return {s: {"standard": k["full"], "patch": k["patch"]}
            for s, k in _knockout(patch_cka, False, n=n, seed=seed).items()}


def _layer_cosines(penultimate: dict, blocks: dict | None = None, n=300, seed=0):
    """Per-image layer cosines (n, blocks) per size: rising to ``penultimate[size]`` at the block before the last,
    1 at the last, with a little per-image noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for s, pen in penultimate.items():
        L = (blocks or {}).get(s, 8)
        curve = np.append(np.linspace(min(0.2, pen), pen, L - 1), 1.0)
        lc = np.clip(curve + 0.01 * rng.standard_normal((n, L)), -1, 1)
        lc[:, -1] = 1.0
        out[s] = lc
    return out


def _crossing_at(cross: dict, n=300, seed=0):
    """Per-image layer cosines whose image-averaged curve first reaches 0.9 at block k of L (``cross[size] = (k, L)``):
    depth fraction k / L."""
    rng = np.random.default_rng(seed)
    out = {}
    for s, (k, L) in cross.items():
        curve = np.where(np.arange(1, L + 1) < k, 0.6, 0.97)
        curve[-1] = 1.0
        out[s] = np.clip(curve + 0.01 * rng.standard_normal((n, L)), -1, 1)
    return out


DINOV2_PEN = {"S": 0.5, "B": 0.6, "L": 0.97}      # the smaller sizes jump at the last layer, the largest converged
DINOV2_CKA = {"S": 0.97, "B": 0.93, "L": 0.2}     # the smaller sizes' patch-only output faithful, the largest's not


@pytest.mark.parametrize("pen, patch_cka, ok, why", [
    (DINOV2_PEN, DINOV2_CKA, True, "DINOv2's pattern"),
    ({"S": 0.88, "L": 0.92}, {"S": 0.91, "L": 0.97}, False, "as the random iBOT stand-ins: no jump, no disconnect"),
    ({"S": 0.5, "B": 0.6, "L": 0.85}, DINOV2_CKA, False, "the largest not converged before the last block"),
    ({"S": 0.5, "B": 0.93, "L": 0.97}, DINOV2_CKA, False, "a smaller size that does not jump (0.04 below the largest)"),
    (DINOV2_PEN, {"S": 0.8, "B": 0.8, "L": 0.2}, False, "the smallest's patch-only output not faithful"),
    (DINOV2_PEN, {"S": 0.97, "B": 0.93, "L": 0.7}, False, "the largest's patch-only output still represents it"),
    ({"S": 0.85, "L": 0.96}, {"S": 0.96, "L": 0.94}, False,
     "a deep random ViT over a shallow one: the layer-wise half alone passes, the disconnect is missing"),
])
def test_the_mirrors_dinov2_rule_on_both_sides(pen, patch_cka, ok, why):
    row = R.appendix_mirrors_check("CLIP", _layer_cosines(pen), _skip_outputs(patch_cka), PROFILES["smoke"], [],
                                   n_boot=100)
    assert row.agrees is ok, f"{why}: {row.rule}"
    assert row.claim.startswith("CLIP mirrors DINOv2") and "paired" in row.rule


@pytest.mark.parametrize("patch_cka, ok, why", [
    ({"S": 0.97, "B": 0.8, "L": 0.2}, True, "a fall of 0.77 to a low largest size"),
    ({"B": 0.98, "L": 0.92, "H": 0.87}, False, "CLIP's 0.98 -> 0.87: a drop of 0.11, not the main text's 0.3"),
    ({"S": 0.62, "B": 0.52, "L": 0.42}, False, "a low largest size, but a fall of only 0.2 (the drop of 0.1 passed it)"),
    ({"S": 0.99, "L": 0.62}, False, "a drop of 0.37, but the largest's patch-only output still above 0.5"),
    ({"S": 0.97, "B": 0.2, "L": 0.45}, False, "not monotone: B below L"),
])
def test_the_disconnect_rule_on_both_sides(patch_cka, ok, why):
    row = R.appendix_disconnect_check("CLIP", _skip_outputs(patch_cka), PROFILES["smoke"], [], n_boot=100)
    assert row.agrees is ok, f"{why}: {row.rule}"


@pytest.mark.parametrize("cross, early, flat, why", [
    ({"S": (3, 12), "B": (4, 12), "L": (8, 24), "H": (10, 32)}, True, True, "all within the first third, no order"),
    ({"S": (3, 12), "B": (4, 12), "L": (8, 24), "H": (37, 50)}, False, False, "H at 0.74 of the depth: not early"),
    ({"S": (1, 12), "B": (3, 12), "L": (8, 24), "H": (14, 32)}, True, False,
     "early, but a clear trend with size (0.08 -> 0.44)"),
    ({"S": (12, 12), "H": (2, 12)}, False, False, "the smoke stand-ins: S integrates at its last block, H early"),
])
def test_the_deit3_integration_rules_on_both_sides(cross, early, flat, why):
    rows = R.appendix_integration_checks("DeiT III", _crossing_at(cross), PROFILES["smoke"], [], n_boot=100)
    assert [r.agrees for r in rows] == [early, flat], f"{why}: {[r.rule for r in rows]}"
    assert [r.claim for r in rows] == [R.appendix_row("early", "DeiT III")[0],
                                       R.appendix_row("no-size-relation", "DeiT III")[0]]


def test_an_uncertain_integration_depth_is_no_evidence_of_no_size_relation():
    """Few images whose curves straddle 0.9: the interval of the range is wide, so 'no clear relationship' fails."""
    rng = np.random.default_rng(1)
    lc = {s: np.clip(np.append(np.full(L - 1, 0.88), 1.0) + 0.1 * rng.standard_normal((8, L)), -1, 1)
          for s, L in (("S", 12), ("H", 32))}
    for v in lc.values():
        v[:, -1] = 1.0
    rows = R.appendix_integration_checks("DeiT III", lc, PROFILES["smoke"], [], n_boot=200)
    assert rows[1].agrees is False, rows[1].rule


def test_the_depth_fraction_is_the_integration_depth():
    rng = np.random.default_rng(0)
    layers = rng.standard_normal((20, 6, 16)).cumsum(1)   # (n, blocks, D): a [CLS] drifting towards its last state
    trace = {"cls_layers": layers}
    assert R.depth_fraction(M.layer_cosine(trace)) == M.integration_depth(trace)
    assert R.depth_fraction(M.layer_cosine(trace), 0.5) == M.integration_depth(trace, 0.5)


def test_a_family_that_could_not_be_traced_reads_not_computed_in_every_row():
    smoke = PROFILES["smoke"]
    rows = R.appendix_not_computed({"iBOT": "no iBOT checkpoint in REGCLS_CHECKPOINTS"}, smoke)
    computed = [R.appendix_disconnect_check("iBOT", _skip_outputs({"S": 0.9, "L": 0.2}), smoke, [], n_boot=0),
                R.appendix_mirrors_check("iBOT", _layer_cosines({"S": 0.5, "L": 0.97}),
                                         _skip_outputs({"S": 0.9, "L": 0.2}), smoke, [], n_boot=0)]
    names = [r.claim for r in rows]
    assert {c.claim for c in computed} < set(names) and len(names) == 3   # the skip row, the disconnect, mirrors
    assert all(C.verdict(r) == "not computed" and "no iBOT checkpoint" in r.ours for r in rows)
    both = R.appendix_not_computed({"DeiT III": "x", LESS_DATA: "y"}, smoke)   # the tiny row once, not twice
    assert len(both) == len({r.claim for r in both}) == len(R.FAMILY_ROWS["DeiT III"])
    assert [r.claim for r in R.appendix_not_computed({LESS_DATA: "y"}, smoke)] == [R.appendix_row("tiny", "DeiT III")[0]]

# Sec. 4.1: per-image skip/patch ratios, [CLS] depth curves and post-attention outputs, in the size order. A jump at
# the last block (S, B: 4 blocks; L: 6), a smooth climb (g: 8 blocks).
JUMP4, JUMP6 = [0.3] * 3 + [1.0], [0.3] * 5 + [1.0]
SMOOTH8 = list(np.linspace(0.5, 0.97, 7)) + [1.0]
GOOD_DEPTH = {"S": JUMP4, "B": JUMP4, "L": JUMP6, "g": SMOOTH8}
GOOD_RATIO = {"S": 1.0, "B": 1.5, "L": 2.2, "g": 6.0}      # the example: g dominated, the others not
GOOD_CKA = {"S": 0.97, "B": 0.95, "L": 0.6, "g": 0.2}


def _skip_views(ratio=GOOD_RATIO, depth=GOOD_DEPTH, patch_cka=GOOD_CKA, n=300, seed=0):
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 0.3, n)                 # the images' own variation, the same in every size (paired)
    ratios = {s: m * np.exp(shared + rng.normal(0, 0.05, n)) for s, m in ratio.items()}
    curves = {}
    for s, c in depth.items():
        curves[s] = np.clip(np.asarray(c)[None, :] + rng.normal(0, 0.003, (n, len(c))), -1, 1)
        curves[s][:, -1] = 1.0
    outputs = {}
    for s, target in patch_cka.items():
        standard = rng.standard_normal((n, 6))
        w = np.sqrt(max(1e-6, 1 / max(target, 1e-3) - 1))
        outputs[s] = {"standard": standard, "patch": standard + w * rng.standard_normal((n, 6)),
                      "skip": standard + (0.1 if s == "g" else 2.0) * rng.standard_normal((n, 6))}
    return ratios, curves, outputs


def test_the_skip_rules_pass_the_papers_pattern():
    rows = R.skip_checks("4.1", *_skip_views(), PROFILES["smoke"], n_boot=100)
    assert [r.agrees for r in rows] == [True, True, True, True], [r.rule for r in rows if not r.agrees]
    # (the old fixed band -- S, B, L below 3, g above 3 and 3x the largest of them -- failed it: g / L is 2.7)
    assert C.verdict(R.skip_checks("4.1", *_skip_views(), PROFILES["smoke-laptop"])[0]) == "not testable"


def test_fig5a_fails_when_g_is_not_twice_each_smaller_size_or_the_trend_reverses():
    rows = R.skip_checks("4.1", *_skip_views(ratio={"S": 1.0, "B": 1.5, "L": 2.2, "g": 3.0}), PROFILES["smoke"],
                         n_boot=100)
    assert rows[0].agrees is False and "paired g / L skip/patch ratio 1.3" in rows[0].rule
    rows = R.skip_checks("4.1", *_skip_views(ratio={"S": 2.5, "B": 1.0, "L": 1.0, "g": 6.0}), PROFILES["smoke"],
                         n_boot=100)   # g is 2.4x S, but the ratio falls 2.5x from S to B
    assert rows[0].agrees is False and "paired g / S skip/patch ratio 2.4" in rows[0].rule


def test_fig5b_jump_fails_for_a_steady_climb_to_085():
    # L climbs steadily to 0.85 and takes its last step: the old rule (g > 0.9, L < g - 0.1) passed it
    climb = list(np.linspace(0.3, 0.85, 5)) + [1.0]
    rows = R.skip_checks("4.1", *_skip_views(depth={**GOOD_DEPTH, "L": climb}), PROFILES["smoke"], n_boot=100)
    assert rows[1].agrees is False and "L: last block's share of the change 0.2" in rows[1].rule
    # S moves little at all (0.95 -> 1): most of its change is in the last block, but no more than g's
    rows = R.skip_checks("4.1", *_skip_views(depth={**GOOD_DEPTH, "S": [0.94, 0.94, 0.95, 1.0]}), PROFILES["smoke"],
                         n_boot=100)
    assert rows[1].agrees is False and "paired S / g last-block change 1." in rows[1].rule
    # g not yet close to its final [CLS] before the last block (its last step still under half of S's 0.7)
    rows = R.skip_checks("4.1", *_skip_views(depth={**GOOD_DEPTH, "g": list(np.linspace(0.1, 0.8, 7)) + [1.0]}),
                         PROFILES["smoke"], n_boot=100)
    assert rows[1].agrees is False and "g penultimate cosine 0.8" in rows[1].rule
    with pytest.MonkeyPatch.context() as m:          # and only that clause fails
        m.setattr(R, "VERY_SIMILAR", 0.7)
        rows = R.skip_checks("4.1", *_skip_views(depth={**GOOD_DEPTH, "g": list(np.linspace(0.1, 0.8, 7)) + [1.0]}),
                             PROFILES["smoke"], n_boot=100)
        assert rows[1].agrees is True


def test_fig5b_smoothly_fails_for_a_giant_that_jumps_mid_depth():
    jumpy = [0.3, 0.3, 0.3, 0.95, 0.96, 0.97, 0.98, 1.0]   # close before the last block, but one block jumps 0.65
    rows = R.skip_checks("4.1", *_skip_views(depth={**GOOD_DEPTH, "g": jumpy}), PROFILES["smoke"], n_boot=100)
    assert rows[1].agrees is True                          # the last-block rule cannot see it ...
    assert rows[2].agrees is False and "paired S / g largest single-block change 1.0" in rows[2].rule   # ... this can


def test_fig6_needs_s_and_b_close_to_one_and_twice_g():
    rows = R.skip_checks("4.1", *_skip_views(patch_cka={**GOOD_CKA, "B": 0.7}), PROFILES["smoke"], n_boot=100)
    assert rows[3].agrees is False and "B patch-only CKA 0.7" in rows[3].rule
    rows = R.skip_checks("4.1", *_skip_views(patch_cka={"S": 0.97, "B": 0.95, "L": 0.8, "g": 0.6}), PROFILES["smoke"],
                         n_boot=100)
    assert rows[3].agrees is False and "paired S / g patch-only CKA 1." in rows[3].rule


def test_the_orthogonal_image_counts_only_against_s_on_the_same_images():
    rng = np.random.default_rng(1)
    n = 400
    small = 0.95 + 0.02 * rng.standard_normal(n)
    large = 0.3 + 0.1 * rng.standard_normal(n)
    large[:20] = rng.uniform(-0.03, 0.03, 20)                      # 5% of the images orthogonal in g, none in S
    row = R.orthogonal_check("3.4", large, small, PROFILES["smoke"], n_boot=200)
    assert row.agrees is True, row.rule
    # a typically aligned g (median 0.6) with an orthogonal tail that S has as well: the old rule (smallest
    # |cos| below 0.05) passed it
    tail = rng.uniform(0.2, 1.0, n)
    large, small = tail.copy(), rng.permutation(tail)
    large[:2], small[2:4] = 0.01, 0.02
    row = R.orthogonal_check("3.4", large, small, PROFILES["smoke"], n_boot=200)
    assert float(np.abs(large).min()) < 0.05 and row.agrees is False and "g - S 0.000" in row.rule
    row = R.orthogonal_check("3.4", 0.2 + np.abs(rng.normal(0, 0.1, n)), small, PROFILES["smoke"], n_boot=200)
    assert row.agrees is False                                    # no orthogonal image in g at all
    assert C.verdict(R.orthogonal_check("3.4", large, small, PROFILES["smoke-laptop"])) == "not testable"


def test_paired_ratio_is_the_median_of_the_per_image_ratios_and_survives_a_zero():
    v, lo, hi = R.paired_ratio(np.array([2.0, 4.0, 9.0]), np.array([1.0, 1.0, 3.0]), n_boot=50)
    assert v == 3.0 and lo <= v <= hi
    v, _, _ = R.paired_ratio(np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0]), n_boot=10)
    assert np.isfinite(v) and v > 1e300

def test_close_to_perfect_is_closer_than_0_9():
    """Sec. 3.3's "close-to-perfect alignment": S at 0.92 would pass a bound of 0.9, but is not close to perfect."""
    smoke = PROFILES["smoke"]
    near = R.knockout_checks("3.3", _knockout({"S": 0.92, "B": 0.98, "L": 0.6, "g": 0.2}, True), smoke, n_boot=0)[0]
    assert near.agrees is False and "S patch-only CKA 0.91" in near.rule and "> 0.950" in near.rule
    close = R.knockout_checks("3.3", _knockout({"S": 0.97, "B": 0.98, "L": 0.6, "g": 0.2}, True), smoke, n_boot=0)[0]
    assert close.agrees is True and "read as above 0.95" in close.paper


@pytest.mark.parametrize("g, ok", [
    (np.linspace(0.0, 1.0, 101), True),               # some images attend mainly to patches, some almost ignore them
    (np.linspace(0.30, 0.85, 101), False),            # a wide spread, but no image ignores the patches
    (np.linspace(0.0, 0.45, 101), False),             # some ignore them, but none attends mainly to them
    (np.r_[np.full(94, 0.5), np.full(7, 0.0)], False),  # the upper end at half the attention: not "mainly"
    (np.r_[np.full(97, 0.02), np.full(4, 0.9)], False),  # 4 of 101 images attend mainly to patches: under 1 in 20
    (np.r_[np.full(90, 0.02), np.full(11, 0.7)], True),  # one image in ten at each end is enough
])
def test_the_share_ends_rule_on_both_sides(g, ok):
    patch = {"S": np.full(101, 0.95), "B": np.full(101, 0.95), "L": np.full(101, 0.2), "g": g}
    row = R.share_ends_check("3.1", patch, PROFILES["smoke"])
    assert row.agrees is ok and "95th percentile" in row.rule and "5th percentile" in row.rule
    assert R.share_ends_check("3.1", {s: patch[s] for s in ("S", "B")}, PROFILES["smoke-laptop"]).agrees is None


def _register_patch(shared_weight: float, n=200, d=6, seed=0):
    """Knockout outputs whose register-only and patch-only parts share ``shared_weight`` of a common signal."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in ("S", "B", "L", "g"):
        common = rng.standard_normal((n, d))
        reg = shared_weight * common + rng.standard_normal((n, d))
        patch = shared_weight * common + rng.standard_normal((n, d))
        out[s] = {"full": reg + patch, "reg": reg, "patch": patch}
    return out


def test_the_register_patch_rule_on_both_sides():
    smoke = PROFILES["smoke"]
    apart = R.register_patch_check("3.3", _register_patch(0.0), smoke, n_boot=50)    # independent: CKA near 0
    assert apart.agrees is True and apart.rule.startswith("g: CKA register-only vs patch-only 0.0")
    alike = R.register_patch_check("3.3", _register_patch(3.0), smoke, n_boot=50)    # mostly shared: CKA near 0.8
    assert alike.agrees is False and "< 0.500" in alike.rule
    assert R.register_patch_check("3.3", {s: v for s, v in _register_patch(0.0).items() if s in "SB"},
                                  PROFILES["smoke-laptop"]).agrees is None


def test_the_claims_download_as_csv_and_json_with_every_row_and_its_verdict():
    import base64
    import csv
    import io
    import json
    import re

    from regcls.claims import ClaimCheck, downloads

    rows = [ClaimCheck("3.1", "a, quoted \"claim\"", "paper", "ours", True, "smoke"),
            ClaimCheck("3.3", "another", "paper", "ours", None, "smoke")]
    html = downloads(rows, "smoke")
    found = re.findall(r'href="data:[^;]+;base64,([^"]+)" download="claims-smoke\.(csv|json)"', html)
    urls = {ext: data for data, ext in found}
    table = list(csv.DictReader(io.StringIO(base64.b64decode(urls["csv"]).decode())))
    assert [r["claim"] for r in table] == ["a, quoted \"claim\"", "another"]
    assert [r["verdict"] for r in table] == ["yes", "not testable"]
    assert [r["verdict"] for r in json.loads(base64.b64decode(urls["json"]))] == ["yes", "not testable"]
    assert "Download the 2 rows" in html
