"""The chapters check their own verdicts: on the smoke profile every planted pattern has a known answer, so
every claim row has an expected verdict (``regcls.rules.SMOKE_EXPECTED``, which the claims page shows beside each
row). A change in any row fails here, naming the row.

``make test`` runs the chapter notebooks before this file (they record their claims in ``REGCLS_CACHE``); run
alone, this test executes the chapters first.
"""
import pytest

from regcls.claims import collect
from regcls.rules import SMOKE_EXPECTED as EXPECTED, smoke_expectation



def _expected(verdict):
    return verdict[0] if isinstance(verdict, tuple) else verdict


@pytest.fixture(scope="module")
def rows():
    checks = collect("smoke")
    if len(checks) < len(EXPECTED):  # run alone: execute the chapters that record claims
        from test_profile_shapes import run_notebook
        for name in ("sec3_1_register_attention.ipynb", "sec3_2_register_norms.ipynb",
                     "sec3_3_register_knockout.ipynb", "sec3_4_attention_maps.ipynb",
                     "sec4_1_skip_connection.ipynb", "appendix_other_recipes.ipynb", "beyond_dinov3.ipynb",
                     "beyond_test_time_registers.ipynb", "beyond_replacement_controls.ipynb",
                     "beyond_explaining_maps.ipynb"):
            run_notebook(name)
        checks = collect("smoke")
    return checks


def test_every_row_has_its_expected_verdict(rows):
    seen, wrong = set(), []
    for c in rows:
        keys = [k for k in EXPECTED if k[0] == c.section and c.claim.startswith(k[1])]
        assert len(keys) == 1, f"claim row without an expected verdict (add it to EXPECTED): {c.section} {c.claim!r}"
        seen.add(keys[0])
        if c.agrees != _expected(EXPECTED[keys[0]]):
            wrong.append(f"{c.section} {c.claim!r}: expected {_expected(EXPECTED[keys[0]])}, got {c.agrees} ({c.ours})")
    assert not wrong, "smoke verdicts changed:\n" + "\n".join(wrong)
    unruled = [f"{c.section} {c.claim!r}" for c in rows if c.agrees is not None and not c.rule]
    assert not unruled, f"rows judged without a written rule: {unruled}"
    assert seen == set(EXPECTED), f"rows missing from the claims records: {sorted(set(EXPECTED) - seen)}"


# Rows that compare sizes, and must flip when B behaves like g (profile smoke-violated).
SIZE_RULES = {
    "sec3_1": ["Large models attend more to registers"],
    "sec3_3": ["Small models: the patch-only output matches", "One-shot accuracy from patch-only outputs is poor"],
    "sec4_1": ["S, B and L use both the skip term and the patches", "S, B, L jump at the last layer",
               "Giant converges to the final [CLS] more smoothly", "For large models the patch-based output does not represent"],
}


@pytest.mark.slow
@pytest.mark.notebook
def test_a_violation_at_an_intermediate_size_flips_the_size_rules(monkeypatch):
    from test_profile_shapes import run_notebook
    monkeypatch.setenv("REGCLS_PROFILE", "smoke-violated")
    for name in ("sec3_1_register_attention.ipynb", "sec3_3_register_knockout.ipynb", "sec4_1_skip_connection.ipynb"):
        run_notebook(name)
    rows = collect("smoke-violated")
    for claims in SIZE_RULES.values():
        for start in claims:
            row = [c for c in rows if c.claim.startswith(start)]
            assert len(row) == 1, start
            assert _expected(EXPECTED[row[0].section, start]) is True       # agrees on smoke ...
            assert row[0].agrees is False, f"{start!r} still agrees with B planted like g: {row[0].rule}"


def test_the_claims_page_gives_the_reason_of_every_expected_no():
    """What the claims page shows beside each row on the smoke profile comes from the list this file holds the rows
    to: an expected "no" says why, in the words of SMOKE_EXPECTED."""
    from regcls.claims import ClaimCheck, verdict_counts
    from regcls.rules import smoke_note

    rows = [ClaimCheck(section, start + " ...", "p", "o", _expected(v), "smoke") for (section, start), v in EXPECTED.items()]
    for (key, v), row in zip(EXPECTED.items(), rows):
        assert smoke_expectation(row) == ((v[0], v[1]) if isinstance(v, tuple) else (v, ""))
        note = smoke_note(row)
        assert note == "expected: yes" if _expected(v) else note == f"expected: no -- {v[1]}" and len(v[1]) > 20
    assert smoke_note(ClaimCheck("9.9", "unknown", "p", "o", True, "smoke")) == "not listed in SMOKE_EXPECTED"
    counts = verdict_counts(rows)
    assert sum(counts.values()) == len(rows) and counts["no"] == sum(not _expected(v) for v in EXPECTED.values())
