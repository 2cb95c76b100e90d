"""Persistent evolution strategies (PES; Vicol, Metz and Sohl-Dickstein, ICML 2021).

Truncated ES differentiates only the truncation at hand: the effect of θ on the state the
truncation starts from is ignored, which biases it toward short horizons. PES keeps, per particle,
the two antithetic inner states (the ``+`` run always under ``θ + ε_k``, the ``−`` run under
``θ − ε_k``, where ``ε_k`` is drawn afresh for each truncation ``k``) **persisted across
truncations**, and an accumulator ``ξ = Σ_k ε_k`` of every perturbation applied since the
particle's inner problem last restarted. Because the ``+`` state at truncation ``k`` is exactly the
state of a run perturbed by ``ε_1, …, ε_k``, the ES estimate with ``ξ`` in place of ``ε``,

    ĝ = mean_i ΔL_i · ξ_i / (2σ²)        (ε ~ N(0, σ² I), σ = ``std``),

is an unbiased estimate of the gradient of the sum of the truncation meta-losses over the whole
inner horizon (the same meta-loss as truncated ES: the mean of the post-step losses, see
:mod:`l2o.estimators.es`).

Restarts. When a particle's inner problem restarts, its ``+`` and ``−`` states restart together
(same key, same step counter) and its accumulator restarts at 0. A restart may fall inside a
truncation; the estimate then stays exact by splitting the truncation's losses: a loss measured
before the restart depends on ``ξ_old + ε``, one measured after it only on ``ε``::

    ĝ_i = [mean_j ΔL_ij] · ε_i / (2σ²) + [mean_j ΔL_ij · before_ij] · ξ_old,i / (2σ²)

and the accumulator carried on is ``ε_i`` if the problem restarted in this truncation, else
``ξ_old,i + ε_i``. ``sign_delta_loss`` replaces each ``bracket / (2σ²)`` by ``sign(bracket) / σ``.
The NaN guard and metrics are those of :mod:`l2o.estimators.es` (plus ``accum_norm``, the mean
``|ξ| / σ``); particles left out for non-finite values restart, with their accumulator, at the next
step.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

from l2o.estimators.base import GradientEstimator, Metrics
from l2o.estimators.es import (
    ESSettings,
    antithetic_unroll,
    combine,
    delta_coefficient,
    pair_metrics,
    restart_where,
    sample_perturbations,
    stack_pair,
)
from l2o.estimators.registry import register_estimator
from l2o.estimators.truncated_step import InnerState, TruncatedStep
from l2o.tasks.base import TaskFamily
from l2o.types import MetaParams, PRNGKey


@struct.dataclass
class PESWorkerState:
    """PES worker state: per particle the ``+``/``−`` inner states and the accumulator ``ξ``."""

    pos: InnerState  # [N]
    neg: InnerState  # [N]
    accum: MetaParams  # θ-shaped with a leading [N]: Σ ε since the problem's last restart
    iteration: jax.Array  # int32: truncations run by this worker (drives curricula)


@struct.dataclass
class PES(GradientEstimator):
    """Persistent ES over ``num_tasks`` particles (one antithetic pair of inner problems each)."""

    truncated_step: TruncatedStep
    num_tasks: int = struct.field(pytree_node=False, default=8)
    unroll_length: int = struct.field(pytree_node=False, default=20)
    std: float = struct.field(pytree_node=False, default=0.01)
    sign_delta_loss: bool = struct.field(pytree_node=False, default=False)
    random_initial_offset: bool = struct.field(pytree_node=False, default=False)

    estimator_name = "pes"

    def init_worker_state(self, theta: MetaParams, key: PRNGKey) -> PESWorkerState:
        """Fresh pairs (both halves equal) and zero accumulators."""
        return _pes_init(self, theta, key)

    def compute_gradient_estimate(
        self, theta: MetaParams, worker_state: PESWorkerState, key: PRNGKey
    ) -> tuple[MetaParams, PESWorkerState, Metrics]:
        """One truncation of every pair: ``(estimate, new_state, metrics)``."""
        return _pes_estimate(self, theta, worker_state, key)


@jax.jit
def _pes_init(est: PES, theta: MetaParams, key: PRNGKey) -> PESWorkerState:
    inner = est.truncated_step.init_states(theta, key, est.num_tasks,
                                           random_offset=est.random_initial_offset)
    accum = jax.tree_util.tree_map(lambda t: jnp.zeros((est.num_tasks,) + jnp.shape(t),
                                                       jnp.result_type(t)), theta)
    return PESWorkerState(pos=inner, neg=inner, accum=accum, iteration=jnp.zeros((), jnp.int32))


@jax.jit
def _pes_estimate(est: PES, theta: MetaParams, ws: PESWorkerState,
                  key: PRNGKey) -> tuple[MetaParams, PESWorkerState, Metrics]:
    ts = est.truncated_step
    k_eps, k_unroll = jax.random.split(key)
    eps = sample_perturbations(theta, k_eps, est.num_tasks, est.std)
    old = ws.accum
    # + runs under θ + ε, − runs under θ − ε, each from its own persisted state.
    thetas = jax.tree_util.tree_map(lambda t, e: jnp.stack([t + e, t - e]), theta, eps)
    pair = antithetic_unroll(ts, thetas, stack_pair(ws.pos, ws.neg), k_unroll,
                             est.unroll_length, ws.iteration)
    delta_steps = pair.post_loss[0] - pair.post_loss[1]  # [K, N]
    # post-loss j is measured after step j: it predates any restart iff none happened in 0..j.
    before = jnp.cumsum(pair.reset.astype(jnp.int32), axis=0) == 0  # [K, N]
    delta = delta_steps.mean(0)
    delta_old = jnp.where(before, delta_steps, 0.0).mean(0)
    terms = [(delta_coefficient(delta, est.std, est.sign_delta_loss), eps),
             (delta_coefficient(delta_old, est.std, est.sign_delta_loss), old)]
    grad, finite, num_finite = combine(terms)

    restarted = pair.reset.any(axis=0)  # [N]
    keep = (~restarted).astype(jnp.float32)
    accum = jax.tree_util.tree_map(
        lambda e, a: e + keep.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype) * a, eps, old)
    pos = restart_where(ts, jax.tree_util.tree_map(lambda x: x[0], pair.states), ~finite)
    neg = restart_where(ts, jax.tree_util.tree_map(lambda x: x[1], pair.states), ~finite)
    per_particle = pair.post_loss.mean(axis=1)
    metrics = pair_metrics(pair, per_particle, finite, num_finite, delta,
                           2 * est.unroll_length * est.num_tasks)
    flat = jnp.concatenate([a.reshape(est.num_tasks, -1) for a in jax.tree_util.tree_leaves(accum)],
                           axis=1)
    metrics["accum_norm"] = jnp.sqrt(jnp.sum(flat * flat, axis=1)).mean() / est.std
    new_ws = PESWorkerState(pos=pos, neg=neg, accum=accum, iteration=ws.iteration + 1)
    return grad, new_ws, metrics


@register_estimator
class PESConfig(ESSettings):
    """``estimator: {name: pes}``: :class:`PES`."""

    name: Literal["pes"] = "pes"
    random_initial_offset: bool = False  # desynchronize the problems' restarts

    def build(self, family: TaskFamily, learned_opt: Any) -> PES:
        """The :class:`PES` of these settings."""
        return PES(**self.es_fields(family, learned_opt), unroll_length=self.unroll_length,
                   random_initial_offset=self.random_initial_offset)
