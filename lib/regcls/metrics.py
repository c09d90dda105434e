"""The measurements: attention shares, knockout outputs, CKA, cosine statistics, bootstrap intervals.

All functions take arrays from a trace (numpy, float32 or float64) and return numpy values.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import numpy as np
from .errors import RegclsError

PART_INDEX = {"cls": 0, "reg": 1, "patch": 2}
GRAM_MAX_IMAGES = 20_000  # cka_interval: above this, (n, n) Gram matrices (3.2 GB each) would not fit well


def shares(trace: dict, layer: int = -1) -> dict[str, np.ndarray]:
    """Per-image [CLS] attention share of [CLS], registers and patches at ``layer``, averaged over heads.

    Returns ``{"cls": (n,), "reg": (n,), "patch": (n,)}``; the three add to 1 for each image.
    """
    mass = trace["attn_mass"][:, layer].mean(axis=1)  # (n, 3)
    return {name: mass[:, i] for name, i in PART_INDEX.items()}


def part_share(trace: dict, part: str = "reg", drop_cls_self: bool = True, layer: int = -1) -> np.ndarray:
    """Sec. 3.1, per image (n,): the [CLS] attention share of ``part`` (``"reg"`` or ``"patch"``) at ``layer``,
    averaged over heads; with ``drop_cls_self`` renormalised over registers and patches (the paper's register and
    patch shares add to one, without the [CLS]-self share)."""
    s = shares(trace, layer=layer)
    return s[part] / (s["reg"] + s["patch"]) if drop_cls_self else s[part]


RENORM_FLOOR = 1e-3  # a head that keeps less of its attention than this is not renormalised (it would divide by ~0)


def knockout(trace: dict, level: str = "out", renormalise: bool = False, keep_cls: bool = False,
             bias: bool = True) -> dict[str, np.ndarray]:
    """The last block's [CLS] attention output, unaltered and restricted to one token type.

    ``level="out"``: after the output projection and LayerScale (what enters the residual stream; the
    projection bias is kept in every variant so that they differ only by the knocked-out tokens).
    ``level="val"``: before the output projection (heads concatenated).
    ``renormalise``: divide each head's kept attention by its kept mass, so the kept weights sum to 1 (the
    paper leaves this open; the default keeps the raw weights, so the parts add up to the full output).
    A head that keeps less than ``RENORM_FLOOR`` is left as it is; :func:`low_mass_heads` counts them.
    ``keep_cls``: the [CLS]-self term stays in the patch-only and register-only outputs (a literal reading
    of the paper, which knocks out the *other* tokens); by default each output holds one token type only.
    ``bias=False`` (``level="out"``): the parts proper, without the projection bias, and ``full`` without it
    too (so that the parts add up to it; for norms, cosines and maps of one token type's contribution).
    Returns ``{"full", "cls", "reg", "patch"}`` each (n, D).
    """
    if level not in ("out", "val"):
        raise ValueError("level is 'out' or 'val'")
    if renormalise and level == "out":
        raise ValueError("renormalised parts exist before the projection only; use level='val' (the projection "
                         "is linear, so CKA after it differs only by the fixed linear map)")
    raw = {p: trace[f"attn_{level}_{p}"].astype(np.float64) for p in PART_INDEX}
    out = {p: sum(raw[q] for q in _kept(p, keep_cls)) for p in PART_INDEX}
    if renormalise:
        n, D = out["cls"].shape
        for p, m in _kept_mass(trace, keep_cls).items():                  # (n, H)
            m = np.where(m < RENORM_FLOOR, 1.0, m)[:, :, None]
            out[p] = (out[p].reshape(n, m.shape[1], -1) / m).reshape(n, D)
    if level == "val":
        out["full"] = sum(raw.values())
        return out
    b = trace["attn_out_bias"].astype(np.float64)
    full = trace["attn_out_full"].astype(np.float64)
    if not bias:
        return {**out, "full": full - b}
    return {**{p: v + b for p, v in out.items()}, "full": full}


def _kept(part: str, keep_cls: bool) -> tuple[str, ...]:
    """The token types an output restricted to ``part`` keeps."""
    return (part, "cls") if keep_cls and part != "cls" else (part,)


def _kept_mass(trace: dict, keep_cls: bool) -> dict[str, np.ndarray]:
    """Per part, the last block's [CLS] attention mass each head keeps: (n, H)."""
    mass = trace["attn_mass"][:, -1].astype(np.float64)  # (n, H, 3)
    return {p: sum(mass[:, :, PART_INDEX[q]] for q in _kept(p, keep_cls)) for p in PART_INDEX}


def low_mass_heads(trace: dict, keep_cls: bool = False, floor: float = RENORM_FLOOR) -> dict[str, float]:
    """Fraction of (image, head) pairs of the last block whose kept attention mass is below ``floor``, per part.

    These heads are left unscaled by ``knockout(renormalise=True)``; a large fraction makes the renormalised
    variant unreliable.
    """
    return {p: float((m < floor).mean()) for p, m in _kept_mass(trace, keep_cls).items()}


def cka(X: np.ndarray, Y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) between representations X (n, d1) and Y (n, d2) of n images.

    Mean-centred; ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, from the (d, d) cross-products or, where there
    are fewer images than dimensions, from the (n, n) Gram matrices (the same value). ``debiased`` uses the unbiased HSIC
    estimator (Song et al. 2012), which removes the upward bias of CKA when n is not much larger than d.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.shape[0] != Y.shape[0]:
        raise ValueError("X and Y need the same number of rows (images)")
    if not debiased:
        X = X - X.mean(0)
        Y = Y - Y.mean(0)
        if X.shape[0] < max(X.shape[1], Y.shape[1]):   # n < d: the n x n Gram form, its memory whatever the width
            K, L = X @ X.T, Y @ Y.T
            num, den = float(np.sum(K * L)), float(np.sqrt(np.sum(K * K) * np.sum(L * L)))
        else:   # ||Y^T X||_F^2 = trace(K L), ||X^T X||_F = ||K||_F
            num = np.linalg.norm(Y.T @ X) ** 2
            den = np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
        return float(num / den) if den > 0 else float("nan")
    K, L = X @ X.T, Y @ Y.T
    hxy, hxx, hyy = _hsic_unbiased(K, L), _hsic_unbiased(K, K), _hsic_unbiased(L, L)
    return float(hxy / np.sqrt(hxx * hyy)) if hxx > 0 and hyy > 0 else float("nan")


def _hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC of two symmetric Gram matrices (n, n), in O(n^2)."""
    n = K.shape[0]
    if n < 4:
        raise ValueError("debiased CKA needs at least 4 images")
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    k1, l1 = K.sum(axis=0), L.sum(axis=0)
    t1 = float(np.sum(K * L))                      # trace(K L) for symmetric K, L
    t2 = k1.sum() * l1.sum() / ((n - 1) * (n - 2))
    t3 = 2 * float(k1 @ l1) / (n - 2)              # 1^T K L 1
    return float((t1 + t2 - t3) / (n * (n - 3)))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (n, d) arrays (broadcasts)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def mean_pairwise_cosine(X: np.ndarray) -> float:
    """Mean cosine similarity over all pairs i < j of the rows of X (n, d), in O(n d).

    The sum of all pairwise cosines is ``(||sum_i z_i||^2 - n) / 2`` for unit rows z_i.
    """
    Z = np.asarray(X, dtype=np.float64)
    Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    n = len(Z)
    total = Z.sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


def norms(X: np.ndarray) -> np.ndarray:
    """Row-wise L2 norms (n,)."""
    return np.linalg.norm(np.asarray(X, dtype=np.float64), axis=-1)


class Interval(NamedTuple):
    """A statistic and its bootstrap interval; unpacks as ``value, low, high``."""

    value: float
    low: float
    high: float


def bootstrap_ci(stat: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> Interval:
    """Statistic and percentile bootstrap interval over images (rows resampled jointly in every array).

    Returns ``(value, low, high)``. Example: ``bootstrap_ci(np.mean, shares)``. ``n_boot=0`` skips the
    resampling (the interval is NaN). For CKA use :func:`cka_interval` (the same resamples, much faster).
    """
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    value = float(stat(*arrays))
    if n_boot == 0:
        return Interval(value, float("nan"), float("nan"))
    boots = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        boots[b] = stat(*(a[idx] for a in arrays))
    return Interval(value, *_percentiles(boots, level))


def _percentiles(boots: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.nanpercentile(boots, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def cka_interval(X: np.ndarray, Y: np.ndarray, debiased: bool = False, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> Interval:
    """CKA of X (n, d1) and Y (n, d2) with a percentile bootstrap interval over images: the values of
    ``bootstrap_ci(cka, X, Y)``. Linear CKA's resamples (up to :data:`GRAM_MAX_IMAGES` images) are evaluated
    from the two Gram matrices (:func:`cka_resampled`), O(n^2) per resample instead of O(n d^2)."""
    n = len(X)
    if debiased or n > GRAM_MAX_IMAGES:  # pragma: no mutate (equivalent)
        return bootstrap_ci(lambda a, b: cka(a, b, debiased=debiased), X, Y, n_boot=n_boot, level=level, seed=seed)
    value = cka(X, Y)
    if n_boot == 0:
        return Interval(value, float("nan"), float("nan"))
    return Interval(value, *_percentiles(cka_resampled(X, Y, _resample_counts(n, n_boot, seed)), level))


def _resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n, n_boot): how often each image occurs in each resample -- the same resamples as bootstrap_ci draws."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)], axis=1)


def knockout_cka(ko: dict[str, np.ndarray], n_boot: int = 1000, debiased: bool = False) -> dict[str, Interval]:
    """Sec. 3.3: CKA of the patch-only and the register-only output with the unaltered one, over the images, each
    with its bootstrap interval; ``ko`` as :func:`knockout` returns it. ``{"patch": Interval, "reg": Interval}``."""
    return {p: cka_interval(ko["full"], ko[p], debiased=debiased, n_boot=n_boot) for p in ("patch", "reg")}


def cka_difference_interval(X1: np.ndarray, Y1: np.ndarray, X2: np.ndarray, Y2: np.ndarray, n_boot: int = 1000,
                            level: float = 0.95, seed: int = 0) -> Interval:
    """``cka(X1, Y1) - cka(X2, Y2)`` with a *paired* percentile bootstrap interval: each resample draws the same
    images for both pairs (the rows of all four arrays are the same images, e.g. two model sizes).

    Pairing removes the images' shared variation from the contrast, so the interval is that of the difference
    itself, not of two separate intervals. ``n_boot=0`` skips the resampling (NaN interval).
    """
    n = len(X1)
    if not len(Y1) == len(X2) == len(Y2) == n:
        raise ValueError("a paired contrast needs the same images in every array")
    value = cka(X1, Y1) - cka(X2, Y2)
    if n_boot == 0:
        return Interval(value, float("nan"), float("nan"))
    counts = _resample_counts(n, n_boot, seed)
    return Interval(value, *_percentiles(cka_resampled(X1, Y1, counts) - cka_resampled(X2, Y2, counts), level))


def cka_ratio_interval(X1: np.ndarray, Y1: np.ndarray, X2: np.ndarray, Y2: np.ndarray, n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> Interval:
    """``cka(X1, Y1) / cka(X2, Y2)`` with a *paired* percentile bootstrap interval, as
    :func:`cka_difference_interval` (the same images drawn for both pairs in each resample): a contrast stated as
    a factor ("at least twice as aligned in S as in g")."""
    n = len(X1)
    if not len(Y1) == len(X2) == len(Y2) == n:
        raise ValueError("a paired contrast needs the same images in every array")
    value = cka(X1, Y1) / cka(X2, Y2)
    if n_boot == 0:
        return Interval(value, float("nan"), float("nan"))
    counts = _resample_counts(n, n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        boots = cka_resampled(X1, Y1, counts) / cka_resampled(X2, Y2, counts)
    return Interval(value, *_percentiles(boots, level))


def same_images(traces) -> list[str]:
    """The image ids the traces share, in order; a one-line error when they differ (no paired contrast then)."""
    traces = list(traces)
    ids = [str(i) for i in traces[0]["image_ids"]]
    for t in traces[1:]:
        if [str(i) for i in t["image_ids"]] != ids:
            raise RegclsError(f"{t['meta'].get('model', 'a trace')} was traced on other images than "
                              f"{traces[0]['meta'].get('model', 'the first')}: size contrasts need the same images")
    return ids


def cka_resampled(X: np.ndarray, Y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Linear CKA of resamples of the rows of X (n, d1) and Y (n, d2): ``counts`` (n, B) says how often each
    row occurs in each of B resamples. Returns (B,), equal to ``cka(X[idx], Y[idx])`` for each resample.

    With Gram matrices K = X X^T, L = Y Y^T and a resample's counts w (summing to m), the centred HSIC is
    ``w^T (K*L) w - 2/m sum_j w_j (Kw)_j (Lw)_j + (w^T K w)(w^T L w)/m^2``: five (n, n) @ (n, B) products
    for all resamples. X and Y are first centred on the full sample, which CKA ignores, so that the terms
    stay small and do not cancel.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    W = np.asarray(counts, dtype=np.float64)
    m = W.sum(axis=0)
    K = (X - X.mean(0)) @ (X - X.mean(0)).T
    L = (Y - Y.mean(0)) @ (Y - Y.mean(0)).T
    KW, LW = K @ W, L @ W

    def hsic(A, AW, B, BW):
        return (np.einsum("nb,nb->b", W, (A * B) @ W) - 2 / m * np.einsum("nb,nb,nb->b", W, AW, BW)
                + np.einsum("nb,nb->b", W, AW) * np.einsum("nb,nb->b", W, BW) / m**2)

    xy, xx, yy = hsic(K, KW, L, LW), hsic(K, KW, K, KW), hsic(L, LW, L, LW)
    with np.errstate(invalid="ignore", divide="ignore"):  # pragma: no mutate (equivalent)
        return np.where((xx > 0) & (yy > 0), xy / np.sqrt(xx * yy), np.nan)


def skip_outputs(trace: dict) -> dict[str, np.ndarray]:
    """Sec. 4: the post-attention [CLS] state and its parts, each (n, D).

    ``standard`` = skip + attention output (the block's post-attention state); ``skip`` = the skip term only;
    ``patch`` / ``reg`` / ``cls`` = the attention output restricted to that token type (projection bias kept).
    """
    k = knockout(trace, level="out")
    skip = trace["skip"].astype(np.float64)
    return {"standard": skip + k["full"], "skip": skip, "patch": k["patch"], "reg": k["reg"], "cls": k["cls"]}


def layer_cosine(trace: dict) -> np.ndarray:
    """Cosine of the [CLS] after every block to the last block's [CLS], per image: (n, L)."""
    layers = trace["cls_layers"].astype(np.float64)
    return cosine(layers, layers[:, -1:, :])


def penultimate_cosine(trace: dict) -> float:
    """Mean over the images of the cosine between the [CLS] entering the last block and the final [CLS]
    (Sec. 4.1: near 1 when the global output is settled before the last block)."""
    return float(layer_cosine(trace)[:, -2].mean())


def depth_changes(cosines: np.ndarray) -> dict[str, np.ndarray]:
    """Sec. 4.1 (Fig. 5b), per image: how the [CLS]'s cosine to the final [CLS] (``cosines``, (n, L) as
    :func:`layer_cosine` returns) changes from block to block, from the first block's output on.

    ``"last"``: the last block's change (1 - the penultimate cosine); ``"largest"``: the largest change any single
    block makes (a jump; small when the [CLS] converges smoothly); ``"last share"``: the last block's share of the
    total change along the depth (the sizes of every block's change added up): above one half when the last
    block moves the [CLS] further than all the blocks before it together; ``"largest / mean"``: the largest change
    over the mean change per block, a view that leaves the depth out (``"largest"`` shrinks in a deeper model,
    which has more blocks to spread the same change over). Each (n,).
    """
    c = np.asarray(cosines, dtype=np.float64)
    step = np.abs(np.diff(c, axis=1))                          # (n, L - 1): blocks 2 .. L
    total = step.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, step[:, -1] / total, 0.0)  # a [CLS] that never moves made no jump
        peak = np.where(total > 0, step.max(axis=1) * step.shape[1] / total, 1.0)
    return {"last": step[:, -1], "largest": step.max(axis=1), "last share": share, "largest / mean": peak}


def integration_depth(trace: dict, threshold: float = 0.9) -> float:
    """The fraction of the depth at which the image-averaged [CLS] first comes within ``threshold`` cosine of
    the final [CLS] (appendix Fig. 9: early integration is a small fraction)."""
    c = layer_cosine(trace).mean(0)
    return float((np.argmax(c >= threshold) + 1) / len(c))


def skip_patch_ratio(trace: dict) -> np.ndarray:
    """Sec. 4.1, per image (n,): the norm of the last block's [CLS] skip term over the norm of the patch
    tokens' contribution to its attention output (the projection bias left out: it belongs to no token)."""
    return norms(trace["skip"]) / norms(knockout(trace, bias=False)["patch"])


def top_dims_mean(X: np.ndarray, k: int = 100, dims: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean over images of |x| in the k dimensions largest on average (or the given ``dims``).

    Returns ``(dims, means)``; pass the same ``dims`` to compare one token before and after a LayerNorm.
    """
    mean_abs = np.abs(np.asarray(X, dtype=np.float64)).mean(axis=0)
    if dims is None:
        dims = np.argsort(mean_abs)[::-1][:k]
    return dims, mean_abs[dims]


class HighestNorm(NamedTuple):
    """The highest-norm token entering the last block (:func:`highest_norm_token`)."""
    token: np.ndarray       # (n,) its index per image
    ratio: np.ndarray       # (n,) its norm over the second-highest norm
    mode: int               # the token that is highest most often
    mode_fraction: float    # the fraction of images where ``mode`` is the highest
    runner_up: np.ndarray   # (n,) the index of the second-highest token per image
    to_nonreg: np.ndarray   # (n,) the norm of ``mode`` over the largest norm among the non-register tokens other than
                            # itself ([CLS] and patches): "an order of magnitude" above them is >= 10
    num_registers: int      # registers are tokens 1..num_registers


def highest_norm_token(trace: dict, num_registers: int | None = None) -> HighestNorm:
    """Which token has the highest norm entering the last block, per image, and by how much: over the second
    token (whichever it is, a register too) and, for the token highest most often, over every non-register token.
    ``num_registers`` defaults to the trace's metadata (0 where a bare dict of norms has none)."""
    norms_ = trace["token_norms_penult"].astype(np.float64)
    if num_registers is None:
        num_registers = int(trace.get("meta", {}).get("num_registers", 0))
    rows = np.arange(len(norms_))
    token = norms_.argmax(axis=1)
    below = norms_.copy()
    below[rows, token] = -np.inf
    runner_up = below.argmax(axis=1)
    mode = int(np.bincount(token).argmax())
    others = np.ones(norms_.shape[1], dtype=bool)
    others[1:num_registers + 1] = False
    others[mode] = False
    return HighestNorm(token, norms_[rows, token] / norms_[rows, runner_up], mode, float((token == mode).mean()),
                       runner_up, norms_[:, mode] / norms_[:, others].max(axis=1), num_registers)


def high_norm_patches(trace: dict, factor: float) -> np.ndarray:
    """Per image (n,): how many patch tokens enter the last block with a norm above ``factor`` times the median
    norm of all its tokens (the high-norm outliers of Darcet et al.; :data:`regcls.testtime.OUTLIER_FACTOR`)."""
    norms_ = trace["token_norms_penult"].astype(np.float64)
    P = int(trace["meta"]["num_prefix_tokens"])
    return (norms_[:, P:] > factor * np.median(norms_, axis=1, keepdims=True)).sum(axis=1)


def oneshot_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One random training and one other random test image per class (classes with fewer than 2 skipped)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= 2:
            a, b = rng.choice(idx, 2, replace=False)  # pragma: no mutate (equivalent)
            train.append(a)
            test.append(b)
    return np.array(train), np.array(test)


def topk_accuracy(scores: np.ndarray, classes: np.ndarray, y: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the k highest scores."""
    k = min(k, scores.shape[1])
    top = classes[np.argsort(scores, axis=1)[:, ::-1][:, :k]]
    return float((top == y[:, None]).any(axis=1).mean())


def unit_norm(ko: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``ko`` (:func:`knockout`), the unaltered one included, scaled image by image to unit norm:
    each keeps its direction only. Nothing of one output enters another (scaling a part to the unaltered output's
    norm would copy that norm, one number per image, into it). A row of norm 0 stays 0."""
    out = {}
    for p, X in ko.items():
        n = norms(X)
        out[p] = X / np.where(n > 0, n, 1.0)[:, None]
    return out


def oneshot_knockout(trace: dict, seeds, k: int, classifier: str = "logreg", unit: bool = False,
                     **knockout_options) -> dict[str, np.ndarray]:
    """Sec. 3.3's one-shot test of a labelled trace, per sampling seed: trained on one unaltered output per class,
    tested on another image's unaltered, patch-only and register-only output (:func:`knockout` with
    ``knockout_options``; with ``unit`` every output, the training ones too, first scaled to unit norm,
    :func:`unit_norm`). Returns ``{"full", "patch", "reg"}``, each the top-``k`` accuracy per seed (seeds,)."""
    ko = knockout(trace, **knockout_options)
    if unit:
        ko = unit_norm(ko)
    return oneshot_over_seeds(ko["full"], trace["labels"],
                              lambda b, seed: {p: ko[p][b] for p in ("full", "patch", "reg")}, seeds, k, classifier)


def oneshot_over_seeds(train_X: np.ndarray, labels: np.ndarray, tests_for, seeds, k: int,
                       classifier: str = "logreg") -> dict[str, np.ndarray]:
    """The one-shot test once per sampling seed: trained on ``train_X`` (n, d) of one image per class, tested on
    ``tests_for(b, seed)``, a dict of arrays for the test images' indices ``b`` (:func:`oneshot_split`). Returns
    each test's top-``k`` accuracy per seed (seeds,), by name."""
    runs = []
    for seed in seeds:
        a, b = oneshot_split(labels, seed)
        runs.append(oneshot(train_X[a], labels[a], tests_for(b, seed), labels[b], classifier=classifier, k=k))
    return {name: np.array([r[name] for r in runs]) for name in runs[0]}


def oneshot(train_X: np.ndarray, train_y: np.ndarray, tests: dict[str, np.ndarray], test_y: np.ndarray,
            classifier: str = "logreg", k: int = 5) -> dict[str, float]:
    """Train on ``train_X`` (one image per class), test on every array of ``tests``; top-k accuracy.

    ``classifier``: ``"logreg"`` (multinomial logistic regression on standardised features, the default)
    or ``"ncm"`` (nearest class mean by cosine; with one image per class, nearest neighbour).
    """
    if classifier == "ncm":
        # cosine to each class's unit vector; a test row's own norm scales all its scores alike (same ranking)
        W = train_X / np.linalg.norm(train_X, axis=1, keepdims=True)
        return {name: topk_accuracy(X @ W.T, train_y, test_y, k) for name, X in tests.items()}
    if classifier != "logreg":
        raise ValueError("classifier is 'logreg' or 'ncm'")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_X)
    with warnings.catch_warnings():  # one image per class is the design, not a regression target
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")  # pragma: no mutate (equivalent)
        clf = LogisticRegression(C=1.0, max_iter=2000)  # pragma: no mutate (defaults spelled out)
        clf.fit(scaler.transform(train_X), train_y)

    def scores(X):  # (n, classes); two classes give one column of scores for the second class
        s = clf.decision_function(scaler.transform(X))
        return np.stack([-s, s], axis=1) if s.ndim == 1 else s

    return {name: topk_accuracy(scores(X), clf.classes_, test_y, k) for name, X in tests.items()}


def top_patch_share(trace: dict, frac: float = 0.01) -> np.ndarray:
    """Share of the last-block [CLS] attention over the patches (averaged over heads) that the top ``frac`` of
    the patches receive, per image (n,): near 1 when a few artifact patches draw the attention, ``frac`` for a
    flat map."""
    P = int(trace["meta"]["num_prefix_tokens"])
    a = np.asarray(trace["cls_attn"][:, :, P:], dtype=np.float64).mean(axis=1)
    k = max(1, int(np.ceil(frac * a.shape[1])))
    return np.sort(a, axis=1)[:, -k:].sum(axis=1) / a.sum(axis=1)


def attention_maps(trace: dict) -> np.ndarray:
    """Last-block [CLS] attention over the patch grid, averaged over heads: (n, rows, cols)."""
    P = int(trace["meta"]["num_prefix_tokens"])
    rows, cols = (int(v) for v in trace["meta"]["grid"])
    return trace["cls_attn"][:, :, P:].mean(axis=1).reshape(-1, rows, cols)
