"""Replacement controls on the knockout (beyond the paper): is a token type's effect information or an offset?

The paper's knockout (Sec. 3.3) sets one token type's part of the last block's [CLS] attention output to zero.
Zeroing moves the output where the model never put it, so a collapse could mean "this part carries the image" or
"this part adds a large, nearly constant offset". Each control replaces one part (``"reg"`` or ``"patch"``) of
the output, computed from the trace alone (the output is the sum of its parts, :func:`regcls.metrics.knockout`):

``zero``      the part set to zero (the paper's knockout of that part)
``mean``      the part replaced by its mean over the images (mean ablation)
``resample``  the part replaced by another image's (a random permutation of the images; several seeds)
``noise``     the part replaced by Gaussian noise with its per-dimension mean and variance over the images

A part that carries image information hurts under every replacement; a constant offset hurts only when zeroed,
and then only what is not shift-invariant (the one-shot classifier, not CKA, which centres its inputs).
"""
from __future__ import annotations

import numpy as np

from .metrics import Interval, cka_interval, knockout, oneshot_over_seeds

HOWS = ("zero", "mean", "resample", "noise")
STOCHASTIC = ("resample", "noise")


def replaced(parts: dict[str, np.ndarray], part: str, how: str, rng: np.random.Generator,
             reference: np.ndarray | None = None) -> np.ndarray:
    """The output (n, D) with ``part`` replaced ``how``; ``parts`` as :func:`regcls.metrics.knockout` returns
    them (their sum is ``full``). ``reference`` (m, D): the images whose mean, permutation or moments replace the
    part (default: the part itself; the one-shot test passes all the images of its set)."""
    if how not in HOWS:
        raise ValueError(f"how is one of {', '.join(HOWS)}")
    X = parts[part]
    ref = X if reference is None else reference
    if how == "zero":
        new = np.zeros_like(X)
    elif how == "mean":
        new = np.broadcast_to(ref.mean(axis=0), X.shape)
    elif how == "resample":
        new = ref[rng.permutation(len(ref))[:len(X)]] if len(ref) >= len(X) else ref[rng.integers(0, len(ref), len(X))]
    else:
        new = rng.normal(ref.mean(axis=0), ref.std(axis=0), size=X.shape)
    return parts["full"] - X + new


def replacement_cka(trace: dict, part: str = "reg", level: str = "val", seeds=(0, 1, 2),
                    n_boot: int = 1000) -> dict[str, Interval]:
    """Linear CKA over the images of the output with ``part`` replaced against the unaltered output, for every
    replacement, with its bootstrap interval. The stochastic replacements are averaged over ``seeds`` (the value
    and both ends of the interval). The parts are centred over the images first (CKA centres anyway): an offset
    many times the variation would otherwise cost the variation its digits. ``{how: Interval}``."""
    parts = {p: v - v.mean(axis=0) for p, v in knockout(trace, level=level, bias=False).items()}
    out = {}
    for how in HOWS:
        runs = [cka_interval(parts["full"], replaced(parts, part, how, np.random.default_rng(s)), n_boot=n_boot)
                for s in (seeds if how in STOCHASTIC else seeds[:1])]
        out[how] = Interval(*(float(np.mean(v)) for v in zip(*runs)))
    return out


def replacement_oneshot(trace: dict, part: str = "reg", sampling_seeds=(0, 1, 2, 3, 4), k: int = 1,
                        level: str = "val", classifier: str = "logreg") -> dict[str, np.ndarray]:
    """Sec. 3.3's one-shot test with the replacements: trained on one unaltered output per class, tested on
    another image's output with ``part`` replaced (the mean, permutation and moments over all the labelled
    images). ``{"unaltered", *HOWS}``, each the top-``k`` accuracy per sampling seed (seeds,)."""
    parts = knockout(trace, level=level, bias=False)

    def tests_for(b, seed):
        rng, test = np.random.default_rng(seed), {p: v[b] for p, v in parts.items()}
        return {"unaltered": test["full"],
                **{how: replaced(test, part, how, rng, reference=parts[part]) for how in HOWS}}

    return oneshot_over_seeds(parts["full"], trace["labels"], tests_for, sampling_seeds, k, classifier)


def variance_shares(trace: dict, level: str = "val") -> dict[str, float]:
    """How much of the across-image variance of the output each part explains: with C = centred over the
    images, the share of part p is <C(p), C(full)> / ||C(full)||^2 (Frobenius; the shares add to one), and
    ``"p·p"`` is ||C(p)||^2 / ||C(full)||^2; ``"cross"`` is what the parts' covariances with each other add
    (1 - the sum of the ``p·p`` terms, negative where parts cancel). Keys: cls, reg, patch, cls·cls, reg·reg,
    patch·patch, cross."""
    parts = knockout(trace, level=level, bias=False)
    c = {p: v - v.mean(axis=0) for p, v in parts.items()}
    total = float((c["full"] ** 2).sum())
    out = {p: float((c[p] * c["full"]).sum()) / total for p in ("cls", "reg", "patch")}
    out.update({f"{p}·{p}": float((c[p] ** 2).sum()) / total for p in ("cls", "reg", "patch")})
    out["cross"] = 1.0 - sum(out[f"{p}·{p}"] for p in ("cls", "reg", "patch"))
    return out


def fixed_oneshot(plain: dict, fixed: dict, sampling_seeds=(0, 1, 2, 3, 4), k: int = 1,
                  classifier: str = "logreg") -> dict[str, np.ndarray]:
    """The one-shot test of Fix-Reg-Mean on the final [CLS] embedding: trained on one unaltered embedding per
    class (``plain``), tested on another image's, unaltered and from the model with fixed registers (``fixed``:
    the same images in the same order). ``{"unaltered", "fixed"}``, each the top-``k`` accuracy per seed."""
    if list(plain["image_ids"]) != list(fixed["image_ids"]):
        raise ValueError("the unaltered and the fixed trace hold other images")
    return oneshot_over_seeds(plain["cls_final"], plain["labels"],
                              lambda b, seed: {"unaltered": plain["cls_final"][b], "fixed": fixed["cls_final"][b]},
                              sampling_seeds, k, classifier)
