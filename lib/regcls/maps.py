"""Which map of the last-layer [CLS] over the patches explains its output? (beyond the paper; Sec. 3.4 ends with
"attention maps do not explain the global output")

Three maps per image over the patches, from the trace: the attention ``a_i`` (head-averaged; the map of Sec. 3.4),
the norm of each patch's contribution to the output ``||LayerScale(W_o a_i v_i)||`` (Kobayashi et al. 2020), and
that contribution's signed projection on the unaltered output. A map explains the output as far as the patches it
ranks first rebuild it: the trace sums the contributions of the top k % of the patches of each map.
"""
from __future__ import annotations

import numpy as np

from .metrics import cka, cosine

NAMES = {"attn": "attention", "norm": "contribution norm", "proj": "projection on the output"}


def patch_maps(trace: dict) -> dict[str, np.ndarray]:
    """The three maps, each (n, patches) in raster order: ``attn``, ``norm`` (after the LayerScale), ``proj``."""
    P = int(trace["meta"]["num_prefix_tokens"])
    return {"attn": np.asarray(trace["cls_attn"][:, :, P:], dtype=np.float64).mean(axis=1),
            "norm": np.asarray(trace["contrib_norm_ls"], dtype=np.float64),
            "proj": np.asarray(trace["contrib_proj"], dtype=np.float64)}


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
    the full output (after the projection and LayerScale): median cosine over the images and linear CKA across
    them. One row per map and ``k``."""
    patch, full = trace["attn_out_patch"].astype(np.float64), trace["attn_out_full"].astype(np.float64)
    rows = []
    for name in maps:
        for k in percents:
            r = trace[f"rebuilt_{name}_{k}"].astype(np.float64)
            rows.append({"map": name, "top %": k, "cos patch part": float(np.median(cosine(r, patch))),
                         "cos full output": float(np.median(cosine(r, full))),
                         "CKA patch part": cka(r, patch), "CKA full output": cka(r, full)})
    return rows
