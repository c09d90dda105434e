"""Which map of the last-layer [CLS] over the patches explains its output? (beyond the paper; Sec. 3.4 ends with
"attention maps do not explain the global output")

Three maps per image over the patches, from the trace: the attention ``a_i`` (head-averaged; the map of Sec. 3.4),
the norm of each patch's contribution to the output ``||LayerScale(W_o a_i v_i)||`` (Kobayashi et al. 2020), and
that contribution's signed projection on the unaltered output. A map explains the output as far as the patches it
ranks first rebuild it: the trace sums the contributions of the top k % of the patches of each map.

The output is compared without the projection bias (as Sec. 3.4's ``metrics.knockout(..., bias=False)``): the bias
is the same for every image and belongs to no token. The trace's projection map (``contrib_proj``) is taken on the
output *with* the bias; the projection on the output without it is fixed by the trace only up to a bound
(:func:`projection_without_bias`), which :func:`bias_leverage` states per image.
"""
from __future__ import annotations

import numpy as np

from .metrics import Interval, cka, cka_difference_interval, cosine

NAMES = {"attn": "attention", "norm": "contribution norm", "proj": "projection on the output"}


def patch_maps(trace: dict) -> dict[str, np.ndarray]:
    """The three maps, each (n, patches) in raster order: ``attn``, ``norm`` (after the LayerScale), ``proj`` (the
    trace's, on the output with the projection bias: see :func:`projection_without_bias`)."""
    P = int(trace["meta"]["num_prefix_tokens"])
    return {"attn": np.asarray(trace["cls_attn"][:, :, P:], dtype=np.float64).mean(axis=1),
            "norm": np.asarray(trace["contrib_norm_ls"], dtype=np.float64),
            "proj": np.asarray(trace["contrib_proj"], dtype=np.float64)}


def output_without_bias(trace: dict) -> np.ndarray:
    """The last-layer [CLS] attention output without the projection bias, ``u = y - b`` (n, D): the sum of the
    [CLS], register and patch parts (``metrics.knockout(trace, bias=False)["full"]``)."""
    return np.asarray(trace["attn_out_full"], dtype=np.float64) - np.asarray(trace["attn_out_bias"], dtype=np.float64)


def projection_without_bias(trace: dict) -> tuple[np.ndarray, np.ndarray]:
    """Each patch contribution's projection on the unit vector of the output without the bias, as far as the trace
    fixes it: ``(known, bound)``, each (n, Np), with the projection in ``[known - bound, known + bound]``.

    With ``y`` the output (``attn_out_full``), ``b`` the bias (``attn_out_bias``), ``u = y - b`` and ``p_i`` the
    stored projection of the contribution ``z_i`` on ``y / |y|`` (``contrib_proj``):
    ``z_i . u / |u| = (|y| p_i - z_i . b) / |u|``. The trace keeps ``p_i`` and ``|z_i|`` (``contrib_norm_ls``) but
    not ``z_i`` itself, and two sets of contributions with the same stored arrays can differ in ``z_i . b``
    (tests/test_maps.py builds them), so the last term is known only within ``|z_i| |b|`` (Cauchy-Schwarz):
    ``known = |y| p_i / |u|`` (a positive rescaling of ``p_i`` per image: the same ranks, the same map),
    ``bound = |z_i| |b| / |u|``. Exact (``bound`` 0) where the bias is 0. (The sum over the patches is known
    exactly, ``attn_out_patch . u / |u|``; each patch's share of it is not.)"""
    y = np.asarray(trace["attn_out_full"], dtype=np.float64)
    u = output_without_bias(trace)
    ny, nu = np.linalg.norm(y, axis=-1, keepdims=True), np.linalg.norm(u, axis=-1, keepdims=True)
    p = np.asarray(trace["contrib_proj"], dtype=np.float64)
    z = np.asarray(trace["contrib_norm_ls"], dtype=np.float64)
    nb = float(np.linalg.norm(np.asarray(trace["attn_out_bias"], dtype=np.float64)))
    return ny * p / nu, z * nb / nu


def bias_leverage(trace: dict) -> np.ndarray:
    """``|b| / |u|`` per image (n,): the most the projection bias can move any patch's cosine with the output
    (``known / |z_i|`` of :func:`projection_without_bias` is within this of the cosine of ``z_i`` with ``u``).
    Small: the trace's projection map is the map on the output without the bias, up to a rescaling per image."""
    nb = float(np.linalg.norm(np.asarray(trace["attn_out_bias"], dtype=np.float64)))
    return nb / np.linalg.norm(output_without_bias(trace), axis=-1)


def _ranks(x: np.ndarray) -> np.ndarray:
    return x.argsort(axis=1).argsort(axis=1).astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row (n,): Spearman's rank correlation of ``a`` and ``b`` (n, m) (ties broken by position)."""
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    return (ra * rb).sum(axis=1) / np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))


def rank_agreement(trace: dict) -> dict[str, float]:
    """Mean over the images of the Spearman correlation between each pair of maps."""
    m = patch_maps(trace)
    return {f"{a} ~ {b}": float(spearman(m[a], m[b]).mean())
            for a, b in (("attn", "norm"), ("attn", "proj"), ("norm", "proj"))}


def rebuilt_closeness(trace: dict, maps=("attn", "norm", "proj"), percents=(1, 5, 10, 25, 50)) -> list[dict]:
    """How close the patch part rebuilt from the top ``k`` % of the patches of each map is to the patch part and to
    the output without the projection bias (:func:`output_without_bias`; both after the projection and LayerScale):
    median cosine over the images and linear CKA across them. One row per map and ``k``. (CKA centres its inputs,
    so the bias, the same for every image, never changed it; the cosine it does.)"""
    patch, out = np.asarray(trace["attn_out_patch"], dtype=np.float64), output_without_bias(trace)
    rows = []
    for name in maps:
        for k in percents:
            r = np.asarray(trace[f"rebuilt_{name}_{k}"], dtype=np.float64)
            rows.append({"map": name, "top %": k, "cos patch part": float(np.median(cosine(r, patch))),
                         "cos output": float(np.median(cosine(r, out))),
                         "CKA patch part": cka(r, patch), "CKA output": cka(r, out)})
    return rows


def rebuilt_contrast(trace: dict, k: int, better: str = "norm", than: str = "attn", n_boot: int = 300) -> Interval:
    """``CKA(rebuilt by better, patch part) - CKA(rebuilt by than, patch part)`` for the top ``k`` % of the patches,
    with a paired bootstrap interval (both maps' rebuilt parts on the same resampled images): does one map's top
    patches represent the patch part of the [CLS] output better than the other's? The patch part, not the full
    output: in a register reader the full output hardly depends on the patches (Sec. 3.4), so a comparison with it
    is decided by noise."""
    patch = np.asarray(trace["attn_out_patch"], dtype=np.float64)
    return cka_difference_interval(patch, np.asarray(trace[f"rebuilt_{better}_{k}"], dtype=np.float64),
                                   patch, np.asarray(trace[f"rebuilt_{than}_{k}"], dtype=np.float64), n_boot=n_boot)
