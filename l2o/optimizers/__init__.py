"""Learned and hand-designed optimizers behind one interface."""

from l2o.optimizers.base import LearnedOptimizer, Optimizer, OptState
from l2o.optimizers.baselines import BASELINES, OptaxLearnedOptimizer, adam, rmsprop, sgd

__all__ = [
    "BASELINES",
    "LearnedOptimizer",
    "OptState",
    "OptaxLearnedOptimizer",
    "Optimizer",
    "adam",
    "rmsprop",
    "sgd",
]
