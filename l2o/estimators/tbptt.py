"""Truncated backpropagation through time (TBPTT), the estimator of L2L.

Each call unrolls every inner problem for ``unroll_length`` steps under ``opt_fn(θ)`` and
differentiates the meta-loss with respect to θ. The meta-loss of a truncation is the mean (or sum)
of the inner losses seen along it plus the loss of the final parameters on a fresh batch, averaged
over the vmapped problems. Inner gradients are constants unless ``second_derivatives=True``.
Inner problems carry over between calls and restart after ``num_steps`` inner steps.

Two additions of L2O-Scale's enhanced training, both off by default (the program is then the plain
one above):

- ``reg_option`` / ``reg_alpha``: the meta-loss gains ``reg_alpha ×`` a curvature penalty of the
  inner loss (:mod:`l2o.estimators.curvature`: Hessian trace, top eigenvalue or spectrum second
  moment) at
  each problem's final parameters of the truncation, on the batch its final loss is measured on,
  averaged over problems; the meta-gradient reaches θ through those parameters. Reported as the
  metric ``curvature`` (the unweighted penalty).
- imitation, switched on by an :class:`~l2o.estimators.imitation.Imitation` on the truncated step:
  imitated steps contribute their imitation loss instead of their inner loss (rules in
  :mod:`l2o.estimators.imitation`); reported as ``imitation_fraction`` (the fraction of the
  truncation's problem-steps that imitated) and ``imitation_loss``.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct
from pydantic import Field, PositiveInt

from l2o.estimators.base import GradientEstimator, Metrics
from l2o.estimators.curvature import REG_OPTIONS, curvature_penalty
from l2o.estimators.imitation import Imitation
from l2o.estimators.registry import register_estimator
from l2o.estimators.truncated_step import InnerState, TruncatedStep, TruncatedStepSettings
from l2o.optimizers.mixed import MixedOptimizer
from l2o.tasks.base import TaskFamily
from l2o.types import MetaParams, PRNGKey


@struct.dataclass
class TruncatedBackprop(GradientEstimator):
    """Truncated backprop over ``num_tasks`` vmapped inner problems."""

    truncated_step: TruncatedStep
    num_tasks: int = struct.field(pytree_node=False, default=8)
    unroll_length: int = struct.field(pytree_node=False, default=20)
    meta_loss_reduction: Literal["mean", "sum"] = struct.field(pytree_node=False, default="mean")
    #: curvature penalty (``l2o.estimators.curvature.REG_OPTIONS``), its weight, the Rademacher
    # probes of the
    #: trace and spectrum estimates and the power iterations of the top eigenvalue
    reg_option: str = struct.field(pytree_node=False, default="none")
    reg_alpha: float = struct.field(pytree_node=False, default=1e-4)
    reg_num_samples: int = struct.field(pytree_node=False, default=2)
    reg_num_iters: int = struct.field(pytree_node=False, default=10)

    estimator_name = "tbptt"

    def __post_init__(self):
        if self.reg_option not in REG_OPTIONS:
            raise ValueError(f"reg_option must be one of {', '.join(REG_OPTIONS)}; "
                             f"got {self.reg_option!r}")
        if not self.reg_alpha >= 0:
            raise ValueError(f"reg_alpha must be >= 0, got {self.reg_alpha}")

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
        final_keys = jax.random.split(k_final, self.num_tasks)
        final = jax.vmap(ts.final_loss, in_axes=(None, 0, 0))(theta, states, final_keys)
        if out.imitating is None:
            losses = jnp.concatenate([out.loss, final[None]], axis=0)  # [K + 1, num_tasks]
            per_task = losses.mean(0) if self.meta_loss_reduction == "mean" else losses.sum(0)
        else:
            per_task = self._imitation_per_task(out, final)
        meta_loss = per_task.mean()
        extra = {}
        if self.reg_option != "none":
            curv = jax.vmap(self._curvature, in_axes=(None, 0, 0))(theta, states, final_keys)
            extra["curvature"] = curv.mean()
            meta_loss = meta_loss + self.reg_alpha * extra["curvature"]
        if out.imitating is not None:
            extra["imitation_fraction"] = out.imitating.mean()
            n_mt = out.imitating.sum()
            extra["imitation_loss"] = jnp.where(
                n_mt > 0, jnp.sum(jnp.where(out.imitating, out.imitation_loss, 0.0))
                / jnp.maximum(n_mt, 1), 0.0)
        metrics = {
            "meta_loss": meta_loss,
            "inner_loss": out.loss.mean(),
            "final_inner_loss": final.mean(),
            "resets": out.reset.sum(),
            "inner_steps": jnp.asarray(self.unroll_length * self.num_tasks),
            **extra,
        }
        return meta_loss, (states, metrics)

    def _imitation_per_task(self, out, final: jax.Array) -> jax.Array:
        """Each problem's meta-loss when imitation is on (``l2o.estimators.imitation``).

        Imitated steps count their imitation loss, the others their inner loss; the final loss
        counts unless the last step imitated. ``mean`` divides by the number of counted terms.
        """
        terms = jnp.where(out.imitating, out.imitation_loss, out.loss)  # [K, num_tasks]
        keep_final = jnp.logical_not(out.imitating[-1])
        total = terms.sum(0) + jnp.where(keep_final, final, 0.0)
        if self.meta_loss_reduction == "sum":
            return total
        return total / (terms.shape[0] + keep_final.astype(total.dtype))

    def _curvature(self, theta: MetaParams, state: InnerState, key: PRNGKey) -> jax.Array:
        """The curvature penalty of one problem's inner loss at its current parameters.

        Measured on the batch :meth:`TruncatedStep.final_loss` draws from ``key`` (train split);
        the probes use a key derived from it.
        """
        ts = self.truncated_step
        task = ts.family.task(state.task_cfg)
        params = ts.learned_opt.opt_fn(theta).params(state.opt_state)
        batch = task.sample_batch(key)
        return curvature_penalty(self.reg_option, lambda p: task.loss(p, batch), params,
                                 jax.random.fold_in(key, 0xC0AF), self.reg_num_samples,
                                 self.reg_num_iters)


@jax.jit
def _init_worker_state(est: TruncatedBackprop, theta: MetaParams, key: PRNGKey) -> InnerState:
    return est.truncated_step.init_states(theta, key, est.num_tasks)


@jax.jit
def _compute_gradient_estimate(est: TruncatedBackprop, theta: MetaParams, states: InnerState,
                               key: PRNGKey) -> tuple[MetaParams, InnerState, Metrics]:
    grad, (states, metrics) = jax.grad(est.meta_loss, has_aux=True)(theta, states, key)
    states = jax.lax.stop_gradient(states)
    return grad, states, metrics


@register_estimator
class TBPTTConfig(TruncatedStepSettings):
    """``estimator: {name: tbptt}`` (the default): :class:`TruncatedBackprop`, with L2O-Scale's
    enhancements (docs/l2o_scale.md).

    Meta-loss += ``reg_alpha`` × a curvature term of the inner loss at the truncation's final
    parameters (:mod:`l2o.estimators.curvature`), and imitation of Adam(``mt_teacher_lr``) for the
    first ``mt_k`` truncations of an episode chosen with probability ``mt_ratio``
    (:mod:`l2o.estimators.imitation`).
    """

    name: Literal["tbptt"] = "tbptt"
    meta_loss_reduction: Literal["mean", "sum"] = "mean"
    reg_option: Literal["none", "hessian-trace", "hessian-top", "hessian-esd"] = "none"
    reg_alpha: float = Field(1e-4, ge=0)
    mt_ratio: float = Field(0.0, ge=0, le=1)
    mt_k: PositiveInt = 1
    mt_teacher_lr: float = Field(0.01, gt=0)

    def imitation(self, learned_opt: Any) -> Imitation | None:
        """The imitation of Adam these settings ask for (``None`` when ``mt_ratio`` is 0)."""
        if self.mt_ratio == 0:
            return None
        if isinstance(learned_opt, MixedOptimizer):
            raise ValueError("estimator.mt_ratio > 0 (imitation) does not support the 'mixed' "
                             "optimizer; set mt_ratio: 0")
        return Imitation(ratio=self.mt_ratio, steps=self.mt_k * self.unroll_length,
                         teacher_lr=self.mt_teacher_lr)

    def build(self, family: TaskFamily, learned_opt: Any) -> TruncatedBackprop:
        """The :class:`TruncatedBackprop` of these settings."""
        step = self.truncated_step(family, learned_opt, imitation=self.imitation(learned_opt))
        return TruncatedBackprop(truncated_step=step, num_tasks=self.num_tasks,
                                 unroll_length=self.unroll_length,
                                 meta_loss_reduction=self.meta_loss_reduction,
                                 reg_option=self.reg_option, reg_alpha=self.reg_alpha)
