"""Closed-form ridge regression on features: the differentiable meta-objective.

A linear readout (weights and a bias) is fit in closed form to class targets on one batch of
features, then scored on a second batch. Because the fit is a linear solve, the score is a smooth
function of the features, and so of whatever produced them: the unsupervised update rule is
meta-trained by backpropagating through it.

Conventions (after Metz et al., 2018, "Meta-learning update rules for unsupervised representation
learning"):

- the bias is not penalized: the system solved is ``(AᵀA + λ·diag(1, …, 1, 0)) W = Aᵀ Y`` with
  ``A = [features, 1]``;
- targets are one-hot (or ±1) labels with their overall mean removed, scaled so that a row has
  unit root-mean-square norm (:func:`normalized_targets`);
- on the scoring batch the predictions are scaled to unit norm per example before the squared
  error, so only their direction counts (``normalize_predictions``);
- the loss is that squared error (or a hinge on it, which is zero inside a unit ball around the
  target) summed over classes and averaged over examples, plus the ridge penalty
  ``λ‖W‖² / n_fit`` of the fitted weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

_EPS = 1e-12


@struct.dataclass
class RidgeStats:
    """Figures of one ridge fit: errors and accuracies on the fit and scoring batches."""

    mse_test: jax.Array
    mse_train: jax.Array
    accuracy_test: jax.Array
    accuracy_train: jax.Array
    penalty: jax.Array


def _check_2d(name: str, x: jax.Array) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be a [examples, dims] matrix, got shape {x.shape}")


def solve_ridge(features: jax.Array, targets: jax.Array, ridge_factor: float = 0.1) -> jax.Array:
    """Ridge weights ``[d + 1, k]`` (last row: the unpenalized bias) fitting ``targets [n, k]``
    from ``features [n, d]``, by a linear solve of the ``(d + 1) × (d + 1)`` normal equations."""
    _check_2d("features", features)
    _check_2d("targets", targets)
    if features.shape[0] != targets.shape[0]:
        raise ValueError(f"features have {features.shape[0]} rows but targets "
                         f"{targets.shape[0]}")
    n, d = features.shape
    a = jnp.concatenate([features, jnp.ones((n, 1), features.dtype)], axis=1)
    penalty = jnp.concatenate([jnp.full((d,), ridge_factor, features.dtype),
                               jnp.zeros((1,), features.dtype)])
    gram = a.T @ a + jnp.diag(penalty)
    return jnp.linalg.solve(gram, a.T @ targets)


def ridge_predict(weights: jax.Array, features: jax.Array) -> jax.Array:
    """Predictions ``features @ W + b`` of ridge ``weights`` from :func:`solve_ridge`."""
    return features @ weights[:-1] + weights[-1]


def normalized_targets(labels: jax.Array, num_classes: int,
                       zero_one_labels: bool = True) -> jax.Array:
    """Regression targets ``[n, num_classes]`` for integer ``labels``: one-hot (or ±1) codes,
    minus their overall mean, divided by the root-mean-square row norm."""
    y = jax.nn.one_hot(labels, num_classes)
    if not zero_one_labels:
        y = 2.0 * y - 1.0
    y = y - jnp.mean(y)
    return y / jnp.sqrt(jnp.mean(jnp.sum(y**2, axis=1)) + _EPS)


def ridge_meta_objective(train_features: jax.Array, train_labels: jax.Array,
                         test_features: jax.Array, test_labels: jax.Array, num_classes: int,
                         ridge_factor: float = 0.1, hinge_loss: bool = False,
                         normalize_predictions: bool = True,
                         zero_one_labels: bool = True) -> tuple[jax.Array, RidgeStats]:
    """``(loss, stats)``: fit ridge on ``train_*``, score on ``test_*`` (see the module doc).

    Differentiable with respect to both feature matrices; labels are integer class ids.
    """
    _check_2d("train_features", train_features)
    _check_2d("test_features", test_features)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_features.shape[1]} "
                         f"vs {test_features.shape[1]}")
    y_train = normalized_targets(train_labels, num_classes, zero_one_labels)
    y_test = normalized_targets(test_labels, num_classes, zero_one_labels)
    w = solve_ridge(train_features, y_train, ridge_factor)
    pred_train = ridge_predict(w, train_features)
    pred_test = ridge_predict(w, test_features)
    if normalize_predictions:
        pred_test = pred_test / jnp.sqrt(jnp.sum(pred_test**2, axis=1, keepdims=True) + _EPS)
    sq_test = jnp.sum((pred_test - y_test) ** 2, axis=1)
    if hinge_loss:
        mse_test = jnp.mean(jax.nn.relu(sq_test - 1.0))
    else:
        mse_test = jnp.mean(sq_test)
    mse_train = jnp.mean(jnp.sum((pred_train - y_train) ** 2, axis=1))
    penalty = ridge_factor * jnp.sum(w[:-1] ** 2) / train_features.shape[0]
    stats = RidgeStats(
        mse_test=mse_test,
        mse_train=mse_train,
        accuracy_test=jnp.mean(jnp.argmax(pred_test, axis=1) == test_labels),
        accuracy_train=jnp.mean(jnp.argmax(pred_train, axis=1) == train_labels),
        penalty=penalty,
    )
    return mse_test + penalty, stats
