"""Hand-designed baselines (Adam, SGD, RMSProp, …) behind the :class:`Optimizer` interface.

They wrap optax transformations, so anything optax offers can be evaluated side by side with
learned optimizers. As learned optimizers they have an empty θ (``{}``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, zero_iteration
from l2o.types import MetaParams, Params, PRNGKey


@struct.dataclass
class OptaxState:
    """Parameters, iteration counter and the wrapped optax state."""

    params: Params
    iteration: jax.Array
    inner: optax.OptState


class OptaxOptimizer(Optimizer):
    """Any ``optax.GradientTransformation`` as an :class:`Optimizer`."""

    def __init__(self, tx: optax.GradientTransformation, name: str = "optax"):
        self.tx = tx
        self._name = name

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> OptaxState:
        return OptaxState(params=params, iteration=zero_iteration(), inner=self.tx.init(params))

    def update(self, state: OptaxState, grads: Params, *, loss=None, key=None) -> OptaxState:
        updates, inner = self.tx.update(grads, state.inner, state.params)
        return OptaxState(
            params=optax.apply_updates(state.params, updates),
            iteration=state.iteration + 1,
            inner=inner,
        )

    @property
    def name(self) -> str:
        return self._name


@dataclasses.dataclass(frozen=True)
class OptaxLearnedOptimizer(LearnedOptimizer):
    """A fixed optax optimizer seen as a learned optimizer with empty θ."""

    make_tx: Callable[[], optax.GradientTransformation]
    label: str = "optax"

    def init(self, key: PRNGKey) -> MetaParams:
        return {}

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> Optimizer:
        return OptaxOptimizer(self.make_tx(), self.label)

    @property
    def name(self) -> str:
        return self.label


def adam(learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8) -> OptaxLearnedOptimizer:
    """Adam with fixed hyperparameters."""
    return OptaxLearnedOptimizer(
        lambda: optax.adam(learning_rate, b1=b1, b2=b2, eps=eps), f"adam(lr={learning_rate:g})"
    )


def sgd(learning_rate: float = 1e-2, momentum: float | None = None) -> OptaxLearnedOptimizer:
    """SGD, with optional heavy-ball momentum."""
    return OptaxLearnedOptimizer(
        lambda: optax.sgd(learning_rate, momentum=momentum), f"sgd(lr={learning_rate:g})"
    )


def rmsprop(learning_rate: float = 1e-3, decay: float = 0.9,
            eps: float = 1e-8) -> OptaxLearnedOptimizer:
    """RMSProp."""
    return OptaxLearnedOptimizer(
        lambda: optax.rmsprop(learning_rate, decay=decay, eps=eps), f"rmsprop(lr={learning_rate:g})"
    )


BASELINES: dict[str, Callable[..., OptaxLearnedOptimizer]] = {
    "adam": adam,
    "sgd": sgd,
    "rmsprop": rmsprop,
}
