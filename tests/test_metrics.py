"""Metrics against closed-form cases."""
import numpy as np
import pytest

from regcls.metrics import bootstrap_ci, cka, cosine, knockout, mean_pairwise_cosine, shares

rng = np.random.default_rng(0)


def test_cka_self_is_one():
    X = rng.normal(size=(50, 8))
    assert cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert cka(X, X, debiased=True) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    X, Y = rng.normal(size=(40, 6)), rng.normal(size=(40, 5))
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert cka(X @ Q * 7.5, Y) == pytest.approx(cka(X, Y), abs=1e-12)
    assert cka(X @ Q * 7.5, Y, debiased=True) == pytest.approx(cka(X, Y, debiased=True), abs=1e-12)


def test_cka_equals_kernel_hsic_formula():
    X, Y = rng.normal(size=(30, 7)), rng.normal(size=(30, 4)) + 2.0
    n = len(X)
    H = np.eye(n) - 1 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    direct = np.trace(K @ L) / np.sqrt(np.trace(K @ K) * np.trace(L @ L))
    assert cka(X, Y) == pytest.approx(direct, abs=1e-12)


def test_debiased_cka_removes_small_sample_bias():
    X, Y = rng.normal(size=(20, 200)), rng.normal(size=(20, 200))  # independent, n << d
    assert cka(X, Y) > 0.8            # the plain estimate is biased high
    assert abs(cka(X, Y, debiased=True)) < 0.1


def test_cosine_and_pairwise():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(cosine(a, np.array([[2.0, 0.0], [1.0, 0.0]])), [1.0, 0.0])
    assert mean_pairwise_cosine(np.array([[1.0, 0], [2.0, 0], [0, 1.0]])) == pytest.approx(1 / 3)


def test_bootstrap_interval_covers_and_shrinks():
    x = rng.normal(loc=3.0, size=400)
    v, lo, hi = bootstrap_ci(np.mean, x, n_boot=500)
    assert lo < v < hi and lo < 3.0 < hi and hi - lo < 0.3
    _, lo2, hi2 = bootstrap_ci(np.mean, x[:40], n_boot=500)
    assert hi2 - lo2 > hi - lo


def fake_trace(n=6, H=2, D=4, P=3):
    mass = rng.dirichlet(np.ones(3), size=(n, 2, H))
    t = {"attn_mass": mass, "attn_out_bias": rng.normal(size=D)}
    for p in ("cls", "reg", "patch"):
        t[f"attn_val_{p}"] = rng.normal(size=(n, D))
        t[f"attn_out_{p}"] = rng.normal(size=(n, D))
    t["attn_out_full"] = t["attn_out_cls"] + t["attn_out_reg"] + t["attn_out_patch"] + t["attn_out_bias"]
    return t


def test_shares_add_to_one_and_knockout_adds_up():
    t = fake_trace()
    s = shares(t)
    np.testing.assert_allclose(s["cls"] + s["reg"] + s["patch"], 1.0)
    k = knockout(t)
    np.testing.assert_allclose(k["cls"] + k["reg"] + k["patch"] - 2 * t["attn_out_bias"], k["full"])


def test_renormalised_knockout_divides_each_head_by_its_mass():
    t = fake_trace()
    k = knockout(t, level="val", renormalise=True)
    n, D = t["attn_val_patch"].shape
    m = t["attn_mass"][:, -1, :, 2]
    np.testing.assert_allclose(k["patch"].reshape(n, 2, D // 2), t["attn_val_patch"].reshape(n, 2, D // 2) / m[:, :, None])


def test_oneshot_perfect_on_separable_and_chance_on_shuffled():
    from regcls.metrics import oneshot, oneshot_split
    C, per, d = 20, 4, 30
    centers = rng.normal(size=(C, d)) * 10
    y = np.repeat(np.arange(C), per)
    X = centers[y] + rng.normal(size=(C * per, d))
    for clf in ("logreg", "ncm"):
        a, b = oneshot_split(y, seed=0)
        assert oneshot(X[a], y[a], {"x": X[b]}, y[b], classifier=clf, k=1)["x"] == 1.0
        accs = []
        for seed in range(20):
            ys = np.random.default_rng(seed).permutation(y)
            a, b = oneshot_split(ys, seed)
            accs.append(oneshot(X[a], ys[a], {"x": X[b]}, ys[b], classifier=clf, k=5)["x"])
        assert abs(np.mean(accs) - 5 / C) < 0.1


def test_probe_reads_separable_labels_and_not_noise():
    from regcls.probe import linear_probe
    y = np.repeat(np.arange(4), 25)
    X = rng.normal(size=(100, 8))
    X[:, 0] += 5 * y
    assert linear_probe(X, y)["accuracy"] > 0.9
    assert linear_probe(rng.normal(size=(100, 8)), y)["accuracy"] < 0.5
