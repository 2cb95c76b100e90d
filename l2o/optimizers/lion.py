"""Learned Lion: the sign-momentum optimizer of Chen et al. (2023) with learned hyperparameters.

Lion ("EvoLved Sign Momentum", found by program search) keeps one moment ``m`` and steps by the
sign of an interpolation of it with the gradient::

    c ← β1·m + (1 − β1)·g
    params ← params − lr·(sign(c) + λ·params)
    m ← β2·m + (1 − β2)·g

Every coordinate moves by exactly ``lr`` (plus decay), so Lion wants a learning rate about 10×
smaller than Adam's. Here θ holds the unconstrained hyperparameters::

    θ = {"log_lr": log(lr), "logit_b1": logit(β1), "logit_b2": logit(β2)}

initialized at the configured values (``optax.lion``'s defaults but no weight decay), where it
takes exactly ``optax.lion``'s steps; the weight decay ``λ`` is a fixed setting. ``sign`` has a zero
derivative, so truncated backprop only learns ``lr``; the ES estimators (``es``, ``pes``,
``full_es``) learn all three.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, zero_iteration
from l2o.optimizers.registry import register_optimizer
from l2o.types import MetaParams, Params, PRNGKey


@struct.dataclass
class LionState:
    """Parameters, iteration counter and Lion's moment."""

    params: Params
    iteration: jax.Array
    mu: Params


class LearnedLionOptimizer(Optimizer):
    """Lion with ``lr``, ``β1`` and ``β2`` read from θ (built by :class:`LearnedLion`)."""

    def __init__(self, theta: MetaParams, weight_decay: float):
        self.theta = theta
        self.weight_decay = weight_decay

    def hyperparameters(self) -> dict[str, jax.Array]:
        """The constrained hyperparameters ``lr``, ``b1``, ``b2`` given by θ."""
        t = self.theta
        return {"lr": jnp.exp(t["log_lr"]), "b1": jax.nn.sigmoid(t["logit_b1"]),
                "b2": jax.nn.sigmoid(t["logit_b2"])}

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> LionState:
        """A zero moment."""
        return LionState(params=params, iteration=zero_iteration(),
                         mu=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(self, state: LionState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> LionState:
        """One Lion step."""
        hp = self.hyperparameters()
        b1, b2, lr = hp["b1"], hp["b2"], hp["lr"]

        def step(p, m, g):
            direction = jnp.sign(b1 * m + (1 - b1) * g) + self.weight_decay * p
            return p - (lr * direction).astype(p.dtype)

        params = jax.tree_util.tree_map(step, state.params, state.mu, grads)
        mu = jax.tree_util.tree_map(lambda m, g: b2 * m + (1 - b2) * g, state.mu, grads)
        return LionState(params=params, iteration=state.iteration + 1, mu=mu)

    @property
    def name(self) -> str:
        return "learned_lion"


@register_optimizer("learned_lion")
@dataclasses.dataclass(frozen=True)
class LearnedLion(LearnedOptimizer):
    """Lion with learned ``lr``, ``β1`` and ``β2`` (θ in log/logit space) and a fixed weight
    decay."""

    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.99
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for field in ("b1", "b2"):
            if not 0 < getattr(self, field) < 1:
                raise ValueError(f"LearnedLion.{field} must be in (0, 1), "
                                 f"got {getattr(self, field)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"LearnedLion.learning_rate must be > 0, got {self.learning_rate!r}")

    def init(self, key: PRNGKey) -> MetaParams:
        """θ at the configured hyperparameters (deterministic: ``key`` is unused)."""
        logit = lambda p: math.log(p) - math.log1p(-p)
        return {"log_lr": jnp.asarray(math.log(self.learning_rate), jnp.float32),
                "logit_b1": jnp.asarray(logit(self.b1), jnp.float32),
                "logit_b2": jnp.asarray(logit(self.b2), jnp.float32)}

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> LearnedLionOptimizer:
        """Lion with the hyperparameters in ``theta``."""
        return LearnedLionOptimizer(theta, self.weight_decay)

    @property
    def name(self) -> str:
        return "learned_lion"
