"""Every kind of agreement rule on both sides of its threshold, in milliseconds (the chapters' rows are checked
again, slowly, through the smoke verdicts): a rule that silently passes, or drops a size, fails here."""
import numpy as np
import pytest

from regcls import claims as C
from regcls.profiles import PROFILES


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
    good = C.knockout_checks("3.3", _knockout({"S": 0.97, "B": 0.95, "L": 0.6, "g": 0.2}, True), smoke, n_boot=50)
    assert [r.agrees for r in good] == [True, True, True]
    bad = C.knockout_checks("3.3", _knockout({"S": 0.97, "B": 0.7, "L": 0.6, "g": 0.9}, False), smoke, n_boot=50)
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
    assert [r.agrees for r in C.maps_checks("Beyond", _maps_trace(True), smoke, n_boot=100)] == [True, True]
    same = C.maps_checks("Beyond", _maps_trace(False), smoke, n_boot=100)
    assert [r.agrees for r in same] == [False, False]          # one ranking: the same top patches, no difference
    swapped = _maps_trace(True)                                # the attended patches rebuilding it better instead
    swapped["rebuilt_attn_10"], swapped["rebuilt_norm_10"] = swapped["rebuilt_norm_10"], swapped["rebuilt_attn_10"]
    rows = C.maps_checks("Beyond", swapped, smoke, n_boot=100)
    assert [r.agrees for r in rows] == [True, False] and "paired CKA difference" in rows[1].rule
    assert [r.agrees for r in C.maps_checks("Beyond", _maps_trace(True), PROFILES["smoke-laptop"])] == [None, None]
