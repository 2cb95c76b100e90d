"""Learned and hand-designed optimizers behind one interface."""

from l2o.optimizers.base import LearnedOptimizer, Optimizer, OptState
from l2o.optimizers.baselines import BASELINES, OptaxLearnedOptimizer, adam, rmsprop, sgd
from l2o.optimizers.learned_adam import AdamState, LearnedAdam, LearnedAdamOptimizer
from l2o.optimizers.lstm import (
    LSTMLearnedOptimizer,
    LSTMNetState,
    LSTMOptimizer,
    LSTMOptState,
    log_and_sign,
)
from l2o.optimizers.optax_bridge import BridgeState, as_gradient_transformation
from l2o.optimizers.registry import OPTIMIZERS, make_learned_optimizer

__all__ = [
    "BASELINES",
    "OPTIMIZERS",
    "AdamState",
    "BridgeState",
    "LSTMLearnedOptimizer",
    "LSTMNetState",
    "LSTMOptState",
    "LSTMOptimizer",
    "LearnedAdam",
    "LearnedAdamOptimizer",
    "LearnedOptimizer",
    "OptState",
    "OptaxLearnedOptimizer",
    "Optimizer",
    "adam",
    "as_gradient_transformation",
    "log_and_sign",
    "make_learned_optimizer",
    "rmsprop",
    "sgd",
]
