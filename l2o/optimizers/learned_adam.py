"""Learned Adam: Adam whose four hyperparameters are the meta-parameters θ.

The smallest learned optimizer. θ holds unconstrained scalars::

    θ = {"log_lr": log(lr), "logit_b1": logit(β1), "logit_b2": logit(β2), "log_eps": log(ε)}

initialized at lr = 1e-3, β1 = 0.9, β2 = 0.999, ε = 1e-8, where it takes exactly the steps of
``optax.adam`` (same moments, same bias correction, ``ε`` added outside the square root).
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


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0 rather than inf (no NaN in θ-grads)."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


@struct.dataclass
class AdamState:
    """Parameters, iteration counter and Adam's first and second moments."""

    params: Params
    iteration: jax.Array
    mu: Params
    nu: Params


class LearnedAdamOptimizer(Optimizer):
    """Adam with hyperparameters read from θ (built by :class:`LearnedAdam`)."""

    def __init__(self, theta: MetaParams):
        self.theta = theta

    def hyperparameters(self) -> dict[str, jax.Array]:
        """The constrained hyperparameters ``lr``, ``b1``, ``b2``, ``eps`` given by θ."""
        t = self.theta
        return {
            "lr": jnp.exp(t["log_lr"]),
            "b1": jax.nn.sigmoid(t["logit_b1"]),
            "b2": jax.nn.sigmoid(t["logit_b2"]),
            "eps": jnp.exp(t["log_eps"]),
        }

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> AdamState:
        """Zero moments."""
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return AdamState(params=params, iteration=zero_iteration(), mu=zeros, nu=zeros)

    def update(self, state: AdamState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> AdamState:
        """One bias-corrected Adam step."""
        hp = self.hyperparameters()
        b1, b2 = hp["b1"], hp["b2"]
        t = (state.iteration + 1).astype(jnp.float32)
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * (g * g), state.nu, grads)
        c1 = 1 - b1 ** t
        c2 = 1 - b2 ** t

        def step(p, m, v):
            upd = (m / c1) / (_safe_sqrt(v / c2) + hp["eps"])
            return p - (hp["lr"] * upd).astype(p.dtype)

        params = jax.tree_util.tree_map(step, state.params, mu, nu)
        return AdamState(params=params, iteration=state.iteration + 1, mu=mu, nu=nu)

    @property
    def name(self) -> str:
        return "learned_adam"


@register_optimizer("learned_adam")
@dataclasses.dataclass(frozen=True)
class LearnedAdam(LearnedOptimizer):
    """Adam with learned ``lr``, ``β1``, ``β2`` and ``ε`` (θ in log/logit space)."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def init(self, key: PRNGKey) -> MetaParams:
        """θ at the configured hyperparameters (deterministic: ``key`` is unused)."""
        return {
            "log_lr": jnp.asarray(math.log(self.learning_rate), jnp.float32),
            "logit_b1": jnp.asarray(_logit(self.b1), jnp.float32),
            "logit_b2": jnp.asarray(_logit(self.b2), jnp.float32),
            "log_eps": jnp.asarray(math.log(self.eps), jnp.float32),
        }

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> LearnedAdamOptimizer:
        """Adam with the hyperparameters in ``theta``."""
        return LearnedAdamOptimizer(theta)

    @property
    def name(self) -> str:
        return "learned_adam"
