"""Learned and hand-designed optimizers by name, as used by configs and the CLI.

Each optimizer module registers its constructor with ``@register_optimizer("name")``; the config
``optimizer: {name: X, kwargs: {...}}`` is derived from the constructor's signature, so a keyword
the constructor does not take is refused as ``optimizer.kwargs.<key>``.
``make_learned_optimizer("lstm", layers=[20, 20])`` builds L2L's LSTM optimizer; ``"adam"``,
``"sgd"`` and ``"rmsprop"`` are the fixed optax baselines (θ = ``{}``).
"""

from __future__ import annotations

from typing import Any

from l2o.optimizers.base import LearnedOptimizer
from l2o.registry import ConstructorRegistry

#: Constructors of every registered optimizer; keyword arguments are their settings.
OPTIMIZERS: ConstructorRegistry[LearnedOptimizer] = ConstructorRegistry("optimizer",
                                                                         ("l2o.optimizers",))

#: Decorator: ``@register_optimizer("name")`` on a :class:`LearnedOptimizer` constructor.
register_optimizer = OPTIMIZERS.constructor


def make_learned_optimizer(name: str, **kwargs: Any) -> LearnedOptimizer:
    """The optimizer registered as ``name``, built with ``kwargs``.

    Raises ``ValueError`` for an unknown name (listing the known ones) and ``TypeError`` naming the
    optimizer for keyword arguments it does not accept.
    """
    return OPTIMIZERS.make(name, **kwargs)
