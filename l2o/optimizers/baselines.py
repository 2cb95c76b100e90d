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
from l2o.optimizers.registry import register_optimizer
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


_OPTAX_MAKERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.adam,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,
}


@dataclasses.dataclass(frozen=True)
class OptaxLearnedOptimizer(LearnedOptimizer):
    """A fixed optax optimizer seen as a learned optimizer with empty θ.

    ``kind`` names an optax constructor (``adam``, ``sgd``, ``rmsprop``) and ``hyperparams`` its
    keyword arguments as sorted ``(name, value)`` pairs, so equal optimizers are equal and hash
    alike: jitted code that takes one as static configuration compiles once.
    """

    kind: str
    hyperparams: tuple[tuple[str, float | None], ...] = ()

    def init(self, key: PRNGKey) -> MetaParams:
        return {}

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> Optimizer:
        return OptaxOptimizer(_OPTAX_MAKERS[self.kind](**dict(self.hyperparams)), self.name)

    @property
    def name(self) -> str:
        lr = dict(self.hyperparams).get("learning_rate")
        return f"{self.kind}(lr={lr:g})" if lr is not None else self.kind


def _baseline(kind: str, **hyperparams: float | None) -> OptaxLearnedOptimizer:
    return OptaxLearnedOptimizer(kind, tuple(sorted(hyperparams.items())))


@register_optimizer("adam")
def adam(learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8) -> OptaxLearnedOptimizer:
    """Adam with fixed hyperparameters."""
    return _baseline("adam", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)


@register_optimizer("sgd")
def sgd(learning_rate: float = 1e-2, momentum: float | None = None) -> OptaxLearnedOptimizer:
    """SGD, with optional heavy-ball momentum."""
    return _baseline("sgd", learning_rate=learning_rate, momentum=momentum)


@register_optimizer("rmsprop")
def rmsprop(learning_rate: float = 1e-3, decay: float = 0.9,
            eps: float = 1e-8) -> OptaxLearnedOptimizer:
    """RMSProp."""
    return _baseline("rmsprop", learning_rate=learning_rate, decay=decay, eps=eps)

