"""Linear probes: logistic regression with a held-out split and the regularisation chosen by cross-validation.

The classifier is scikit-learn's multinomial L2 logistic regression, minimised with full-batch L-BFGS in
torch so that it runs on the GPU when there is one (at ImageNet's 1,000 classes a probe is hundreds of
scikit-learn fits' worth of CPU time): ``C * sum_i CE_i + ||W||^2 / 2``, intercept not penalised.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .errors import RegclsError


def fit_logistic(X: torch.Tensor, y: torch.Tensor, classes: int, C: float, max_iter: int = 1000,
                 tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (d, k) and intercept (k,) minimising scikit-learn's objective on X (n, d), y (n,) in 0..k-1.

    Stops, like scikit-learn's L-BFGS, when no gradient entry of the objective divided by C n exceeds ``tol``
    (scikit-learn's default 1e-4).
    """
    n, d = X.shape
    W = torch.zeros(d, classes, dtype=X.dtype, device=X.device, requires_grad=True)  # pragma: no mutate (GPU, optimiser settings)
    b = torch.zeros(classes, dtype=X.dtype, device=X.device, requires_grad=True)  # pragma: no mutate (GPU, optimiser settings)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,  # pragma: no mutate (GPU, optimiser settings)
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")
    lam = 1.0 / (C * n)  # the objective divided by C n: mean cross-entropy + lam / 2 ||W||^2

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + b, y) + 0.5 * lam * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale by the training rows' mean and (population) standard deviation, as StandardScaler does."""
    mean, std = train.mean(0), train.std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(t - mean) / std for t in (train, *others)]


def _accuracy(Xtr, ytr, Xte, yte, classes: int, C: float) -> float:
    Xtr, Xte = _standardise(Xtr, Xte)
    W, b = fit_logistic(Xtr, ytr, classes, C)
    return float(((Xte @ W + b).argmax(1) == yte).double().mean())


class ProbeResult(NamedTuple):
    """A linear probe's held-out result (:func:`linear_probe`)."""
    accuracy: float   # on the held-out split
    chance: float     # always predicting the most frequent training class
    C: float          # the regularisation cross-validation chose
    n_train: int
    n_test: int


def linear_probe(X: np.ndarray, y: np.ndarray, seed: int = 0, test_size: float = 0.3,
                 Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), device: str | None = None) -> ProbeResult:
    """Held-out accuracy of a linear classifier reading ``y`` from ``X`` (n, d).

    Features are standardised on the training split; C is chosen by stratified 3-fold cross-validation on
    the training split only (the first C of the best mean accuracy; C = 1 when a class has a single training
    image), in float32 on ``device`` (default:
    CUDA when there is a GPU, else the CPU).
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # pragma: no mutate (GPU, optimiser settings)
    classes_, y_idx = np.unique(y, return_inverse=True)
    k = len(classes_)
    if np.bincount(y_idx).min() < 2:
        raise RegclsError(f"a linear probe needs at least two images of every class; the smallest class has "
                          f"{np.bincount(y_idx).min()}")
    n_test = min(max(int(np.ceil(test_size * len(y))), k), len(y) - k)  # every class in both splits
    tr, te = train_test_split(np.arange(len(y)), test_size=n_test, random_state=seed, stratify=y_idx)
    Xt = torch.as_tensor(np.asarray(X), dtype=torch.float32, device=device)  # pragma: no mutate (GPU, optimiser settings)
    yt = torch.as_tensor(y_idx, device=device)  # pragma: no mutate (GPU, optimiser settings)
    folds = int(min(3, np.bincount(y_idx[tr]).min()))
    if folds >= 2:
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(tr, y_idx[tr]))
        scores = [np.mean([_accuracy(Xt[tr[a]], yt[tr[a]], Xt[tr[v]], yt[tr[v]], k, C) for a, v in splits])
                  for C in Cs]
        best = Cs[int(np.argmax(scores))]
    else:  # one training image of some class: no cross-validation, the middle of the grid
        best = 1.0
    values, counts = np.unique(y_idx[tr], return_counts=True)
    chance = float((y_idx[te] == values[counts.argmax()]).mean())
    return ProbeResult(_accuracy(Xt[tr], yt[tr], Xt[te], yt[te], k, best), chance, float(best), len(tr), len(te))
