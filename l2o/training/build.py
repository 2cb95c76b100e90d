"""Objects built from a :class:`~l2o.io.config.TrainConfig`, and the run's key schedule.

The single-machine trainer and the distributed service both build their pieces here, with the same
keys, so that one worker with ``max_staleness=0`` reproduces the single-machine run exactly.
"""

from __future__ import annotations

import functools

import jax
import optax

from l2o.estimators import GradientEstimator
from l2o.io.config import EstimatorConfig, MetaOptimizerConfig, OptimizerConfig, TaskConfig
from l2o.optimizers.base import LearnedOptimizer
from l2o.tasks.base import TaskFamily
from l2o.types import PRNGKey
from l2o.unsupervised.rule import LearnedUpdateRule


def task_family_from_config(cfg: TaskConfig) -> TaskFamily:
    """The task family named by ``cfg`` (see ``l2o.tasks.registry``)."""
    from l2o.tasks.registry import make_task_family

    return make_task_family(cfg.name, **cfg.kwargs)


def learned_optimizer_from_config(cfg: OptimizerConfig) -> LearnedOptimizer | LearnedUpdateRule:
    """The learned optimizer (or learned update rule) that ``cfg`` names; either way its
    ``init(key)`` draws θ."""
    return cfg.build()


def estimator_from_config(cfg: EstimatorConfig, family: TaskFamily,
                          learned_opt: LearnedOptimizer | LearnedUpdateRule) -> GradientEstimator:
    """The meta-gradient estimator described by ``cfg`` (see ``l2o.estimators.registry``)."""
    return cfg.build(family, learned_opt)


def meta_optimizer_from_config(cfg: MetaOptimizerConfig) -> optax.GradientTransformation:
    """The optax transformation applied to θ: optional global-norm clipping, then the optimizer
    at a constant or cosine-decayed learning rate.

    Equal configs give the *same* object, so jitted code taking it as a static argument compiles
    once per process.
    """
    decay = (cfg.decay_steps, cfg.final_fraction) if cfg.schedule == "cosine" else None
    return _meta_optimizer(cfg.name, cfg.learning_rate, cfg.clip_norm, decay)


@functools.lru_cache(maxsize=64)
def _meta_optimizer(name: str, learning_rate: float, clip_norm: float | None,
                    decay: tuple[int, float] | None) -> optax.GradientTransformation:
    makers = {"adam": optax.adam, "rmsprop": optax.rmsprop, "sgd": optax.sgd}
    lr = learning_rate if decay is None else optax.cosine_decay_schedule(
        learning_rate, decay_steps=decay[0], alpha=decay[1])
    tx = makers[name](lr)
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
