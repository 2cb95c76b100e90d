"""Learned and hand-designed optimizers by name, as used by configs and the CLI.

``make_learned_optimizer("lstm", layers=[20, 20])`` builds L2L's LSTM optimizer;
``"learned_adam"`` is Adam with learned hyperparameters; ``"mlp"``, ``"factored_mlp"`` and
``"rnn_mlp"`` are the per-parameter MLP optimizers; ``"adam"``, ``"sgd"`` and ``"rmsprop"``
are the fixed optax baselines (θ = ``{}``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from l2o.optimizers.base import LearnedOptimizer
from l2o.optimizers.baselines import BASELINES
from l2o.optimizers.coordinatewise_rnn import CoordinatewiseRNN
from l2o.optimizers.factored_mlp import FactoredMLPLOpt
from l2o.optimizers.hierarchical_rnn import HierarchicalRNN
from l2o.optimizers.lambda_blend import FixedLambdaLOpt, LearnedLambdaLOpt
from l2o.optimizers.learned_adam import LearnedAdam
from l2o.optimizers.lstm import LSTMLearnedOptimizer
from l2o.optimizers.mixed import mixed
from l2o.optimizers.mlp_lopt import MLPLOpt
from l2o.optimizers.normalized_mlp import NormalizedMLP
from l2o.optimizers.rnn_mlp import RNNMLPLOpt
from l2o.optimizers.simple_trainable import LearnedLRSGD, LearnedMomentum
from l2o.unsupervised.update_rule import UnsupervisedUpdateRule

#: Constructors of every known optimizer; keyword arguments are their settings.
OPTIMIZERS: dict[str, Callable[..., LearnedOptimizer]] = {
    "lstm": LSTMLearnedOptimizer,
    "learned_adam": LearnedAdam,
    **BASELINES,
    "mlp": MLPLOpt,
    "factored_mlp": FactoredMLPLOpt,
    "rnn_mlp": RNNMLPLOpt,
    "normalized_mlp": NormalizedMLP,  # the general-purpose recipe (preset general)
    # L2L extras: a learned optimizer on some leaves and a fixed one on the rest; the λ blends
    "mixed": mixed,
    "fixed_lambda": FixedLambdaLOpt,
    "learned_lambda": LearnedLambdaLOpt,
    "hierarchical_rnn": HierarchicalRNN,
    "coordinatewise_rnn": CoordinatewiseRNN,
    "learned_lr_sgd": LearnedLRSGD,
    "learned_momentum": LearnedMomentum,
    "unsupervised_rule": UnsupervisedUpdateRule,  # updates base models, not by gradients
}


def make_learned_optimizer(name: str, **kwargs: Any) -> LearnedOptimizer:
    """The optimizer registered as ``name``, built with ``kwargs``.

    Raises ``ValueError`` for an unknown name (listing the known ones) and ``TypeError`` naming the
    optimizer for keyword arguments it does not accept.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    ctor = OPTIMIZERS[name]
    try:
        inspect.signature(ctor).bind(**kwargs)
    except TypeError as e:
        raise TypeError(f"bad arguments for optimizer {name!r}: {e}") from None
    return ctor(**kwargs)
