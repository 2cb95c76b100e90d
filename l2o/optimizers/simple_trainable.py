"""The simplest trainable optimizers: SGD with a learned learning rate, and with learned momentum.

They show the mechanics of meta-training with a θ of one or two scalars:

- ``learned_lr_sgd``: θ = ``{"log_lr"}``; ``params ← params − exp(log_lr) · g``.
- ``learned_momentum``: θ = ``{"log_lr", "logit_momentum"}``; heavy-ball momentum
  ``v ← μ v + g``, ``params ← params − lr · v`` with ``μ = sigmoid(logit_momentum)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, OptState, zero_iteration
from l2o.optimizers.registry import register_optimizer
from l2o.types import MetaParams, Params, PRNGKey


def _sub(params: Params, steps: Params) -> Params:
    return jax.tree_util.tree_map(lambda p, s: p - s.astype(p.dtype), params, steps)


class LearnedLRSGDOptimizer(Optimizer):
    """SGD with the learning rate ``exp(θ["log_lr"])``."""

    def __init__(self, theta: MetaParams):
        self.theta = theta

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> OptState:
        """Only the parameters and the counter."""
        return OptState(params=params, iteration=zero_iteration())

    def update(self, state: OptState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> OptState:
        """``params − lr · g``."""
        lr = jnp.exp(self.theta["log_lr"])
        steps = jax.tree_util.tree_map(lambda g: lr * g, grads)
        return OptState(params=_sub(state.params, steps), iteration=state.iteration + 1)

    @property
    def name(self) -> str:
        return "learned_lr_sgd"


@register_optimizer("learned_lr_sgd")
@dataclasses.dataclass(frozen=True)
class LearnedLRSGD(LearnedOptimizer):
    """SGD whose global learning rate is learned (θ = log lr)."""

    learning_rate: float = 1e-2

    def init(self, key: PRNGKey) -> MetaParams:
        """θ at ``learning_rate`` (deterministic)."""
        return {"log_lr": jnp.asarray(math.log(self.learning_rate), jnp.float32)}

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> LearnedLRSGDOptimizer:
        """SGD with the learning rate in ``theta``."""
        return LearnedLRSGDOptimizer(theta)

    @property
    def name(self) -> str:
        return "learned_lr_sgd"


@struct.dataclass
class MomentumState:
    """Parameters, iteration counter and the velocity (same tree as the parameters)."""

    params: Params
    iteration: jax.Array
    velocity: Params


class LearnedMomentumOptimizer(Optimizer):
    """Heavy-ball momentum with learned learning rate and momentum."""

    def __init__(self, theta: MetaParams):
        self.theta = theta

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> MomentumState:
        """Zero velocity."""
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return MomentumState(params=params, iteration=zero_iteration(), velocity=zeros)

    def update(self, state: MomentumState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> MomentumState:
        """``v ← μ v + g``; ``params − lr · v``."""
        lr = jnp.exp(self.theta["log_lr"])
        mu = jax.nn.sigmoid(self.theta["logit_momentum"])
        vel = jax.tree_util.tree_map(lambda v, g: (mu * v + g).astype(v.dtype),
                                     state.velocity, grads)
        steps = jax.tree_util.tree_map(lambda v: lr * v, vel)
        return MomentumState(params=_sub(state.params, steps), iteration=state.iteration + 1,
                             velocity=vel)

    @property
    def name(self) -> str:
        return "learned_momentum"


@register_optimizer("learned_momentum")
@dataclasses.dataclass(frozen=True)
class LearnedMomentum(LearnedOptimizer):
    """Heavy-ball SGD with learned lr and momentum (θ = log lr, logit μ)."""

    learning_rate: float = 1e-2
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 < self.momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {self.momentum}")

    def init(self, key: PRNGKey) -> MetaParams:
        """θ at the configured hyperparameters (deterministic)."""
        mu = self.momentum
        return {"log_lr": jnp.asarray(math.log(self.learning_rate), jnp.float32),
                "logit_momentum": jnp.asarray(math.log(mu) - math.log1p(-mu), jnp.float32)}

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> LearnedMomentumOptimizer:
        """Momentum SGD with the hyperparameters in ``theta``."""
        return LearnedMomentumOptimizer(theta)

    @property
    def name(self) -> str:
        return "learned_momentum"
