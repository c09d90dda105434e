"""The chapters check their own verdicts: on the smoke profile every planted pattern has a known answer, so
every claim row has an expected verdict. A change in any row fails here, naming the row.

``make test`` runs the chapter notebooks before this file (they record their claims in ``REGCLS_CACHE``); run
alone, this test executes the chapters first.
"""
import pytest

from regcls.claims import collect

# (chapter record, start of the claim) -> expected verdict; rows expected to disagree say why.
EXPECTED = {
    ("3.1", "Large models attend more to registers"): True,
    ("3.1", "The giant model's share varies strongly"): (False, "per-image variation is not planted: the "
                                                          "register reader attends to registers on every image"),
    ("3.2", "The same register has the highest norm"): (False, "the planted high-norm register (60 in 4 reserved "
                                                         "dimensions) is about 5x the largest patch, not 10x"),
    ("3.2", "Its mean pairwise cosine across images is 0.9989"): True,
    ("3.2", "A few outlier dimensions dominate the vector"): (False, "the planted register keeps its constant marker "
                                                              "dimensions besides the outliers: without its top 5 dims "
                                                              "it is still more alike across images (0.82) than the "
                                                              "[CLS] (0.58)"),
    ("3.2", "LayerNorm scales the outlier dimensions down"): True,
    ("3.2", "What keys and values read"): True,
    ("3.2", "The token still carries image-specific content"): True,
    ("3.2", "Registers take over the role of high-norm patch tokens"): (False, "no high-norm patch is planted in the "
                                                                         "skip-dominated g without registers: there "
                                                                         "is nothing to take over"),
    ("3.3", "Small models: the patch-only output matches"): True,
    ("3.3", "Patch-only CKA collapses as size grows"): True,
    ("3.3", "In giant, the register-only output matches better"): True,
    ("3.3", "One-shot accuracy from patch-only outputs is poor"): True,
    ("3.3", "The register-only and patch-only outputs have low CKA"): True,
    ("3.4", "Maps with registers are cleaner"): (False, "no map pattern is planted: the register reader's strong "
                                                 "constant query over LayerNorm-ed keys makes its patch attention "
                                                 "peakier than the skip-dominated model's random one"),
    ("3.4", "For the example image the patch-based output is orthogonal"): True,
    ("3.4", "Not every image is this extreme"): True,
    ("3.4", "The attention map (patch term) explains only part"): True,
    ("4.1", "S, B and L use both the skip term and the patches"): True,
    ("4.1", "S, B, L jump at the last layer"): True,
    ("4.1", "Giant converges to the final [CLS] more smoothly"): True,
    ("4.1", "For large models the patch-based output does not represent"): True,
    ("App.", "DeiT III: attention to the skip path grows with size"): True,
    ("App.", "CLIP: attention to the skip path grows with size"): (False, "the CLIP stand-ins are random-"
                                                                    "initialised: no pattern is planted"),
    ("App.", "iBOT: attention to the skip path grows with size"): (False, "the iBOT stand-ins are random-"
                                                                    "initialised: no pattern is planted"),
    ("App.", "DeiT III: the disconnect grows with size"): True,
    ("App.", "CLIP: the disconnect grows with size"): (False, "the CLIP stand-ins are random-initialised"),
    ("App.", "iBOT: the disconnect grows with size"): (False, "the iBOT stand-ins are random-initialised"),
    ("App.", "DeiT III, trained with drop-path, still shows the violation"): True,
    ("App.", "ImageNet repeat of Fig. 3a: Small models"): True,
    ("App.", "ImageNet repeat of Fig. 3a: Patch-only CKA collapses"): (
        False, "on the labelled crops the planted g keeps a higher patch-only CKA than L (0.54 vs 0.47): not monotone"),
    ("App.", "ImageNet repeat of Fig. 3a: In giant"): True,
    ("App.", "DeiT III: the tiny model (less data) behaves like the huge one"): True,
    ("App.", "DeiT III integrates early at every size"): (False, "the S stand-in is a patch integrator, which "
                                                           "integrates at the last block"),
    ("App.", "DeiT III: no clear relationship between model size and early"): (
        False, "the stand-ins plant a size relation: the patch-integrating S reaches the final [CLS] only at its last "
               "block, the skip-dominated H at its first"),
    ("App.", "CLIP mirrors DINOv2"): (False, "random-initialised stand-ins: no DINOv2 pattern"),
    ("App.", "iBOT mirrors DINOv2"): (False, "random-initialised stand-ins: no DINOv2 pattern"),
    ("Beyond", "DINOv3: larger distilled students attend more to their registers"): True,
    ("Beyond", "DINOv3: in the largest distilled student the register-only output"): True,
    ("Beyond", "DINOv3: in the largest distilled student the patch-based output is far"): True,
    ("Beyond", "Test-time register: it takes over the high norm"): True,
    ("Beyond", "Test-time register: no patch stays a high-norm outlier"): True,
    ("Beyond", "Replacement: at the largest size the registers carry image information"): True,
    ("Beyond", "Replacement: at the largest size the mean of the registers' part serves"): (
        False, "the planted register reader's registers carry the image: their mean cannot stand in for them"),
    ("Beyond", "Replacement: in the smallest model the register part is an offset"): True,
    ("Beyond", "Fix-Reg-Mean: at the largest size registers fixed to their mean"): (
        False, "the planted register reader reads the image from its registers: fixed, they carry none"),
    ("Beyond", "Maps: at the largest size the attention map and the contribution-norm map rank"): (
        False, "no value norms are planted in the register reader: its patch values reach the output alike, so "
               "contributions follow the attention"),
    ("Beyond", "Maps: at the largest size the top 10% of the patches by contribution rebuild"): (
        False, "no value norms are planted in the register reader: its contributions follow the attention (Spearman "
               "0.99), so the two top-10% sets nearly coincide and rebuild the patch part alike (paired CKA "
               "difference -0.001 [-0.003, 0.003])"),
}


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
