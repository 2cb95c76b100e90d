"""The interface of a learned update rule, and the registry of them.

A :class:`LearnedUpdateRule` is not an optimizer: it trains a base model from the model's own
activations on unlabelled batches, without gradients. Like a learned optimizer it owns
meta-parameters θ (``init(key)``), which is all the learner, the workers and the checkpoints
handle; the unsupervised estimator and evaluation (:mod:`l2o.unsupervised.estimator`,
:mod:`l2o.unsupervised.evaluation`) call :meth:`LearnedUpdateRule.apply`. A config selects one with
``optimizer: {name: X, kwargs: {...}}`` like an optimizer (see ``l2o.io.config``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from l2o.registry import ConstructorRegistry
from l2o.types import MetaParams, PRNGKey


@dataclasses.dataclass(frozen=True)
class LearnedUpdateRule:
    """A family of unsupervised update rules of a base model, indexed by θ.

    Subclasses are frozen dataclasses (hashable static configuration for ``jit``).
    """

    def init(self, key: PRNGKey) -> MetaParams:
        """Initial θ drawn from ``key``."""
        raise NotImplementedError

    def apply(self, theta: MetaParams, model: Any, params: Any, x: jax.Array,
              key: PRNGKey | None = None) -> Any:
        """The base model's parameters after one application of the rule on the batch ``x``
        (``model`` describes the base model, ``params`` are its current parameters)."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """A short human-readable name."""
        return type(self).__name__


#: Constructors of every registered update rule; keyword arguments are their settings.
UPDATE_RULES: ConstructorRegistry[LearnedUpdateRule] = ConstructorRegistry("update rule",
                                                                           ("l2o.unsupervised",))

#: Decorator: ``@register_update_rule("name")`` on a :class:`LearnedUpdateRule` constructor.
register_update_rule = UPDATE_RULES.constructor
