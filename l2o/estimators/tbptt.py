"""Truncated backpropagation through time (TBPTT), the estimator of L2L.

Each call unrolls every inner problem for ``unroll_length`` steps under ``opt_fn(θ)`` and
differentiates the meta-loss with respect to θ. The meta-loss of a truncation is the mean (or sum)
of the inner losses seen along it plus the loss of the final parameters on a fresh batch, averaged
over the vmapped problems. Inner gradients are constants unless ``second_derivatives=True``.
Inner problems carry over between calls and restart after ``num_steps`` inner steps.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from l2o.estimators.base import GradientEstimator, Metrics
from l2o.estimators.truncated_step import InnerState, TruncatedStep
from l2o.types import MetaParams, PRNGKey


@struct.dataclass
class TruncatedBackprop(GradientEstimator):
    """Truncated backprop over ``num_tasks`` vmapped inner problems."""

    truncated_step: TruncatedStep
    num_tasks: int = struct.field(pytree_node=False, default=8)
    unroll_length: int = struct.field(pytree_node=False, default=20)
    meta_loss_reduction: Literal["mean", "sum"] = struct.field(pytree_node=False, default="mean")

    estimator_name = "tbptt"

    def init_worker_state(self, theta: MetaParams, key: PRNGKey) -> InnerState:
        return _init_worker_state(self, theta, key)

    def compute_gradient_estimate(
        self, theta: MetaParams, worker_state: InnerState, key: PRNGKey
    ) -> tuple[MetaParams, InnerState, Metrics]:
        return _compute_gradient_estimate(self, theta, worker_state, key)

    def meta_loss(self, theta: MetaParams, states: InnerState,
                  key: PRNGKey) -> tuple[jax.Array, tuple[InnerState, Metrics]]:
        """The truncation's meta-loss, with the new states and metrics as auxiliary output."""
        k_unroll, k_final = jax.random.split(key)
        ts = self.truncated_step
        states, out = ts.unroll(theta, states, k_unroll, self.unroll_length)
        final = jax.vmap(ts.final_loss, in_axes=(None, 0, 0))(
            theta, states, jax.random.split(k_final, self.num_tasks)
        )
        losses = jnp.concatenate([out.loss, final[None]], axis=0)  # [K + 1, num_tasks]
        per_task = losses.mean(0) if self.meta_loss_reduction == "mean" else losses.sum(0)
        meta_loss = per_task.mean()
        metrics = {
            "meta_loss": meta_loss,
            "inner_loss": out.loss.mean(),
            "final_inner_loss": final.mean(),
            "resets": out.reset.sum(),
            "inner_steps": jnp.asarray(self.unroll_length * self.num_tasks),
        }
        return meta_loss, (states, metrics)


@jax.jit
def _init_worker_state(est: TruncatedBackprop, theta: MetaParams, key: PRNGKey) -> InnerState:
    return est.truncated_step.init_states(theta, key, est.num_tasks)


@jax.jit
def _compute_gradient_estimate(est: TruncatedBackprop, theta: MetaParams, states: InnerState,
                               key: PRNGKey) -> tuple[MetaParams, InnerState, Metrics]:
    grad, (states, metrics) = jax.grad(est.meta_loss, has_aux=True)(theta, states, key)
    states = jax.lax.stop_gradient(states)
    return grad, states, metrics
