"""The maps of the last-layer [CLS] over the patches (regcls.maps): rank agreement, the rebuilt outputs, and the two
planted known answers (values of equal norm: the attention and contribution maps agree; very unequal: they do
not). The trace arrays themselves are tested against timm in tests/test_trace_exact.py."""
import numpy as np
import pytest

from regcls import maps as Mp
from regcls.cache import get_trace
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
