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
    good = C.knockout_checks("3.3", _knockout({"S": 0.99, "B": 0.98, "L": 0.6, "g": 0.2}, True), smoke, n_boot=50)
    assert [r.agrees for r in good] == [True, True, True]
    bad = C.knockout_checks("3.3", _knockout({"S": 0.97, "B": 0.7, "L": 0.6, "g": 0.9}, False), smoke, n_boot=50)
    assert [r.agrees for r in bad] == [False, False, False]     # B too low; no collapse; g reads its patches


def test_close_to_perfect_is_closer_than_0_9():
    """Sec. 3.3's "close-to-perfect alignment": S at 0.92 would pass a bound of 0.9, but is not close to perfect."""
    smoke = PROFILES["smoke"]
    near = C.knockout_checks("3.3", _knockout({"S": 0.92, "B": 0.98, "L": 0.6, "g": 0.2}, True), smoke, n_boot=0)[0]
    assert near.agrees is False and "S patch-only CKA 0.91" in near.rule and "> 0.950" in near.rule
    close = C.knockout_checks("3.3", _knockout({"S": 0.97, "B": 0.98, "L": 0.6, "g": 0.2}, True), smoke, n_boot=0)[0]
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
    row = C.share_ends_check("3.1", patch, PROFILES["smoke"])
    assert row.agrees is ok and "95th percentile" in row.rule and "5th percentile" in row.rule
    assert C.share_ends_check("3.1", {s: patch[s] for s in ("S", "B")}, PROFILES["smoke-laptop"]).agrees is None


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
    apart = C.register_patch_check("3.3", _register_patch(0.0), smoke, n_boot=50)    # independent: CKA near 0
    assert apart.agrees is True and apart.rule.startswith("g: CKA register-only vs patch-only 0.0")
    alike = C.register_patch_check("3.3", _register_patch(3.0), smoke, n_boot=50)    # mostly shared: CKA near 0.8
    assert alike.agrees is False and "< 0.500" in alike.rule
    assert C.register_patch_check("3.3", {s: v for s, v in _register_patch(0.0).items() if s in "SB"},
                                  PROFILES["smoke-laptop"]).agrees is None
