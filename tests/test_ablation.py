"""The replacement controls (regcls.ablation): each replacement's arithmetic, CKA's blindness to an offset, the
variance decomposition, and the two planted known answers (registers that carry the image, registers that add a
constant)."""
import numpy as np
import pytest

from regcls import ablation as A
from regcls import metrics as M
from regcls.cache import get_trace
from regcls.profiles import REPLACEMENT_CONTROLS


def _parts(n=400, d=6, seed=0, reg_scale=1.0):
    rng = np.random.default_rng(seed)
    parts = {"cls": rng.normal(size=(n, d)) * 0.1, "reg": rng.normal(size=(n, d)) * reg_scale + 5.0,
             "patch": rng.normal(size=(n, d))}
    parts["full"] = parts["cls"] + parts["reg"] + parts["patch"]
    return parts


def test_each_replacement_replaces_only_its_part():
    p, rng = _parts(), np.random.default_rng(1)
    rest = p["full"] - p["reg"]
    np.testing.assert_allclose(A.replaced(p, "reg", "zero", rng), rest)
    np.testing.assert_allclose(A.replaced(p, "reg", "mean", rng) - rest, np.broadcast_to(p["reg"].mean(0), rest.shape))
    swapped = A.replaced(p, "reg", "resample", rng) - rest              # another image's part, each used once
    assert sorted(map(tuple, swapped.round(12))) == sorted(map(tuple, p["reg"].round(12)))
    assert not np.allclose(swapped, p["reg"])
    noise = A.replaced(p, "reg", "noise", rng) - rest                    # the part's moments, not its rows
    np.testing.assert_allclose(noise.mean(0), p["reg"].mean(0), atol=0.2)
    np.testing.assert_allclose(noise.std(0), p["reg"].std(0), rtol=0.15)
    assert abs(np.corrcoef(noise[:, 0], p["reg"][:, 0])[0, 1]) < 0.2
    with pytest.raises(ValueError, match="how is one of"):
        A.replaced(p, "reg", "shuffle", rng)


def test_the_replacements_take_their_values_from_the_reference_images():
    """The one-shot test replaces the part of its test images by the mean (permutation, moments) of the images it
    was given as ``reference``, not of the test images themselves."""
    p, ref = _parts(n=50, seed=0), _parts(n=400, seed=1, reg_scale=2.0)["reg"] + 3.0   # other images, other moments
    rest = p["full"] - p["reg"]
    np.testing.assert_allclose(A.replaced(p, "reg", "mean", np.random.default_rng(0), reference=ref) - rest,
                               np.broadcast_to(ref.mean(0), rest.shape))
    assert not np.allclose(ref.mean(0), p["reg"].mean(0), atol=1.0)
    drawn = A.replaced(p, "reg", "resample", np.random.default_rng(0), reference=ref) - rest
    rows = {tuple(r) for r in ref.round(12)}
    assert all(tuple(r) in rows for r in drawn.round(12))              # rows of the reference, not of the part
    noise = A.replaced(p, "reg", "noise", np.random.default_rng(0), reference=ref) - rest
    np.testing.assert_allclose(noise.mean(0), ref.mean(0), atol=0.8)


def test_cka_cannot_tell_zeroing_from_the_mean_but_resampling_hurts():
    p = _parts(reg_scale=1.0)
    tr = {f"attn_val_{k}": v for k, v in p.items() if k != "full"}
    c = A.replacement_cka(tr, "reg", n_boot=0)
    assert c["zero"].value == pytest.approx(c["mean"].value, abs=1e-12)   # CKA centres: an offset is invisible
    assert c["resample"].value < c["mean"].value - 0.2


def test_variance_shares_add_up_and_see_a_constant_part():
    p = _parts(reg_scale=0.0)                         # the registers add a constant: no variance
    tr = {f"attn_val_{k}": v for k, v in p.items() if k != "full"}
    v = A.variance_shares(tr)
    assert v["reg"] == pytest.approx(0.0, abs=1e-12) and v["reg·reg"] == pytest.approx(0.0, abs=1e-12)
    assert v["cls"] + v["reg"] + v["patch"] == pytest.approx(1.0)
    assert v["cls·cls"] + v["reg·reg"] + v["patch·patch"] + v["cross"] == pytest.approx(1.0)
    assert v["patch·patch"] == pytest.approx(1.0 / 1.01, abs=0.03)      # patch variance 1 of 1 + 0.01


@pytest.fixture(scope="module")
def controls(smoke):
    def get(name, labelled=False):
        return get_trace(REPLACEMENT_CONTROLS[name], smoke.labelled if labelled else smoke.dataset,
                         img_size=smoke.img_size, progress=False)
    return get


def test_registers_that_add_a_constant_survive_every_replacement_but_zeroing(controls, smoke):
    name = "registers add a constant"
    c = A.replacement_cka(controls(name), "reg", n_boot=0)
    assert min(v.value for v in c.values()) > 0.99                     # the part has no image in it
    shot = A.replacement_oneshot(controls(name, labelled=True), "reg", smoke.oneshot_seeds, k=1)
    assert shot["unaltered"].mean() > 0.6
    for how in ("mean", "resample", "noise"):
        assert shot[how].mean() > shot["unaltered"].mean() - 0.05, how
    assert shot["zero"].mean() < shot["unaltered"].mean() - 0.3         # the offset gone: off the distribution
    assert A.variance_shares(controls(name))["reg·reg"] < 1e-3


def test_registers_that_carry_the_image_fail_every_replacement(controls, smoke):
    name = "registers carry the image"
    c = A.replacement_cka(controls(name), "reg", n_boot=0)
    assert max(v.value for v in c.values()) < 0.5
    assert c["mean"].value == pytest.approx(c["zero"].value, abs=1e-9)   # a huge offset costs the rest no digits
    shot = A.replacement_oneshot(controls(name, labelled=True), "reg", smoke.oneshot_seeds, k=1)
    chance = 1 / len(np.unique(controls(name, labelled=True)["labels"]))
    assert shot["unaltered"].mean() > chance + 0.4
    for how in A.HOWS:
        assert shot[how].mean() < chance + 0.2, how
    assert A.variance_shares(controls(name))["reg·reg"] > 0.9
    assert M.shares(controls(name))["reg"].min() > 0.95


def test_fix_reg_mean_blinds_a_register_reader_and_spares_a_patch_integrator(smoke):
    out = {}
    for size in ("S", "g"):        # patch integrator, register reader (both with registers)
        m = smoke.model(size, True)
        plain = get_trace(m, smoke.labelled, img_size=smoke.img_size, progress=False)
        fixed = get_trace(smoke.with_fixed_registers(m, smoke.labelled), smoke.labelled, img_size=smoke.img_size,
                          progress=False)
        out[size] = A.fixed_oneshot(plain, fixed, smoke.oneshot_seeds, k=1)
        assert out[size]["unaltered"].mean() > 0.6
    chance = 1 / len(np.unique(plain["labels"]))
    assert out["g"]["fixed"].mean() < chance + 0.2                       # its image came through the registers
    assert out["S"]["fixed"].mean() > out["S"]["unaltered"].mean() - 0.05  # its image comes through the patches
    with pytest.raises(ValueError, match="other images"):
        A.fixed_oneshot(plain, {**fixed, "image_ids": fixed["image_ids"][::-1]})
