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
    r = np.random.default_rng(5)   # its own draw: over seeds 0-39, plain >= 0.89 and |debiased| <= 0.081
    X, Y = r.normal(size=(40, 400)), r.normal(size=(40, 400))  # independent, n << d
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


def fake_trace(n=6, H=2, D=4, P=3, L=3):
    mass = rng.dirichlet(np.ones(3), size=(n, L, H))
    t = {"attn_mass": mass, "attn_out_bias": rng.normal(size=D)}
    for p in ("cls", "reg", "patch"):
        t[f"attn_val_{p}"] = rng.normal(size=(n, D))
        t[f"attn_out_{p}"] = rng.normal(size=(n, D))
    t["attn_out_full"] = t["attn_out_cls"] + t["attn_out_reg"] + t["attn_out_patch"] + t["attn_out_bias"]
    return t


def test_shares_add_to_one_and_knockout_adds_up():
    t = fake_trace()
    t["attn_mass"] = np.zeros((6, 3, 2, 3))  # known shares: heads (0.2, 0.4) to registers, layer 0 differs
    t["attn_mass"][:, -1, 0] = (0.1, 0.2, 0.7)
    t["attn_mass"][:, -1, 1] = (0.3, 0.4, 0.3)
    t["attn_mass"][:, 0] = (1.0, 0.0, 0.0)
    s = shares(t)
    np.testing.assert_allclose([s["cls"], s["reg"], s["patch"]], np.repeat([[0.2], [0.3], [0.5]], 6, axis=1))
    np.testing.assert_allclose(shares(t, layer=0)["cls"], 1.0)
    k = knockout(t)
    np.testing.assert_allclose(k["cls"] + k["reg"] + k["patch"] - 2 * t["attn_out_bias"], k["full"])
    from regcls.metrics import part_share
    np.testing.assert_allclose(part_share(t), 0.3 / 0.8)                   # over registers + patches
    np.testing.assert_allclose(part_share(t, drop_cls_self=False), 0.3)
    np.testing.assert_allclose(part_share(t, "patch"), 0.5 / 0.8)
    np.testing.assert_allclose(part_share(t, "patch", drop_cls_self=False, layer=0), 0.0)


def test_renormalised_knockout_divides_each_head_by_its_mass():
    t = fake_trace()
    k = knockout(t, level="val", renormalise=True)
    n, D = t["attn_val_patch"].shape
    m = t["attn_mass"][:, -1, :, 2]
    np.testing.assert_allclose(k["patch"].reshape(n, 2, D // 2), t["attn_val_patch"].reshape(n, 2, D // 2) / m[:, :, None])


def test_knockout_keeping_cls_self_adds_the_cls_term_to_each_part():
    t = fake_trace()
    for level, extra in (("val", 0), ("out", t["attn_out_bias"])):
        k, kc = knockout(t, level=level), knockout(t, level=level, keep_cls=True)
        cls_term = t[f"attn_{level}_cls"]
        for p in ("patch", "reg"):
            np.testing.assert_allclose(kc[p], t[f"attn_{level}_{p}"] + cls_term + extra)
        np.testing.assert_allclose(kc["cls"], k["cls"])
        np.testing.assert_allclose(kc["full"], k["full"])


def test_renormalised_knockout_keeping_cls_divides_by_the_kept_mass_and_skips_empty_heads():
    from regcls.metrics import RENORM_FLOOR, low_mass_heads
    t = fake_trace()
    t["attn_mass"][0, -1, 1] = (0.0, 1.0, 0.0)  # image 0, head 1 attends to registers only
    n, D = t["attn_val_patch"].shape
    m = t["attn_mass"][:, -1, :, 2] + t["attn_mass"][:, -1, :, 0]
    k = knockout(t, level="val", renormalise=True, keep_cls=True)
    kept = (t["attn_val_patch"] + t["attn_val_cls"]).reshape(n, 2, D // 2)
    want = kept / np.where(m == 0, 1.0, m)[:, :, None]
    want[0, 1] = kept[0, 1]  # left as it is, not divided by 0
    np.testing.assert_allclose(k["patch"].reshape(n, 2, D // 2), want)
    assert low_mass_heads(t, keep_cls=True) == {"cls": 1 / 12, "reg": 0.0, "patch": 1 / 12}
    assert low_mass_heads(t)["reg"] == 0.0 and low_mass_heads(t)["patch"] == 1 / 12
    t["attn_mass"][1, -1, 0] = (RENORM_FLOOR / 2, 1 - RENORM_FLOOR / 2, 0.0)  # just under the floor counts too
    assert low_mass_heads(t)["cls"] == 2 / 12 and low_mass_heads(t, floor=RENORM_FLOOR / 4)["cls"] == 1 / 12


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
    from helpers import sklearn_probe
    from regcls.probe import linear_probe
    r = np.random.default_rng(2)
    for k, d, sep in ((3, 10, 0.8), (8, 30, 0.4)):
        y = np.repeat(np.arange(k), 40)
        X = r.normal(size=(len(y), d)) * r.uniform(0.5, 20, d) + sep * r.normal(size=(k, d))[y]
        ours, ref = linear_probe(X, y, device="cpu"), sklearn_probe(X, y)   # float32 on the CPU, as measured
        accuracy, C = ref
        assert ours.C == C
        assert ours.accuracy == pytest.approx(accuracy, abs=1.5 / ours.n_test)


def test_probe_reads_separable_labels_and_not_noise():
    from regcls.probe import linear_probe
    r = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 25)
    X = r.normal(size=(100, 8))
    X[:, 0] += 8 * y  # 8 sd apart along one axis: linearly separable but for a few in 10^4
    assert linear_probe(X, y).accuracy > 0.8   # chance 0.25; >= 0.87 for every seed 0-9
    assert linear_probe(r.normal(size=(100, 8)), y).accuracy < 0.5


def test_probe_with_two_images_per_class_keeps_every_class_in_both_splits():
    """ImageNet-sized label sets with few images each (laptop, REGCLS_LIMIT): 1,000 classes x 2 images used to
    stop scikit-learn's split ("test_size = 600 should be greater or equal to the number of classes")."""
    from regcls.probe import linear_probe
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(300), 2)
    X = rng.normal(size=(600, 8)) + np.eye(300)[y][:, :8] * 5
    r = linear_probe(X, y)
    assert r.n_test == 300 and r.n_train == 300 and r.C == 1.0


def test_oneshot_with_two_classes():
    """Two classes (REGCLS_LIMIT=4): scikit-learn's binary decision function has one column, not two."""
    from regcls.metrics import oneshot
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    tests = {"same": np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.0]]),
             "swapped": np.array([[0.1, 0.9], [0.8, 0.2], [0.0, 0.7]])}
    acc = oneshot(X, np.array([3, 7]), tests, np.array([3, 7, 3]), k=1)
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
    a = np.zeros((2, 2, P + rows * cols))
    a[0, :, P + 1 * cols + 3] = 1.0  # image 0: grid row 1, column 3 in raster order
    a[1, 0, P + 2 * cols] = 1.0      # image 1: row 2, column 0, in one of two heads
    a[:, :, :P] = 7.0                # prefix tokens are not on the grid
    m = attention_maps({"cls_attn": a, "meta": {"num_prefix_tokens": P, "grid": [rows, cols]}})
    assert m.shape == (2, rows, cols) and m[0, 1, 3] == 1.0 and m[0].sum() == 1.0
    assert m[1, 2, 0] == 0.5 and m[1].sum() == 0.5


def test_top_patch_share_is_the_mass_of_the_top_patches_over_the_patch_mass():
    from regcls.metrics import top_patch_share
    P, N = 2, 200                                  # 1% of 200 patches: the top 2; 1.5% rounds up to 3
    a = np.zeros((3, 2, P + N))
    a[:, :, :P] = 0.3                              # prefix attention is left out, not part of the share
    a[0, :, P:] = 0.7 / N                          # a flat map: the top 2 hold 2 / N
    a[1, 0, P:] = 0.7 / N                          # head 0 flat, head 1 all on patch 5 and 9: after the head
    a[1, 1, P + 5], a[1, 1, P + 9] = 0.5, 0.2      # average, patches 5 and 9 carry (0.7 + 1.4 / N) / 1.4
    a[2, :, P + 7] = 0.7                           # one artifact patch draws everything
    s = top_patch_share({"cls_attn": a, "meta": {"num_prefix_tokens": P}})
    assert s == pytest.approx([2 / N, (0.7 + 1.4 / N) / 1.4, 1.0], rel=1e-12)
    assert top_patch_share({"cls_attn": a, "meta": {"num_prefix_tokens": P}}, frac=0.015)[0] == pytest.approx(3 / N)
    assert top_patch_share({"cls_attn": a[:, :, :P + 10], "meta": {"num_prefix_tokens": P}})[0] == pytest.approx(1 / 10)


def test_paired_cka_difference_uses_the_same_resamples_for_both_pairs():
    from regcls.metrics import cka_difference_interval
    X = rng.normal(size=(40, 6))
    Y1, Y2 = X[:, :3] + 0.3 * rng.normal(size=(40, 3)), X[:, 3:] + 1.5 * rng.normal(size=(40, 3))
    g = np.random.default_rng(4)
    idx = [g.integers(0, 40, 40) for _ in range(50)]
    boots = [cka(X[i], Y1[i]) - cka(X[i], Y2[i]) for i in idx]
    want = (cka(X, Y1) - cka(X, Y2), *np.percentile(boots, [2.5, 97.5]))
    np.testing.assert_allclose(cka_difference_interval(X, Y1, X, Y2, n_boot=50, seed=4), want, atol=1e-10)


def test_paired_cka_ratio_uses_the_same_resamples_for_both_pairs():
    from regcls.metrics import cka_ratio_interval
    X = rng.normal(size=(40, 6))
    Y1, Y2 = X[:, :3] + 0.3 * rng.normal(size=(40, 3)), X[:, 3:] + 1.5 * rng.normal(size=(40, 3))
    g = np.random.default_rng(4)
    idx = [g.integers(0, 40, 40) for _ in range(50)]
    boots = [cka(X[i], Y1[i]) / cka(X[i], Y2[i]) for i in idx]
    want = (cka(X, Y1) / cka(X, Y2), *np.percentile(boots, [2.5, 97.5]))
    np.testing.assert_allclose(cka_ratio_interval(X, Y1, X, Y2, n_boot=50, seed=4), want, rtol=1e-9)
    v, lo, hi = cka_ratio_interval(X, Y1, X, Y2, n_boot=0)
    assert v == pytest.approx(want[0]) and np.isnan(lo) and np.isnan(hi)
    with pytest.raises(ValueError, match="same images"):
        cka_ratio_interval(X, Y1, X[:30], Y2[:30])


def test_depth_changes_on_known_curves():
    from regcls.metrics import depth_changes
    c = np.array([[0.3, 0.3, 0.4, 1.0],      # a jump at the last block: 0.6 of a total 0.7
                  [0.7, 0.8, 0.9, 1.0],      # smooth: three steps of 0.1
                  [0.5, 0.2, 0.9, 1.0],      # down and up: the total counts every step's size (0.3 + 0.7 + 0.1)
                  [1.0, 1.0, 1.0, 1.0]])     # never moves
    d = depth_changes(c)
    np.testing.assert_allclose(d["last"], [0.6, 0.1, 0.1, 0.0], atol=1e-12)
    np.testing.assert_allclose(d["largest"], [0.6, 0.1, 0.7, 0.0], atol=1e-12)
    np.testing.assert_allclose(d["last share"], [0.6 / 0.7, 1 / 3, 0.1 / 1.1, 0.0], atol=1e-12)
    np.testing.assert_allclose(d["largest / mean"], [0.6 * 3 / 0.7, 1.0, 0.7 * 3 / 1.1, 1.0], atol=1e-12)


# ------------------------------------------------------------------ the smaller measurements, on known inputs

def test_norms_cosine_and_layer_cosine():
    from regcls.metrics import layer_cosine, norms
    X = np.array([[3.0, 4.0], [0.0, -2.0]], np.float32)
    np.testing.assert_allclose(norms(X), [5.0, 2.0])
    assert norms(X).dtype == np.float64
    np.testing.assert_allclose(cosine(X, np.array([[4.0, -3.0], [0.0, 5.0]])), [0.0, -1.0], atol=1e-12)
    layers = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])   # (n=1, L=3, D=2): last layer points along y
    np.testing.assert_allclose(layer_cosine({"cls_layers": layers}), [[0.0, 2 ** -0.5, 1.0]], atol=1e-12)


def test_skip_outputs_add_the_skip_term_to_the_full_attention_output():
    from regcls.metrics import skip_outputs
    t = fake_trace()
    t["skip"] = rng.normal(size=t["attn_out_full"].shape)
    s = skip_outputs(t)
    np.testing.assert_allclose(s["standard"], t["skip"] + t["attn_out_full"])
    np.testing.assert_allclose(s["skip"], t["skip"])
    for p in ("patch", "reg", "cls"):
        np.testing.assert_allclose(s[p], t[f"attn_out_{p}"] + t["attn_out_bias"])


def test_knockout_without_the_bias_gives_the_parts_proper_that_add_up_to_the_full_output():
    t = fake_trace()
    k = knockout(t, bias=False)
    for p in ("cls", "reg", "patch"):
        np.testing.assert_array_equal(k[p], t[f"attn_out_{p}"])
    np.testing.assert_allclose(k["cls"] + k["reg"] + k["patch"], k["full"], atol=1e-12)
    np.testing.assert_allclose(k["full"], t["attn_out_full"] - t["attn_out_bias"])
    kc = knockout(t, bias=False, keep_cls=True)
    np.testing.assert_allclose(kc["patch"], t["attn_out_patch"] + t["attn_out_cls"])
    np.testing.assert_array_equal(knockout(t, level="val", bias=False)["patch"], t["attn_val_patch"])  # no bias there


def test_penultimate_cosine_integration_depth_and_the_skip_patch_ratio():
    from regcls.metrics import integration_depth, penultimate_cosine, skip_patch_ratio
    # two images, four blocks; the [CLS] turns towards the final one: cosines 0, 0.6, 0.96 (image 0), 0.8 (image 1)
    final = np.array([1.0, 0.0])
    layers = np.array([[[0.0, 1.0], [0.6, 0.8], [0.96, 0.28], final],
                       [[0.0, 1.0], [0.6, 0.8], [0.8, 0.6], final]])
    t = {"cls_layers": layers}
    assert penultimate_cosine(t) == pytest.approx((0.96 + 0.8) / 2)
    assert integration_depth(t) == pytest.approx(4 / 4)          # mean cosine 0.88 at block 3 < 0.9: block 4
    assert integration_depth(t, threshold=0.85) == pytest.approx(3 / 4)
    assert integration_depth(t, threshold=0.5) == pytest.approx(2 / 4)
    t = fake_trace()
    t["skip"] = rng.normal(size=t["attn_out_full"].shape)
    np.testing.assert_allclose(skip_patch_ratio(t), np.linalg.norm(t["skip"], axis=1)
                               / np.linalg.norm(t["attn_out_patch"], axis=1))


def test_oneshot_knockout_trains_on_the_unaltered_output_and_tests_each_part_per_seed():
    from regcls.metrics import oneshot, oneshot_knockout, oneshot_split
    t = fake_trace(n=12, D=6)
    t["labels"] = np.repeat(np.arange(4), 3)
    got = oneshot_knockout(t, seeds=(0, 1), k=1, classifier="ncm", level="val")
    k = knockout(t, level="val")
    for i, seed in enumerate((0, 1)):
        a, b = oneshot_split(t["labels"], seed)
        want = oneshot(k["full"][a], t["labels"][a], {p: k[p][b] for p in ("full", "patch", "reg")}, t["labels"][b],
                       classifier="ncm", k=1)
        for p in ("full", "patch", "reg"):
            assert got[p][i] == want[p]
    assert set(got) == {"full", "patch", "reg"} and got["full"].shape == (2,)


def test_unit_norm_scales_every_output_to_norm_one_and_keeps_its_direction():
    from regcls.metrics import norms, unit_norm
    ko = {p: rng.normal(size=(5, 4)) * w for p, w in (("full", 3.0), ("cls", 1.0), ("reg", 0.5), ("patch", 1e-6))}
    ko["patch"][2] = 0.0
    out = unit_norm(ko)
    assert set(out) == set(ko)
    for p in ("full", "cls", "reg"):
        np.testing.assert_allclose(norms(out[p]), 1.0)
        np.testing.assert_allclose(cosine(out[p], ko[p]), 1.0)
    keep = np.arange(5) != 2
    np.testing.assert_allclose(norms(out["patch"][keep]), 1.0)
    np.testing.assert_allclose(cosine(out["patch"][keep], ko["patch"][keep]), 1.0)
    np.testing.assert_array_equal(out["patch"][2], 0.0)      # a zero row has no direction to keep: it stays zero


def test_a_unit_norm_oneshot_separates_scale_from_missing_information():
    """A patch part pointing exactly along the unaltered output but 100 times shorter: the raw test lands every image
    near the standardiser's mean (near chance); at unit norm it is the unaltered output at unit norm."""
    from regcls.metrics import oneshot_knockout
    C, per, D = 20, 3, 8
    y = np.repeat(np.arange(C), per)
    full = rng.normal(size=(C, D))[y] * 3 + rng.normal(size=(C * per, D)) * 0.3 + 20.0   # far from the origin
    t = fake_trace(n=C * per, D=D)
    t.update(labels=y, attn_val_patch=full / 100, attn_val_cls=full * 99 / 100, attn_val_reg=np.zeros_like(full))
    raw = oneshot_knockout(t, seeds=(0, 1, 2), k=1, level="val")
    unit = oneshot_knockout(t, seeds=(0, 1, 2), k=1, level="val", unit=True)
    assert raw["full"].mean() > 0.9 and raw["patch"].mean() < 0.3
    assert unit["full"].mean() > 0.9
    np.testing.assert_array_equal(unit["patch"], unit["full"])
    assert unit["reg"].mean() < 0.3                              # a zero part carries nothing at any scale


def test_knockout_cka_is_the_cka_interval_of_each_part_with_the_unaltered_output():
    from regcls.metrics import knockout_cka
    k = knockout(fake_trace(n=20), level="val")
    got = knockout_cka(k, n_boot=50)
    assert set(got) == {"patch", "reg"}
    for p in ("patch", "reg"):
        assert got[p] == cka_interval(k["full"], k[p], n_boot=50)
    assert knockout_cka(k, n_boot=0, debiased=True)["patch"].value == cka(k["full"], k["patch"], debiased=True)


def test_top_dims_are_the_largest_mean_absolute_dimensions():
    from regcls.metrics import top_dims_mean
    X = np.array([[1.0, -10.0, 0.5, 3.0], [-1.0, 10.0, 0.5, -5.0]])   # mean |x|: 1, 10, 0.5, 4
    dims, means = top_dims_mean(X, k=3)
    assert dims.tolist() == [1, 3, 0]
    np.testing.assert_allclose(means, [10.0, 4.0, 1.0])
    dims2, means2 = top_dims_mean(X / 2, dims=dims)
    assert dims2.tolist() == [1, 3, 0]
    np.testing.assert_allclose(means2, [5.0, 2.0, 0.5])
    assert top_dims_mean(X)[0].tolist() == [1, 3, 0, 2]   # k larger than the width: every dimension


def test_highest_norm_token_and_its_ratio_to_the_second():
    from regcls.metrics import highest_norm_token
    norms_ = np.array([[1.0, 8.0, 2.0, 4.0, 0.5],     # token 1, 8 / 4
                       [1.0, 9.0, 3.0, 1.0, 0.1],     # token 1, 9 / 3
                       [6.0, 1.0, 2.0, 1.0, 0.2]])    # token 0, 6 / 2
    h = highest_norm_token({"token_norms_penult": norms_})
    assert h.token.tolist() == [1, 1, 0] and h.mode == 1
    assert h.mode_fraction == pytest.approx(2 / 3)
    np.testing.assert_allclose(h.ratio, [2.0, 3.0, 3.0])



def test_highest_norm_token_against_the_non_register_tokens_and_the_runner_up():
    from regcls.metrics import highest_norm_token
    norms_ = np.array([[1.0, 8.0, 7.0, 0.5, 0.4],     # [CLS], 2 registers, 2 patches: register 1 first, register 2
                       [2.0, 9.0, 1.0, 0.3, 3.0]])    # next; then patch 1 next
    h = highest_norm_token({"token_norms_penult": norms_, "meta": {"num_registers": 2}})
    assert h.mode == 1 and h.num_registers == 2 and h.runner_up.tolist() == [2, 4]
    np.testing.assert_allclose(h.to_nonreg, [8.0, 3.0])          # over max([CLS], patches): the register 2 left out
    np.testing.assert_allclose(h.ratio, [8 / 7, 3.0])
    bare = highest_norm_token({"token_norms_penult": norms_})      # no metadata: no registers, every token counts
    np.testing.assert_allclose(bare.to_nonreg, [8 / 7, 3.0])


def test_high_norm_patches_count_patches_above_a_multiple_of_the_median_token_norm():
    from regcls.metrics import high_norm_patches
    norms_ = np.array([[50.0, 90.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0],     # median 1: one patch above 3 (the prefix
                       [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])    # tokens above it are not patches)
    t = {"token_norms_penult": norms_, "meta": {"num_prefix_tokens": 2}}
    assert high_norm_patches(t, 3.0).tolist() == [1, 0]
    assert high_norm_patches(t, 5.0).tolist() == [0, 0]

def test_same_images_returns_the_shared_ids_or_names_the_trace_that_differs():
    from regcls.errors import RegclsError
    from regcls.metrics import same_images
    a = {"image_ids": np.array(["x.jpg", "y.jpg"]), "meta": {"model": "small"}}
    b = {"image_ids": ["x.jpg", "y.jpg"], "meta": {"model": "big"}}
    assert same_images([a, b]) == ["x.jpg", "y.jpg"]
    assert same_images(iter([a])) == ["x.jpg", "y.jpg"]
    c = {"image_ids": ["y.jpg", "x.jpg"], "meta": {"model": "giant"}}
    with pytest.raises(RegclsError, match=r"^giant was traced on other images than small: size contrasts"):
        same_images([a, b, c])
    with pytest.raises(RegclsError, match=r"^a trace was traced on other images than the first"):
        same_images([{"image_ids": ["x"], "meta": {}}, {"image_ids": ["z"], "meta": {}}])


def test_oneshot_split_draws_two_different_images_of_each_class():
    from regcls.metrics import oneshot_split
    y = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])   # class 2 has one image: skipped
    seen = set()
    for seed in range(20):
        a, b = oneshot_split(y, seed)
        assert y[a].tolist() == [0, 1, 3] and y[b].tolist() == [0, 1, 3]
        assert (a != b).all()
        seen.add((tuple(a), tuple(b)))
    assert len(seen) > 5                                # the seed changes the draw
    assert oneshot_split(y, 3)[0].tolist() == oneshot_split(y, 3)[0].tolist()


def test_topk_accuracy_counts_the_true_class_among_the_k_best():
    from regcls.metrics import topk_accuracy
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.3, 0.3, 0.4]])
    classes = np.array([10, 20, 30])
    y = np.array([30, 30, 10])
    assert topk_accuracy(scores, classes, y, 1) == 0.0
    assert topk_accuracy(scores, classes, y, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, classes, y, 5) == 1.0            # k beyond the classes: all of them
    assert topk_accuracy(scores, classes, np.array([20, 10, 30]), 1) == 1.0


def test_nearest_class_mean_one_shot_uses_cosine():
    from regcls.metrics import oneshot
    train = np.array([[9.0, 0.0], [0.0, 0.5]])                # class 0 long, class 1 short: only direction counts
    test = np.array([[100.0, 1.0], [0.2, 5.0], [3.0, 2.0]])   # by direction: 0, 1, 0 (by raw product: 0, 0, 0)
    assert oneshot(train, np.array([0, 1]), {"t": test}, np.array([0, 1, 0]), classifier="ncm", k=1) == {"t": 1.0}
    with pytest.raises(ValueError, match="classifier"):
        oneshot(train, np.array([0, 1]), {"t": test}, np.array([0, 1, 0]), classifier="svm")


# ------------------------------------------------------------------ precision, degenerate inputs, messages

def test_float32_inputs_are_measured_in_float64():
    """Traces are stored in float32; every measurement widens first (a float32 CKA of offset features is off
    by ~1e-4, far above the 1e-10 here)."""
    from regcls.metrics import highest_norm_token, layer_cosine, norms, skip_outputs
    X = (rng.normal(size=(40, 6)) + 300.0).astype(np.float32)
    Y = (X[:, :4] * 2 + rng.normal(size=(40, 4)) + 50.0).astype(np.float32)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    for f in (cka, lambda a, b: cka(a, b, debiased=True), lambda a, b: cosine(a, a[::-1]),
              lambda a, b: mean_pairwise_cosine(a), lambda a, b: norms(a)):
        np.testing.assert_allclose(f(X, Y), f(X64, Y64), rtol=1e-12, atol=0)
    counts = np.random.default_rng(1).integers(0, 3, (40, 5))
    np.testing.assert_allclose(cka_resampled(X, Y, counts.astype(np.float32)), cka_resampled(X64, Y64, counts),
                               rtol=1e-10, atol=0)
    t = fake_trace()
    t["skip"] = rng.normal(size=t["attn_out_full"].shape) + 100.0
    t["cls_layers"] = rng.normal(size=(6, 3, 4)) + 30.0
    t["token_norms_penult"] = rng.uniform(1, 2, size=(6, 5)) + 1000.0
    t32 = {k: v.astype(np.float32) for k, v in t.items()}
    t64 = {k: v.astype(np.float32).astype(np.float64) for k, v in t.items()}
    for f in (knockout, lambda tr: knockout(tr, level="val", renormalise=True), skip_outputs):
        for key, v in f(t32).items():
            assert v.dtype == np.float64
            np.testing.assert_allclose(v, f(t64)[key], rtol=1e-14, atol=0)
    np.testing.assert_allclose(layer_cosine(t32), layer_cosine(t64), rtol=1e-14, atol=0)
    np.testing.assert_allclose(highest_norm_token(t32).ratio, highest_norm_token(t64).ratio, rtol=1e-14, atol=0)


def test_cka_is_scale_free_at_any_scale_and_nan_without_variance():
    import warnings as w
    X, Y = rng.normal(size=(30, 5)), rng.normal(size=(30, 3))
    for scale in (1e-4, 1e4):
        assert cka(X * scale, Y) == pytest.approx(cka(X, Y), rel=1e-10)
        assert cka(X * scale, Y * scale, debiased=True) == pytest.approx(cka(X, Y, debiased=True), rel=1e-10)
        assert cka_resampled(X * scale, Y * scale, np.ones((30, 1)))[0] == pytest.approx(cka(X, Y), rel=1e-10)
    const = np.ones((30, 2))
    with w.catch_warnings():
        w.simplefilter("error")   # no 0/0 along the way
        assert np.isnan(cka(const, Y)) and np.isnan(cka(Y, const))
        assert np.isnan(cka(const, Y, debiased=True)) and np.isnan(cka(Y, const, debiased=True))
        assert np.isnan(cka_resampled(const, Y, np.ones((30, 2)))).all()
        assert np.isnan(cka_resampled(Y, const, np.ones((30, 2)))).all()


def test_zero_resamples_give_the_value_with_a_nan_interval_and_one_resample_a_number():
    from regcls.metrics import cka_difference_interval
    X, Y = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
    for f in (lambda **k: bootstrap_ci(np.mean, X[:, 0], **k), lambda **k: cka_interval(X, Y, **k),
              lambda **k: cka_interval(X, Y, debiased=True, **k),
              lambda **k: cka_difference_interval(X, Y, X, X[:, :2], **k)):
        v, lo, hi = f(n_boot=0)
        assert np.isfinite(v) and np.isnan(lo) and np.isnan(hi)
        v1, lo1, hi1 = f(n_boot=1)
        assert v1 == v and np.isfinite(lo1) and lo1 == hi1


def test_the_level_reaches_every_interval():
    X, Y = rng.normal(size=(25, 4)), rng.normal(size=(25, 3))
    for debiased in (False, True):
        _, lo95, hi95 = cka_interval(X, Y, debiased=debiased, n_boot=200)
        _, lo50, hi50 = cka_interval(X, Y, debiased=debiased, n_boot=200, level=0.5)
        assert lo95 < lo50 < hi50 < hi95


def test_bad_arguments_are_one_line_errors():
    from regcls.metrics import cka_difference_interval, oneshot
    X = rng.normal(size=(6, 2))
    with pytest.raises(ValueError, match=r"^X and Y need the same number of rows \(images\)$"):
        cka(X, X[:5])
    with pytest.raises(ValueError, match=r"^debiased CKA needs at least 4 images$"):
        cka(X[:3], X[:3], debiased=True)
    cka(X[:4], X[:4], debiased=True)   # four is enough
    with pytest.raises(ValueError, match=r"^a paired contrast needs the same images in every array$"):
        cka_difference_interval(X, X, X, X[:5])
    with pytest.raises(ValueError, match=r"^level is 'out' or 'val'$"):
        knockout(fake_trace(), level="in")
    with pytest.raises(ValueError, match=r"^renormalised parts exist before the projection only; use level='val' "):
        knockout(fake_trace(), level="out", renormalise=True)
    with pytest.raises(ValueError, match=r"^classifier is 'logreg' or 'ncm'$"):
        oneshot(X, np.arange(6), {"x": X}, np.arange(6), classifier="svm")


def test_a_head_exactly_at_the_floor_is_renormalised():
    from regcls.metrics import RENORM_FLOOR
    t = fake_trace()
    t["attn_mass"][0, -1, 0] = (0.5, 0.5 - RENORM_FLOOR, RENORM_FLOOR)
    n, D = t["attn_val_patch"].shape
    k = knockout(t, level="val", renormalise=True)
    np.testing.assert_allclose(k["patch"].reshape(n, 2, D // 2)[0, 0], t["attn_val_patch"].reshape(n, 2, D // 2)[0, 0]
                               / RENORM_FLOOR)


def test_standardise_uses_the_training_rows_statistics_and_leaves_constant_features():
    import torch

    from regcls.probe import _standardise
    tr = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]], dtype=torch.float64)
    te = torch.tensor([[3.0, 6.0, 5.0]], dtype=torch.float64)
    a, b = _standardise(tr, te)
    torch.testing.assert_close(a.mean(0), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(a.std(0, correction=0), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    sd = np.sqrt(8 / 3)   # population sd of (1, 3, 5)
    torch.testing.assert_close(b[0, :2], torch.tensor([0.0, 1.0], dtype=torch.float64))   # constant: shifted only
    assert b[0, 0].item() == pytest.approx((3 - 3) / sd) and a[0, 0].item() == pytest.approx(-2 / sd)


def test_probe_chance_is_the_majority_training_class_and_bad_labels_are_one_line():
    from regcls.errors import RegclsError
    from regcls.probe import fit_logistic, linear_probe
    import torch
    y = np.array([0] * 30 + [1] * 10 + [2] * 10)
    X = np.random.default_rng(3).normal(size=(50, 4))
    r = linear_probe(X, y, test_size=0.4)
    assert r.n_test == 20 and r.n_train == 30
    assert r.chance == pytest.approx(12 / 20)   # stratified: 12 of the 20 test images are class 0
    r = linear_probe(X, y, test_size=0.99)           # capped: every class keeps a training image
    assert r.n_test == 47 and r.n_train == 3 and r.C == 1.0
    with pytest.raises(RegclsError, match=r"^a linear probe needs at least two images of every class; the smallest "
                                          r"class has 1$"):
        linear_probe(X[:41], np.append(y[:40], 7))
    W, b = fit_logistic(torch.tensor(X), torch.tensor(y), 3, 1.0)
    assert W.dtype == b.dtype == torch.float64 and W.shape == (4, 3) and b.shape == (3,)


def test_probe_with_two_images_per_class_and_more_classes_than_a_30_percent_split():
    """Colab's first build: ImageNetV2 capped to two images of each class (there 1,000; here 200). A 30% test
    split (120 images) cannot hold every class: each class gives one image to each split."""
    from regcls.probe import linear_probe
    y = np.repeat(np.arange(200), 2)
    X = np.random.default_rng(5).normal(size=(400, 6)) + 3 * np.eye(6)[y % 6]
    r = linear_probe(X, y, device="cpu")
    assert r.n_test == r.n_train == 200 and r.C == 1.0 and 0.0 <= r.accuracy <= 1.0


def test_intervals_are_named_and_unpack_as_before():
    from regcls.metrics import Interval, bootstrap_ci, cka_difference_interval, cka_interval
    X = np.random.default_rng(7).normal(size=(30, 4))
    for iv in (bootstrap_ci(np.mean, X[:, 0], n_boot=20), cka_interval(X, X[:, :2], n_boot=20),
               cka_difference_interval(X, X[:, :2], X, X[:, 2:], n_boot=20)):
        assert isinstance(iv, Interval) and iv.low < iv.high
        value, low, high = iv
        assert (value, low, high) == (iv.value, iv.low, iv.high) == tuple(iv)
