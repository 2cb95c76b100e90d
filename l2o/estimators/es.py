"""Truncated evolution strategies (ES) with antithetic pairs, and the pieces PES and full ES share.

Conventions (shared by :mod:`~l2o.estimators.es`, :mod:`~l2o.estimators.pes` and
:mod:`~l2o.estimators.full_es`):

- A *particle* is one inner problem with its own perturbation ``ε ~ N(0, σ² I)`` (``σ = std``) of
  θ. Its antithetic pair runs ``θ + ε`` and ``θ − ε`` from the **same** inner state with the
  **same** keys (task resets, batches, optimizer noise): the two runs are ``vmap``-ed over a
  leading axis of size 2 with one key, so they differ only through the sign of ``ε``.
- The meta-loss of a run over a truncation of ``K`` steps is the mean of the losses of the
  parameters *after* each of its ``K`` inner steps: on the training batches of the following steps
  and a fresh batch for the last one, or, with ``TruncatedStep.eval_split_loss``, on batches of the
  evaluation split. (The loss of the truncation's starting parameters does not depend on the
  perturbation, so it is left out.) Summed over consecutive truncations this counts every inner
  step's loss once, which is what makes PES unbiased for the whole-horizon meta-loss.
- The estimate is ``mean_i ΔL_i · ε_i / (2σ²)`` with ``ΔL_i = L(θ + ε_i) − L(θ − ε_i)``, i.e. the
  usual ``ΔL · z / (2σ)`` with ``z = ε/σ`` standard normal. With ``sign_delta_loss`` it is
  ``mean_i sign(ΔL_i) · ε_i / σ``, whose expectation for small σ is ``sqrt(2/π) · ∇/|∇|``.
- NaN guard: a particle whose contribution is not finite is left out of the mean (counted in the
  ``nonfinite_particles`` metric; ``nonfinite`` is 1 when any particle was) and its inner problem
  is restarted at the next step. When no particle is finite the whole estimate is returned as NaN,
  so :func:`l2o.training.trainer.meta_step` and the learner's validation drop it: it is never
  applied.

Truncated ES (:class:`TruncatedES`) carries one inner state per particle. After the pair has run,
the state that carries on is the **positive** run's (``advance="positive"``, the default, no extra
cost; its trajectory is that of a randomly perturbed θ) or an **unperturbed** run with θ itself
from the same state and keys (``advance="unperturbed"``: 1.5× the inner steps, the trajectory of θ).
Its estimate is biased toward the truncation like TBPTT's; PES removes that bias.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct
from pydantic import Field

from l2o.estimators.base import GradientEstimator, Metrics
from l2o.estimators.registry import register_estimator
from l2o.estimators.truncated_step import InnerState, TruncatedStep, TruncatedStepSettings
from l2o.tasks.base import TaskFamily
from l2o.types import MetaParams, PRNGKey

# ------------------------------------------------------------------------------------------------
# Shared pieces


@struct.dataclass
class PairOutput:
    """The antithetic pair of unrolls of one truncation; leading axis 2 is (+, −)."""

    states: InnerState  # [2, N] final states
    train_loss: jax.Array  # [2, K, N] loss before each step, on its training batch
    post_loss: jax.Array  # [2, K, N] loss after each step (see the module docstring)
    final_loss: jax.Array  # [2, N] loss of the final parameters on a fresh batch
    reset: jax.Array  # [K, N] bool, of the + run (the − run restarts at the same steps)


def sample_perturbations(theta: MetaParams, key: PRNGKey, num: int, std: float) -> MetaParams:
    """``num`` perturbations of θ, each ``N(0, std² I)``, stacked on a leading axis."""
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    keys = jax.random.split(key, max(len(leaves), 1))
    eps = [std * jax.random.normal(k, (num,) + jnp.shape(x), jnp.result_type(x))
           for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, eps)


def perturbed_pair(theta: MetaParams, eps: MetaParams) -> MetaParams:
    """``θ ± ε`` stacked as ``[2, N, ...]`` (+ first)."""
    return jax.tree_util.tree_map(lambda t, e: jnp.stack([t + e, t - e]), theta, eps)


def stack_pair(pos, neg):
    """Two pytrees stacked on a new leading axis of size 2."""
    return jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), pos, neg)


def pair_index(tree, i: int):
    """Element ``i`` (0: +, 1: −) of a pytree stacked by :func:`stack_pair`."""
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def antithetic_unroll(ts: TruncatedStep, thetas: MetaParams, states: InnerState, key: PRNGKey,
                      length: int, iteration: jax.Array | int | None = None) -> PairOutput:
    """Unroll the ``[2, N]`` problems ``states`` under the ``[2, N]`` θs for ``length`` steps.

    Both halves use the same keys, hence the same resets, batches and optimizer noise: the
    ``2N`` problems form one batch with two key groups (see :meth:`TruncatedStep.unroll`).
    """
    k_unroll, k_final = jax.random.split(key)
    split = "eval" if ts.eval_split_loss else "train"
    n = jax.tree_util.tree_leaves(states.step)[0].shape[1]
    merge = lambda tree: jax.tree_util.tree_map(lambda x: x.reshape((2 * n,) + x.shape[2:]), tree)
    unmerge = lambda tree, lead: jax.tree_util.tree_map(
        lambda x: x.reshape(lead + (2, n) + x.shape[len(lead) + 1:]), tree)
    th = merge(thetas)
    st, out = ts.unroll(th, merge(states), k_unroll, length, theta_batched=True,
                        iteration=iteration, key_groups=2)
    final_keys = jnp.concatenate([jax.random.split(k_final, n)] * 2, axis=0)
    final = jax.vmap(lambda t, s, k: ts.final_loss(t, s, k, split))(th, st, final_keys)
    loss = unmerge(out.loss, (length,)).swapaxes(0, 1)  # [2, K, N]
    final = final.reshape(2, n)
    if ts.eval_split_loss:
        post = unmerge(out.eval_loss, (length,)).swapaxes(0, 1)
    else:
        post = jnp.concatenate([loss[:, 1:], final[:, None]], axis=1)
    reset = unmerge(out.reset, (length,))[:, 0]
    return PairOutput(states=unmerge(st, ()), train_loss=loss, post_loss=post, final_loss=final,
                      reset=reset)


def delta_coefficient(delta: jax.Array, std: float, sign_delta_loss: bool) -> jax.Array:
    """The factor a perturbation is multiplied by: ``ΔL/(2σ²)``, or ``sign(ΔL)/σ``."""
    if sign_delta_loss:
        return jnp.sign(delta) / std
    return delta / (2.0 * std * std)


def combine(terms: list[tuple[jax.Array, MetaParams]], extra_finite: jax.Array | None = None
            ) -> tuple[MetaParams, jax.Array, jax.Array]:
    """``mean_i Σ_terms coef_i · direction_i`` over the finite particles.

    Returns ``(estimate, finite [N] bool, num_finite)``; the estimate is NaN when no particle is
    finite, so it is dropped downstream instead of applied.
    """
    finite = jnp.ones_like(terms[0][0], dtype=bool)
    for coef, direction in terms:
        finite &= jnp.isfinite(coef)
        for d in jax.tree_util.tree_leaves(direction):
            finite &= jnp.all(jnp.isfinite(d.reshape(d.shape[0], -1)), axis=1)
    if extra_finite is not None:
        finite &= extra_finite
    count = finite.sum()
    denom = jnp.maximum(count, 1).astype(jnp.float32)

    def leaf_sum(*parts):
        total = 0.0
        for (coef, _), d in zip(terms, parts):
            c = jnp.where(finite, coef, 0.0).reshape((-1,) + (1,) * (d.ndim - 1))
            total = total + jnp.sum(c * jnp.where(jnp.isfinite(d), d, 0.0), axis=0)
        return jnp.where(count > 0, total / denom, jnp.nan).astype(d.dtype)

    directions = [d for _, d in terms]
    est = jax.tree_util.tree_map(leaf_sum, *directions)
    return est, finite, count


def restart_where(ts: TruncatedStep, states: InnerState, mask: jax.Array) -> InnerState:
    """``states`` with the problems selected by ``mask`` ``[..., N]`` set to restart next step."""
    limit = jnp.asarray(states.limit(ts.num_steps), jnp.int32)
    return states.replace(step=jnp.where(mask, jnp.maximum(limit, states.step), states.step))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x`` over the entries where ``mask`` holds (NaN when none)."""
    mask = jnp.broadcast_to(mask, x.shape)
    n = mask.sum()
    return jnp.where(n > 0, jnp.where(mask, x, 0.0).sum() / jnp.maximum(n, 1), jnp.nan)


def pair_metrics(pair: PairOutput, per_particle_loss: jax.Array, finite: jax.Array,
                 num_finite: jax.Array, delta: jax.Array, inner_steps: int) -> Metrics:
    """The metrics every antithetic estimator reports (``per_particle_loss`` is ``[2, N]``)."""
    n = finite.shape[0]
    return {
        "meta_loss": masked_mean(per_particle_loss, finite[None]),
        "inner_loss": masked_mean(pair.train_loss, finite[None, None]),
        "final_inner_loss": masked_mean(pair.final_loss, finite[None]),
        "resets": pair.reset.sum(),
        "inner_steps": jnp.asarray(inner_steps),
        "nonfinite": (num_finite < n).astype(jnp.int32),
        "nonfinite_particles": (n - num_finite).astype(jnp.int32),
        "delta_loss_abs": masked_mean(jnp.abs(delta), finite),
    }


# ------------------------------------------------------------------------------------------------
# Truncated ES


@struct.dataclass
class ESWorkerState:
    """Truncated ES worker state: one inner problem per particle and a truncation counter."""

    inner: InnerState  # [N]
    iteration: jax.Array  # int32: truncations run by this worker (drives curricula)


@struct.dataclass
class TruncatedES(GradientEstimator):
    """Antithetic truncated ES over ``num_tasks`` particles (one inner problem each).

    ``std`` is σ, the standard deviation of each coordinate of ε. See the module docstring for the
    meta-loss, the estimate, the NaN guard and which state carries on (``advance``).
    """

    truncated_step: TruncatedStep
    num_tasks: int = struct.field(pytree_node=False, default=8)
    unroll_length: int = struct.field(pytree_node=False, default=20)
    std: float = struct.field(pytree_node=False, default=0.01)
    sign_delta_loss: bool = struct.field(pytree_node=False, default=False)
    random_initial_offset: bool = struct.field(pytree_node=False, default=False)
    advance: Literal["positive", "unperturbed"] = struct.field(pytree_node=False,
                                                               default="positive")

    estimator_name = "es"

    def init_worker_state(self, theta: MetaParams, key: PRNGKey) -> ESWorkerState:
        """``num_tasks`` fresh inner problems (random step offsets if configured)."""
        return _es_init(self, theta, key)

    def compute_gradient_estimate(
        self, theta: MetaParams, worker_state: ESWorkerState, key: PRNGKey
    ) -> tuple[MetaParams, ESWorkerState, Metrics]:
        """One truncation of every antithetic pair: ``(estimate, new_state, metrics)``."""
        return _es_estimate(self, theta, worker_state, key)


@jax.jit
def _es_init(est: TruncatedES, theta: MetaParams, key: PRNGKey) -> ESWorkerState:
    inner = est.truncated_step.init_states(theta, key, est.num_tasks,
                                           random_offset=est.random_initial_offset)
    return ESWorkerState(inner=inner, iteration=jnp.zeros((), jnp.int32))


@jax.jit
def _es_estimate(est: TruncatedES, theta: MetaParams, ws: ESWorkerState,
                 key: PRNGKey) -> tuple[MetaParams, ESWorkerState, Metrics]:
    ts = est.truncated_step
    k_eps, k_unroll = jax.random.split(key)
    eps = sample_perturbations(theta, k_eps, est.num_tasks, est.std)
    pair = antithetic_unroll(ts, perturbed_pair(theta, eps), stack_pair(ws.inner, ws.inner),
                             k_unroll, est.unroll_length, ws.iteration)
    per_particle = pair.post_loss.mean(axis=1)  # [2, N]
    delta = per_particle[0] - per_particle[1]
    coef = delta_coefficient(delta, est.std, est.sign_delta_loss)
    grad, finite, num_finite = combine([(coef, eps)])
    inner_steps = 2 * est.unroll_length * est.num_tasks
    if est.advance == "unperturbed":
        new_inner, _ = ts.unroll(theta, ws.inner, jax.random.split(k_unroll)[0],
                                 est.unroll_length, iteration=ws.iteration)
        inner_steps += est.unroll_length * est.num_tasks
    else:
        new_inner = pair_index(pair.states, 0)
    new_inner = restart_where(ts, new_inner, ~finite)
    metrics = pair_metrics(pair, per_particle, finite, num_finite, delta, inner_steps)
    return grad, ESWorkerState(inner=new_inner, iteration=ws.iteration + 1), metrics


class ESSettings(TruncatedStepSettings):
    """The fields of the antithetic ES estimators (ES, PES, full ES); ``num_tasks`` counts the
    antithetic particles."""

    std: float = Field(0.01, gt=0)  # σ of each coordinate of the perturbation ε
    sign_delta_loss: bool = False
    meta_loss_split: Literal["train", "eval"] = "train"  # the data split of the meta-loss

    def es_fields(self, family: TaskFamily, learned_opt: Any) -> dict[str, Any]:
        """The constructor arguments every ES estimator shares."""
        step = self.truncated_step(family, learned_opt,
                                   eval_split_loss=self.meta_loss_split == "eval")
        return {"truncated_step": step, "num_tasks": self.num_tasks, "std": self.std,
                "sign_delta_loss": self.sign_delta_loss}


@register_estimator
class TruncatedESConfig(ESSettings):
    """``estimator: {name: es}``: :class:`TruncatedES`."""

    name: Literal["es"] = "es"
    random_initial_offset: bool = False  # desynchronize the problems' restarts
    es_advance: Literal["positive", "unperturbed"] = "positive"  # the carried state

    def build(self, family: TaskFamily, learned_opt: Any) -> TruncatedES:
        """The :class:`TruncatedES` of these settings."""
        return TruncatedES(**self.es_fields(family, learned_opt),
                           unroll_length=self.unroll_length,
                           random_initial_offset=self.random_initial_offset,
                           advance=self.es_advance)
