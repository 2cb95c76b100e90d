"""Meta-objectives: scores of a feature map by how well a simple readout on it classifies.

- :mod:`l2o.metaobjectives.ridge` — closed-form ridge regression on the features, fit on one
  class-balanced batch and scored on another. Differentiable end to end: the meta-loss of the
  unsupervised update rule.
- :mod:`l2o.metaobjectives.logistic` — scikit-learn logistic regression on numpy features. Not
  differentiable; eval workers use it to score checkpoints (accuracy and log-loss).
"""

from l2o.metaobjectives.logistic import LogisticScores, logistic_regression_scores
from l2o.metaobjectives.ridge import (
    RidgeStats,
    normalized_targets,
    ridge_meta_objective,
    ridge_predict,
    solve_ridge,
)

__all__ = [
    "LogisticScores",
    "RidgeStats",
    "logistic_regression_scores",
    "normalized_targets",
    "ridge_meta_objective",
    "ridge_predict",
    "solve_ridge",
]
