"""Full-horizon antithetic ES: every call trains fresh inner problems for their whole horizon.

Each particle starts a fresh inner problem, runs it for ``num_steps`` steps under ``θ + ε`` and
under ``θ − ε`` (same keys; ``ε ~ N(0, σ² I)``) and compares the meta-losses of the two runs:

- ``"mean"``: the mean of the post-step losses over the horizon (the meta-loss PES targets, see
  :mod:`l2o.estimators.es`; PES's estimates summed over one horizon agree with it in expectation,
  up to the factor ``num_steps / unroll_length``);
- ``"last"``: the loss of the final parameters (on one fresh batch);
- ``"last_recomputed"``: the loss of the final parameters averaged over ``recompute_batches``
  fresh batches (of the evaluation split when ``TruncatedStep.eval_split_loss`` is set), a less
  noisy final loss.

The estimate, ``sign_delta_loss`` and the NaN guard are those of :mod:`l2o.estimators.es`. A horizon
schedule of the truncated step is ignored: the horizon is ``num_steps``, a static scan length.
No inner state persists; the worker state only counts calls.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct
from pydantic import PositiveInt

from l2o.estimators.base import GradientEstimator, Metrics
from l2o.estimators.es import (
    ESSettings,
    antithetic_unroll,
    combine,
    delta_coefficient,
    pair_metrics,
    perturbed_pair,
    sample_perturbations,
    stack_pair,
)
from l2o.estimators.registry import register_estimator
from l2o.estimators.truncated_step import TruncatedStep
from l2o.tasks.base import TaskFamily
from l2o.types import MetaParams, PRNGKey


@struct.dataclass
class FullESWorkerState:
    """Full ES keeps no inner problems between calls, only a call counter."""

    iteration: jax.Array  # int32


@struct.dataclass
class FullES(GradientEstimator):
    """Antithetic ES on whole inner trainings of ``truncated_step.num_steps`` steps."""

    truncated_step: TruncatedStep
    num_tasks: int = struct.field(pytree_node=False, default=8)
    std: float = struct.field(pytree_node=False, default=0.01)
    sign_delta_loss: bool = struct.field(pytree_node=False, default=False)
    loss_type: Literal["mean", "last", "last_recomputed"] = struct.field(pytree_node=False,
                                                                         default="mean")
    recompute_batches: int = struct.field(pytree_node=False, default=8)

    estimator_name = "full_es"

    def init_worker_state(self, theta: MetaParams, key: PRNGKey) -> FullESWorkerState:
        """A zero call counter (inner problems are drawn fresh by every call)."""
        return FullESWorkerState(iteration=jnp.zeros((), jnp.int32))

    def compute_gradient_estimate(
        self, theta: MetaParams, worker_state: FullESWorkerState, key: PRNGKey
    ) -> tuple[MetaParams, FullESWorkerState, Metrics]:
        """Whole-horizon antithetic runs of fresh problems: ``(estimate, state, metrics)``."""
        return _full_es_estimate(self, theta, worker_state, key)


@jax.jit
def _full_es_estimate(est: FullES, theta: MetaParams, ws: FullESWorkerState,
                      key: PRNGKey) -> tuple[MetaParams, FullESWorkerState, Metrics]:
    ts = est.truncated_step.replace(horizon_schedule=None)
    k_init, k_eps, k_unroll, k_recompute = jax.random.split(key, 4)
    states = ts.init_states(theta, k_init, est.num_tasks)
    eps = sample_perturbations(theta, k_eps, est.num_tasks, est.std)
    pair = antithetic_unroll(ts, perturbed_pair(theta, eps), stack_pair(states, states), k_unroll,
                             ts.num_steps, ws.iteration)
    if est.loss_type == "mean":
        per_particle = pair.post_loss.mean(axis=1)
    elif est.loss_type == "last":
        per_particle = pair.post_loss[:, -1]
    elif est.loss_type == "last_recomputed":
        split = "eval" if ts.eval_split_loss else "train"
        keys = jax.random.split(k_recompute, est.recompute_batches * est.num_tasks)
        keys = keys.reshape((est.recompute_batches, est.num_tasks) + keys.shape[1:])
        thetas = perturbed_pair(theta, eps)

        def losses(th, st):  # [recompute_batches, N] for one half of the pair
            per_task = jax.vmap(lambda t, s, k: ts.final_loss(t, s, k, split))
            return jax.vmap(lambda k: per_task(th, st, k))(keys)

        per_particle = jax.vmap(losses)(thetas, pair.states).mean(axis=1)
    else:
        raise ValueError(f"unknown full ES loss {est.loss_type!r}")
    delta = per_particle[0] - per_particle[1]
    grad, finite, num_finite = combine([(delta_coefficient(delta, est.std, est.sign_delta_loss),
                                         eps)])
    metrics = pair_metrics(pair, per_particle, finite, num_finite, delta,
                           2 * ts.num_steps * est.num_tasks)
    return grad, FullESWorkerState(iteration=ws.iteration + 1), metrics


@register_estimator
class FullESConfig(ESSettings):
    """``estimator: {name: full_es}``: :class:`FullES` (``unroll_length`` is not used)."""

    name: Literal["full_es"] = "full_es"
    full_es_loss: Literal["mean", "last", "last_recomputed"] = "mean"
    full_es_recompute_batches: PositiveInt = 8

    def build(self, family: TaskFamily, learned_opt: Any) -> FullES:
        """The :class:`FullES` of these settings."""
        return FullES(**self.es_fields(family, learned_opt), loss_type=self.full_es_loss,
                      recompute_batches=self.full_es_recompute_batches)
