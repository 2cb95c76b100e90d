"""The ``Optimizer`` and ``LearnedOptimizer`` interfaces.

An :class:`Optimizer` is an inner optimizer: ``init(params) -> state``, ``update(state, grads)
-> state`` and ``params(state)``. Its state is a ``flax.struct`` pytree that *contains the
parameters* and the iteration counter, so ``jit``, ``vmap``, ``lax.scan`` and checkpointing treat it
as plain data.

A :class:`LearnedOptimizer` owns the meta-parameters θ: ``init(key) -> θ`` and ``opt_fn(θ) ->
Optimizer``. Hand-designed optimizers are learned optimizers whose θ is empty (or holds their
hyperparameters), so evaluation and training code never needs to tell them apart.

Subclasses of :class:`LearnedOptimizer` are frozen dataclasses: they are hashable and can be used
as static (compile-time) configuration by jitted code, while θ always travels as an argument.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from l2o.types import MetaParams, Params, PRNGKey


@struct.dataclass
class OptState:
    """The smallest optimizer state: parameters and the iteration counter."""

    params: Params
    iteration: jax.Array


class Optimizer:
    """An inner optimizer. ``opt_fn(θ)`` builds one, usually inside a traced function."""

    def init(self, params: Params, *, num_steps: int | None = None, key: PRNGKey | None = None):
        """Initial state holding ``params``. ``num_steps`` is the inner horizon, when known."""
        raise NotImplementedError

    def update(self, state, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None):
        """The state after one step along ``grads`` (``loss`` is the loss they came from)."""
        raise NotImplementedError

    def params(self, state) -> Params:
        """The parameters held in ``state``."""
        return state.params

    @property
    def name(self) -> str:
        """A short human-readable name."""
        return type(self).__name__


@dataclasses.dataclass(frozen=True)
class LearnedOptimizer:
    """A family of optimizers indexed by meta-parameters θ."""

    def init(self, key: PRNGKey) -> MetaParams:
        """Initial θ drawn from ``key``."""
        raise NotImplementedError

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> Optimizer:
        """The optimizer with meta-parameters ``theta``."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """A short human-readable name."""
        return type(self).__name__


def tensor_rms(x: jax.Array) -> jax.Array:
    """The root mean square of a tensor's entries, in float32 (0 for an empty tensor): the scale
    the learned optimizers with relative steps measure each parameter tensor by."""
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))) if x.size else jnp.zeros(())


def zero_iteration() -> jax.Array:
    """An int32 scalar 0, the iteration counter of a fresh state."""
    return jnp.zeros((), jnp.int32)
