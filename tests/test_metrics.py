"""Metrics against closed-form cases."""
import numpy as np
import pytest

from regcls.metrics import bootstrap_ci, cka, cka_interval, cka_resampled, cosine, knockout, mean_pairwise_cosine, shares

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


def test_debiased_cka_equals_the_cubic_definition():
    X = rng.normal(size=(25, 6))
    Y = rng.normal(size=(25, 4)) + X[:, :4]
    n = len(X)

    def hsic(K, L):  # Song et al. 2012, eq. 5, written out with the O(n^3) products
        K, L = K.copy(), L.copy()
        np.fill_diagonal(K, 0)
        np.fill_diagonal(L, 0)
        one = np.ones(n)
        return (np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))
    K, L = X @ X.T, Y @ Y.T
    assert cka(X, Y, debiased=True) == pytest.approx(hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L)), abs=1e-12)


def test_pairwise_cosine_equals_the_gram_definition():
    X = rng.normal(size=(30, 5)) + 1.0
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    G = Z @ Z.T
    assert mean_pairwise_cosine(X) == pytest.approx((G.sum() - np.trace(G)) / (30 * 29), abs=1e-13)


def test_resampled_cka_equals_cka_of_each_resample():
    # a large common offset: the Gram form must not lose the centred signal to cancellation
    X = rng.normal(size=(60, 9)) + 300.0
    Y = X[:, :5] @ rng.normal(size=(5, 7)) + rng.normal(size=(60, 7)) - 80.0
    idx = [rng.integers(0, 60, 60) for _ in range(25)]
    counts = np.stack([np.bincount(i, minlength=60) for i in idx], axis=1)
    np.testing.assert_allclose(cka_resampled(X, Y, counts), [cka(X[i], Y[i]) for i in idx], atol=1e-10)
    np.testing.assert_allclose(cka_interval(X, Y, n_boot=40, seed=3), bootstrap_ci(cka, X, Y, n_boot=40, seed=3),
                               atol=1e-10)
    g = np.random.default_rng(3)  # the debiased interval from its own resamples, written out
    boots = [cka(X[i], Y[i], debiased=True) for i in (g.integers(0, 60, 60) for _ in range(10))]
    want = (cka(X, Y, debiased=True), *np.percentile(boots, [2.5, 97.5]))
    np.testing.assert_allclose(cka_interval(X, Y, debiased=True, n_boot=10, seed=3), want, atol=1e-10)


def test_bootstrap_interval_is_the_95_percent_percentile_interval_of_its_resamples():
    x = rng.normal(size=50)
    g = np.random.default_rng(7)
    boots = [np.mean(x[g.integers(0, 50, 50)]) for _ in range(300)]
    v, lo, hi = bootstrap_ci(np.mean, x, n_boot=300, seed=7)
    assert v == pytest.approx(x.mean()) and (lo, hi) == pytest.approx(tuple(np.percentile(boots, [2.5, 97.5])))


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
    t["attn_mass"] = np.zeros((6, 2, 2, 3))  # known shares: heads (0.2, 0.4) to registers, layer 0 differs
    t["attn_mass"][:, -1, 0] = (0.1, 0.2, 0.7)
    t["attn_mass"][:, -1, 1] = (0.3, 0.4, 0.3)
    t["attn_mass"][:, 0] = (1.0, 0.0, 0.0)
    s = shares(t)
    np.testing.assert_allclose([s["cls"], s["reg"], s["patch"]], np.repeat([[0.2], [0.3], [0.5]], 6, axis=1))
    np.testing.assert_allclose(shares(t, layer=0)["cls"], 1.0)
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


def _objective(W, b, X, y, C):  # scikit-learn's: C * sum of cross-entropies + ||W||^2 / 2
    Z = X @ W + b
    Z = Z - Z.max(1, keepdims=True)
    return C * (np.log(np.exp(Z).sum(1)) - Z[np.arange(len(y)), y]).sum() + 0.5 * (W * W).sum()


@pytest.mark.parametrize("C", [0.01, 1.0, 10.0])
def test_logistic_fit_reaches_scikit_learns_optimum(C):
    import torch
    from sklearn.linear_model import LogisticRegression

    from regcls.probe import fit_logistic
    r = np.random.default_rng(1)
    y = np.arange(400) % 6
    X = r.normal(size=(400, 12)) + 0.6 * r.normal(size=(6, 12))[y]
    ref = LogisticRegression(C=C, max_iter=10_000, tol=1e-10).fit(X, y)
    W, b = (t.numpy() for t in fit_logistic(torch.tensor(X), torch.tensor(y), 6, C, tol=1e-10))
    assert _objective(W, b, X, y, C) == pytest.approx(_objective(ref.coef_.T, ref.intercept_, X, y, C), rel=1e-8)
    np.testing.assert_allclose(W, ref.coef_.T, atol=1e-4 * max(1.0, np.abs(W).max()))
    assert np.array_equal((X @ W + b).argmax(1), ref.predict(X))


def test_probe_matches_the_scikit_learn_grid_search():
    from regcls.bench import sklearn_probe
    from regcls.probe import linear_probe
    r = np.random.default_rng(2)
    for k, d, sep in ((3, 10, 0.8), (8, 30, 0.4)):
        y = np.repeat(np.arange(k), 40)
        X = r.normal(size=(len(y), d)) * r.uniform(0.5, 20, d) + sep * r.normal(size=(k, d))[y]
        ours, ref = linear_probe(X, y), sklearn_probe(X, y)
        assert ours["C"] == ref["C"]
        assert ours["accuracy"] == pytest.approx(ref["accuracy"], abs=1.5 / ours["n_test"])


def test_probe_reads_separable_labels_and_not_noise():
    from regcls.probe import linear_probe
    r = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 25)
    X = r.normal(size=(100, 8))
    X[:, 0] += 8 * y  # 8 sd apart along one axis: linearly separable but for a few in 10^4
    assert linear_probe(X, y)["accuracy"] > 0.8   # chance 0.25; >= 0.87 for every seed 0-9
    assert linear_probe(r.normal(size=(100, 8)), y)["accuracy"] < 0.5


def test_probe_with_two_images_per_class_keeps_every_class_in_both_splits():
    """ImageNet-sized label sets with few images each (laptop, REGCLS_LIMIT): 1,000 classes x 2 images used to
    stop scikit-learn's split ("test_size = 600 should be greater or equal to the number of classes")."""
    from regcls.probe import linear_probe
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(300), 2)
    X = rng.normal(size=(600, 8)) + np.eye(300)[y][:, :8] * 5
    r = linear_probe(X, y)
    assert r["n_test"] == 300 and r["n_train"] == 300 and r["C"] == 1.0


def test_oneshot_with_two_classes():
    """Two classes (REGCLS_LIMIT=4): scikit-learn's binary decision function has one column, not two."""
    from regcls.metrics import oneshot
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    tests = {"same": np.array([[0.9, 0.1], [0.2, 0.8]]), "swapped": np.array([[0.1, 0.9], [0.8, 0.2]])}
    acc = oneshot(X, np.array([3, 7]), tests, np.array([3, 7]), k=1)
    assert acc == {"same": 1.0, "swapped": 0.0}


def test_oneshot_scaler_is_fitted_on_the_training_images_only():
    """Passing other test images (here far off in scale) must not change an accuracy: no statistics of the test
    images may reach the classifier."""
    from regcls.metrics import oneshot
    g = np.random.default_rng(5)
    centres = g.normal(size=(20, 16)) * 3
    train, test = centres + g.normal(size=(20, 16)), centres + g.normal(size=(20, 16)) * 1.5
    y = np.arange(20)
    alone = oneshot(train, y, {"test": test}, y, k=1)
    with_other = oneshot(train, y, {"test": test, "other": g.normal(size=(20, 16)) * 50 + 100}, y, k=1)
    assert 0.3 < alone["test"] < 1.0 and with_other["test"] == alone["test"]


def test_attention_map_keeps_rows_and_columns():
    from regcls.metrics import attention_maps
    P, rows, cols = 5, 3, 4          # a non-square grid: a transposed map cannot pass
    a = np.zeros((1, 2, P + rows * cols))
    a[0, :, P + 1 * cols + 3] = 1.0  # grid row 1, column 3 in raster order
    m = attention_maps({"cls_attn": a, "num_prefix_tokens": P, "grid": np.array([rows, cols])})
    assert m.shape == (1, rows, cols) and m[0, 1, 3] == 1.0 and m.sum() == 1.0


def test_paired_cka_difference_uses_the_same_resamples_for_both_pairs():
    from regcls.metrics import cka_difference_interval
    X = rng.normal(size=(40, 6))
    Y1, Y2 = X[:, :3] + 0.3 * rng.normal(size=(40, 3)), X[:, 3:] + 1.5 * rng.normal(size=(40, 3))
    g = np.random.default_rng(4)
    idx = [g.integers(0, 40, 40) for _ in range(50)]
    boots = [cka(X[i], Y1[i]) - cka(X[i], Y2[i]) for i in idx]
    want = (cka(X, Y1) - cka(X, Y2), *np.percentile(boots, [2.5, 97.5]))
    np.testing.assert_allclose(cka_difference_interval(X, Y1, X, Y2, n_boot=50, seed=4), want, atol=1e-10)
