"""Meta-gradients for the unsupervised update rule: truncated backprop through its applications.

The worker side holds ``num_tasks`` base models (vmapped) and their step counters; θ (the rule's
meta-parameters) is all the learner ever sees. One call of
:meth:`UnsupervisedEstimator.compute_gradient_estimate`:

1. re-initializes every base model that has had ``num_steps`` applications of the rule;
2. applies the rule ``unroll_length`` times to each model (``lax.scan``), each time on a fresh
   class-balanced batch of unlabelled inputs drawn inside ``jit``;
3. scores the final models by the ridge meta-objective (:mod:`l2o.metaobjectives.ridge`): the
   features of two class-balanced batches are computed in one forward pass, ridge is fit on the
   first and scored on the second;
4. returns ∂(mean meta-loss)/∂θ, the models after the truncation (gradients stopped) and metrics.

Metrics: ``meta_loss`` (the ridge meta-objective after the truncation, = ``final_inner_loss``),
``inner_loss`` (the same objective on the models *before* the truncation, not differentiated: how
good the features were when it started), ``ridge_accuracy`` (scoring-batch accuracy after it),
``resets`` and ``inner_steps`` (rule applications in this call, over all models).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

from l2o.estimators.base import GradientEstimator, Metrics
from l2o.estimators.registry import EstimatorSettings, register_estimator
from l2o.metaobjectives.ridge import ridge_meta_objective
from l2o.types import MetaParams, PRNGKey
from l2o.unsupervised.data import UnsupervisedFamily
from l2o.unsupervised.rule import LearnedUpdateRule


@struct.dataclass
class UnsupervisedWorkerState:
    """Local-side state: ``num_tasks`` base models (leading axis) and their rule-step counters."""

    params: Any  # BaseParams with a leading [num_tasks] axis
    step: jax.Array  # int32 [num_tasks]: applications of the rule since the last reset


def ridge_objective_of(family: UnsupervisedFamily, params: Any,
                       key: PRNGKey, split: str = "train") -> tuple[jax.Array, Any]:
    """``(loss, RidgeStats)`` of one base model's features: ridge fit on one class-balanced batch
    of ``split`` and scored on a second (both through one forward pass)."""
    k_fit, k_score = jax.random.split(key)
    spc = family.samples_per_class
    x_fit, y_fit = family.data.sample_balanced(k_fit, spc, split)
    x_score, y_score = family.data.sample_balanced(k_score, spc, split)
    feats = family.model.features(params, jnp.concatenate([x_fit, x_score], axis=0))
    n = x_fit.shape[0]
    return ridge_meta_objective(feats[:n], y_fit, feats[n:], y_score, family.data.num_classes,
                                ridge_factor=family.ridge_factor, hinge_loss=family.hinge_loss)


def apply_rule_steps(rule: Any, family: UnsupervisedFamily, theta: MetaParams, params: Any,
                     key: PRNGKey, num_steps: int, split: str = "train") -> Any:
    """One base model after ``num_steps`` applications of ``rule`` (``lax.scan``), each on a fresh
    class-balanced batch of ``split``. Differentiable with respect to θ."""
    def body(p, k):
        k_batch, k_rule = jax.random.split(k)
        x = family.rule_batch(k_batch, split)
        return rule.apply(theta, family.model, p, x, k_rule), None

    params, _ = jax.lax.scan(body, params, jax.random.split(key, num_steps))
    return params


@struct.dataclass
class UnsupervisedEstimator(GradientEstimator):
    """Truncated backprop of the ridge meta-objective through ``unroll_length`` rule
    applications on each of ``num_tasks`` base models; models restart after ``num_steps``."""

    family: UnsupervisedFamily
    rule: LearnedUpdateRule = struct.field(pytree_node=False)
    num_tasks: int = struct.field(pytree_node=False, default=4)
    unroll_length: int = struct.field(pytree_node=False, default=5)
    num_steps: int = struct.field(pytree_node=False, default=100)

    estimator_name = "unsupervised"

    def init_worker_state(self, theta: MetaParams, key: PRNGKey) -> UnsupervisedWorkerState:
        """``num_tasks`` fresh base models at step 0."""
        return _init_worker_state(self, key)

    def compute_gradient_estimate(
        self, theta: MetaParams, worker_state: UnsupervisedWorkerState, key: PRNGKey
    ) -> tuple[MetaParams, UnsupervisedWorkerState, Metrics]:
        """One truncation: ``(∂meta_loss/∂θ, new worker state, metrics)``."""
        return _compute_gradient_estimate(self, theta, worker_state, key)

    def meta_loss(self, theta: MetaParams, state: UnsupervisedWorkerState,
                  key: PRNGKey) -> tuple[jax.Array, tuple[UnsupervisedWorkerState, Metrics]]:
        """The truncation's meta-loss, with the new worker state and metrics as auxiliary."""
        fam, n = self.family, self.num_tasks
        k_reset, k_before, k_unroll, k_after = jax.random.split(key, 4)
        fresh = jax.vmap(fam.model.init)(jax.random.split(k_reset, n))
        done = state.step >= self.num_steps
        params = jax.tree_util.tree_map(
            lambda f, p: jnp.where(done.reshape((n,) + (1,) * (p.ndim - 1)), f, p),
            fresh, state.params)
        step = jnp.where(done, 0, state.step)

        before, _ = jax.vmap(lambda p, k: ridge_objective_of(fam, p, k))(
            jax.lax.stop_gradient(params), jax.random.split(k_before, n))
        params = jax.vmap(
            lambda p, k: apply_rule_steps(self.rule, fam, theta, p, k, self.unroll_length)
        )(params, jax.random.split(k_unroll, n))
        losses, stats = jax.vmap(lambda p, k: ridge_objective_of(fam, p, k))(
            params, jax.random.split(k_after, n))
        meta_loss = losses.mean()
        new_state = UnsupervisedWorkerState(params=params, step=step + self.unroll_length)
        metrics = {
            "meta_loss": meta_loss,
            "inner_loss": jax.lax.stop_gradient(before.mean()),
            "final_inner_loss": meta_loss,
            "ridge_accuracy": stats.accuracy_test.mean(),
            "resets": done.sum(),
            "inner_steps": jnp.asarray(self.unroll_length * n),
        }
        return meta_loss, (new_state, metrics)


@jax.jit
def _init_worker_state(est: UnsupervisedEstimator, key: PRNGKey) -> UnsupervisedWorkerState:
    params = jax.vmap(est.family.model.init)(jax.random.split(key, est.num_tasks))
    return UnsupervisedWorkerState(params=params, step=jnp.zeros((est.num_tasks,), jnp.int32))


@jax.jit
def _compute_gradient_estimate(
    est: UnsupervisedEstimator, theta: MetaParams, state: UnsupervisedWorkerState, key: PRNGKey
) -> tuple[MetaParams, UnsupervisedWorkerState, Metrics]:
    grad, (state, metrics) = jax.grad(est.meta_loss, has_aux=True)(theta, state, key)
    return grad, jax.lax.stop_gradient(state), metrics


@register_estimator
class UnsupervisedEstimatorConfig(EstimatorSettings):
    """``estimator: {name: unsupervised}``: truncated backprop of the ridge meta-objective through
    a learned update rule (:class:`UnsupervisedEstimator`; task ``unsupervised_*``, optimizer
    ``unsupervised_rule``)."""

    name: Literal["unsupervised"] = "unsupervised"

    def build(self, family: Any, learned_opt: Any) -> UnsupervisedEstimator:
        """The estimator, checking that ``family`` and ``learned_opt`` are the unsupervised
        ones."""
        if not isinstance(family, UnsupervisedFamily):
            raise TypeError(f"estimator 'unsupervised' needs an unsupervised task family "
                            f"(unsupervised_digits, unsupervised_tiny_mnist), got "
                            f"{getattr(family, 'name', type(family).__name__)!r}")
        if not isinstance(learned_opt, LearnedUpdateRule):
            raise TypeError(f"estimator 'unsupervised' needs a learned update rule (optimizer "
                            f"'unsupervised_rule'), got "
                            f"{getattr(learned_opt, 'name', type(learned_opt).__name__)!r}")
        return UnsupervisedEstimator(family=family, rule=learned_opt, num_tasks=self.num_tasks,
                                     unroll_length=self.unroll_length, num_steps=self.num_steps)
