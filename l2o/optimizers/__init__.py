"""Learned and hand-designed optimizers behind one interface."""

from l2o.optimizers.base import LearnedOptimizer, Optimizer, OptState
from l2o.optimizers.baselines import OptaxLearnedOptimizer, adam, rmsprop, sgd
from l2o.optimizers.coordinatewise_rnn import CoordinatewiseRNN
from l2o.optimizers.factored_mlp import FactoredMLPLOpt, FactoredMLPOptimizer, FactoredMLPState
from l2o.optimizers.hierarchical_rnn import HierarchicalRNN, HRNNOptimizer, HRNNState
from l2o.optimizers.learned_adam import AdamState, LearnedAdam, LearnedAdamOptimizer
from l2o.optimizers.lstm import (
    LSTMLearnedOptimizer,
    LSTMNetState,
    LSTMOptimizer,
    LSTMOptState,
    log_and_sign,
)
from l2o.optimizers.mlp_lopt import MLPLOpt, MLPLOptOptimizer, MLPLOptState, SlabLayout
from l2o.optimizers.optax_bridge import BridgeState, as_gradient_transformation
from l2o.optimizers.registry import OPTIMIZERS, make_learned_optimizer
from l2o.optimizers.rnn_mlp import RNNMLPLOpt, RNNMLPOptimizer, RNNMLPState
from l2o.optimizers.simple_trainable import LearnedLRSGD, LearnedMomentum

__all__ = [
    "OPTIMIZERS",
    "AdamState",
    "BridgeState",
    "CoordinatewiseRNN",
    "FactoredMLPLOpt",
    "FactoredMLPOptimizer",
    "FactoredMLPState",
    "HRNNOptimizer",
    "HRNNState",
    "HierarchicalRNN",
    "LSTMLearnedOptimizer",
    "LSTMNetState",
    "LSTMOptState",
    "LSTMOptimizer",
    "LearnedAdam",
    "LearnedAdamOptimizer",
    "LearnedLRSGD",
    "LearnedMomentum",
    "LearnedOptimizer",
    "MLPLOpt",
    "MLPLOptOptimizer",
    "MLPLOptState",
    "OptState",
    "OptaxLearnedOptimizer",
    "Optimizer",
    "RNNMLPLOpt",
    "RNNMLPOptimizer",
    "RNNMLPState",
    "SlabLayout",
    "adam",
    "as_gradient_transformation",
    "log_and_sign",
    "make_learned_optimizer",
    "rmsprop",
    "sgd",
]
