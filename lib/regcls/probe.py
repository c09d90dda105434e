"""Linear probes: logistic regression with a held-out split and the regularisation chosen by cross-validation."""
from __future__ import annotations

import numpy as np


def linear_probe(X: np.ndarray, y: np.ndarray, seed: int = 0, test_size: float = 0.3,
                 Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)) -> dict:
    """Held-out accuracy of a linear classifier reading ``y`` from ``X`` (n, d).

    Features are standardised on the training split; C is chosen by stratified 3-fold cross-validation on
    the training split only. Returns ``{"accuracy", "chance", "C", "n_train", "n_test"}``; chance is the
    accuracy of always predicting the most frequent training class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    folds = max(2, int(min(3, np.bincount(ytr).min())))
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    search = GridSearchCV(pipe, {"logisticregression__C": list(Cs)},
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed)).fit(Xtr, ytr)
    values, counts = np.unique(ytr, return_counts=True)
    chance = float((yte == values[counts.argmax()]).mean())
    return {"accuracy": float(search.score(Xte, yte)), "chance": chance,
            "C": float(search.best_params_["logisticregression__C"]), "n_train": len(ytr), "n_test": len(yte)}
