"""Logistic regression on features with scikit-learn: the eval workers' (non-differentiable) score.

The features are numpy arrays computed beforehand; the readout is fit on one labelled set and
scored on a held-out one by accuracy and log-loss (cross-entropy of the predicted probabilities).
Features are standardized with the fit set's mean and standard deviation first (``standardize``),
so random, rule-trained and supervised features are compared on the same footing; the seed
(Metz et al., 2018) fit scikit-learn's default ``LogisticRegression(C=1)`` on raw features.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogisticScores:
    """Accuracy and log-loss of the readout on the held-out set, and its fit-set accuracy."""

    accuracy: float
    log_loss: float
    train_accuracy: float


def logistic_regression_scores(train_features, train_labels, test_features, test_labels,
                               num_classes: int | None = None, C: float = 1.0,
                               max_iter: int = 1000, standardize: bool = True) -> LogisticScores:
    """Fit ``LogisticRegression(C)`` on ``(train_features, train_labels)`` and score it on the
    test set. Arrays may be numpy or JAX; labels are integer class ids in ``0..num_classes-1``.

    Raises ``ValueError`` when the fit set does not contain every class (the log-loss would be
    undefined for the missing ones) or the shapes do not line up.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    xtr = np.asarray(train_features, dtype=np.float64)
    xte = np.asarray(test_features, dtype=np.float64)
    ytr = np.asarray(train_labels).astype(np.int64).reshape(-1)
    yte = np.asarray(test_labels).astype(np.int64).reshape(-1)
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{name} features must be [n, d] with n labels, got features "
                             f"{x.shape} and {y.shape[0]} labels")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train and test features differ in width: {xtr.shape[1]} vs "
                         f"{xte.shape[1]}")
    classes = int(num_classes) if num_classes is not None else int(max(ytr.max(), yte.max())) + 1
    missing = sorted(set(range(classes)) - set(ytr.tolist()))
    if missing:
        raise ValueError(f"the fit set lacks classes {missing}; sample it class-balanced")
    if not (np.all(np.isfinite(xtr)) and np.all(np.isfinite(xte))):
        nan = float("nan")
        return LogisticScores(accuracy=nan, log_loss=nan, train_accuracy=nan)
    if standardize:
        mean, std = xtr.mean(0), xtr.std(0) + 1e-6
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    model = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on degenerate (random) features
        model.fit(xtr, ytr)
    proba = model.predict_proba(xte)
    return LogisticScores(
        accuracy=float(np.mean(model.predict(xte) == yte)),
        log_loss=float(log_loss(yte, proba, labels=list(range(classes)))),
        train_accuracy=float(np.mean(model.predict(xtr) == ytr)),
    )
