"""Objects built from a :class:`~l2o.io.config.TrainConfig`, and the run's key schedule.

The single-machine trainer and the distributed service both build their pieces here, with the same
keys, so that one worker with ``max_staleness=0`` reproduces the single-machine run exactly.
"""

from __future__ import annotations

import functools

import jax
import optax

from l2o.estimators import GradientEstimator, TruncatedBackprop, TruncatedStep
from l2o.io.config import EstimatorConfig, MetaOptimizerConfig, OptimizerConfig, TaskConfig
from l2o.optimizers.base import LearnedOptimizer
from l2o.tasks.base import TaskFamily
from l2o.types import PRNGKey


def task_family_from_config(cfg: TaskConfig) -> TaskFamily:
    """The task family named by ``cfg`` (see ``l2o.tasks.registry``)."""
    from l2o.tasks.registry import make_task_family

    return make_task_family(cfg.name, **cfg.kwargs)


def learned_optimizer_from_config(cfg: OptimizerConfig) -> LearnedOptimizer:
    """The learned optimizer named by ``cfg`` (see ``l2o.optimizers.registry``)."""
    from l2o.optimizers.registry import make_learned_optimizer

    return make_learned_optimizer(cfg.name, **cfg.kwargs)


def estimator_from_config(cfg: EstimatorConfig, family: TaskFamily,
                          learned_opt: LearnedOptimizer) -> GradientEstimator:
    """The meta-gradient estimator described by ``cfg``."""
    if cfg.name != "tbptt":  # L2O-Scale's enhancements are defined on truncated backprop only
        if cfg.reg_option != "none":
            raise ValueError(f"estimator.reg_option={cfg.reg_option!r} needs estimator.name "
                             f"'tbptt' (got {cfg.name!r}); set reg_option: none")
        if cfg.mt_ratio > 0:
            raise ValueError(f"estimator.mt_ratio={cfg.mt_ratio} (imitation) needs estimator.name "
                             f"'tbptt' (got {cfg.name!r}); set mt_ratio: 0")
    if cfg.name == "unsupervised":  # the unsupervised update rule: l2o.unsupervised.estimator
        from l2o.unsupervised.estimator import unsupervised_estimator

        return unsupervised_estimator(family, learned_opt, cfg.num_tasks, cfg.unroll_length,
                                      cfg.num_steps)
    from l2o.estimators import PES, FullES, TruncatedES, make_horizon_schedule
    from l2o.estimators.imitation import Imitation

    imitation = None
    if cfg.mt_ratio > 0:
        from l2o.optimizers.mixed import MixedOptimizer

        if isinstance(learned_opt, MixedOptimizer):
            raise ValueError("estimator.mt_ratio > 0 (imitation) does not support the 'mixed' "
                             "optimizer; set mt_ratio: 0")
        imitation = Imitation(ratio=cfg.mt_ratio, steps=cfg.mt_k * cfg.unroll_length,
                              teacher_lr=cfg.mt_teacher_lr)
    schedule = make_horizon_schedule(
        cfg.horizon_schedule, cfg.num_steps, cfg.horizon_min, cfg.horizon_max,
        cfg.horizon_start_min, cfg.horizon_start_max, cfg.horizon_ramp)
    step = TruncatedStep(
        family=family,
        learned_opt=learned_opt,
        num_steps=cfg.num_steps,
        second_derivatives=cfg.second_derivatives,
        horizon_schedule=schedule,
        eval_split_loss=cfg.name != "tbptt" and cfg.meta_loss_split == "eval",
        imitation=imitation,
    )
    if cfg.name == "tbptt":
        return TruncatedBackprop(
            truncated_step=step,
            num_tasks=cfg.num_tasks,
            unroll_length=cfg.unroll_length,
            meta_loss_reduction=cfg.meta_loss_reduction,
            reg_option=cfg.reg_option,
            reg_alpha=cfg.reg_alpha,
        )
    es_common = {"truncated_step": step, "num_tasks": cfg.num_tasks, "std": cfg.std,
                 "sign_delta_loss": cfg.sign_delta_loss}
    if cfg.name == "es":
        return TruncatedES(**es_common, unroll_length=cfg.unroll_length,
                           random_initial_offset=cfg.random_initial_offset,
                           advance=cfg.es_advance)
    if cfg.name == "pes":
        return PES(**es_common, unroll_length=cfg.unroll_length,
                   random_initial_offset=cfg.random_initial_offset)
    if cfg.name == "full_es":
        return FullES(**es_common, loss_type=cfg.full_es_loss,
                      recompute_batches=cfg.full_es_recompute_batches)
    raise ValueError(f"unknown estimator {cfg.name!r}")


def meta_optimizer_from_config(cfg: MetaOptimizerConfig) -> optax.GradientTransformation:
    """The optax transformation applied to θ: optional global-norm clipping, then the optimizer.

    Equal configs give the *same* object, so jitted code taking it as a static argument compiles
    once per process.
    """
    return _meta_optimizer(cfg.name, cfg.learning_rate, cfg.clip_norm)


@functools.lru_cache(maxsize=64)
def _meta_optimizer(name: str, learning_rate: float,
                    clip_norm: float | None) -> optax.GradientTransformation:
    makers = {"adam": optax.adam, "rmsprop": optax.rmsprop, "sgd": optax.sgd}
    tx = makers[name](learning_rate)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx


# The key schedule. Purpose tags keep the streams independent of each other.
_THETA, _WORKER_INIT, _TRUNCATION, _EVAL, _VALIDATION = 0, 1, 2, 3, 4


def theta_key(seed: int) -> PRNGKey:
    """The key θ is initialized from."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), _THETA)


def worker_init_key(seed: int, worker_index: int) -> PRNGKey:
    """The key worker ``worker_index`` draws its inner problems from."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _WORKER_INIT),
                              worker_index)


def truncation_key(seed: int, worker_index: int, seq: int) -> PRNGKey:
    """The key of truncation number ``seq`` on worker ``worker_index``."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), _TRUNCATION)
    return jax.random.fold_in(jax.random.fold_in(base, worker_index), seq)


def eval_key(seed: int) -> PRNGKey:
    """The key evaluation draws fresh initializations from."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), _EVAL)


def validation_key(seed: int) -> PRNGKey:
    """The key periodic evaluations draw initializations from when they *select* θ (the best
    checkpoint of ``evaluation_period``, the curriculum's best of a stage).

    Disjoint from :func:`eval_key`, so the reported evaluation is never the one θ was chosen on.
    """
    return jax.random.fold_in(jax.random.PRNGKey(seed), _VALIDATION)


def validation_task_and_run_key(seed: int, family) -> tuple:
    """``(task, key)`` for selecting θ: the eval task of :func:`eval_key` (same problem), with
    fresh initializations and batches from :func:`validation_key`."""
    k_task, _ = jax.random.split(eval_key(seed))
    return family.sample_task(k_task), validation_key(seed)
