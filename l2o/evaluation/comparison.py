"""Evaluation: loss curves, a tuned-Adam baseline sweep and the speedup of a learned optimizer.

Protocol
--------
Every evaluation run trains ``seeds`` fresh initializations of one :class:`~l2o.tasks.Task` for
``steps`` inner steps. Seed ``i`` uses ``k_i = jax.random.split(key, seeds)[i]``; from it
``k_init, k_run = jax.random.split(k_i)``: the parameters are ``task.init(k_init)`` and step ``t``
(0-based) draws its batch and optimizer key from ``jax.random.split(jax.random.fold_in(k_run, t))``.
The same ``key`` therefore gives the learned optimizer and Adam the *same* initializations and the
*same* batches (paired comparison).

A loss curve has ``steps + 1`` entries. Entry ``t < steps`` is the loss of the parameters *before*
update ``t`` -- entry 0 is the loss at initialization -- and entry ``steps`` is the loss after the
last update. What the loss is measured on depends on ``loss_on``:

* ``"batch"`` (default, free): entry ``t`` is the loss on the training batch that step ``t`` takes
  its gradient from; the last entry is on one more fresh training batch. Noisy for minibatch tasks.
* ``"eval"`` (one extra forward pass per step): every entry is the loss on one fixed evaluation
  batch, ``task.sample_eval_batch`` drawn once from ``fold_in(key, EVAL_BATCH_TAG)`` and shared by
  all seeds (held-out data where the task has a split; the task decides its size).

For tasks without data (quadratics) both are the exact objective.

The *final loss* of a set of curves is the mean over seeds of the mean of each curve's last
``final_window`` entries (``final_window = 1``: the last entry only). Averaging a few steps damps
minibatch noise. A non-finite final loss (a diverged run) ranks worst.

Everything runs in one jitted function: ``lax.scan`` over steps, ``vmap`` over seeds (and over
learning rates for the Adam sweep). The task and θ are jit *arguments* (never constants baked into
the program); the learned optimizer and the step count are static.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2o.io.config import EvalConfig
from l2o.optimizers.base import LearnedOptimizer, Optimizer
from l2o.optimizers.baselines import OptaxOptimizer
from l2o.tasks.base import Task
from l2o.types import MetaParams, PRNGKey

LossOn = Literal["batch", "eval"]

#: Tag folded into the evaluation key to draw the fixed evaluation batch (``loss_on="eval"``).
EVAL_BATCH_TAG = 0x5EED

#: Default learning-rate grid of the Adam sweep (log-spaced, from
# :class:`~l2o.io.config.EvalConfig`).
DEFAULT_ADAM_LEARNING_RATES: tuple[float, ...] = tuple(EvalConfig().adam_learning_rates)

#: Keys of :func:`evaluate`'s result that hold per-step curves (lists) rather than summary values.
CURVE_KEYS: tuple[str, ...] = ("learned_mean", "learned_std", "adam_mean", "adam_std")


# ---------------------------------------------------------------------------------------------
# The jitted core


def _run_one(task: Task, theta: MetaParams, key: PRNGKey, eval_batch: Any, *,
             learned_opt: LearnedOptimizer, steps: int,
             loss_on: LossOn) -> tuple[jax.Array, Any]:
    """One seed's curve, shape ``[steps + 1]`` (unbatched; see the module docstring), and its
    final parameters."""
    k_init, k_run = jax.random.split(key)
    opt: Optimizer = learned_opt.opt_fn(theta, is_training=False)
    params = task.init(k_init)
    state = opt.init(params, num_steps=steps, key=jax.random.fold_in(k_init, 1))

    def measure(p, batch):
        return task.loss(p, eval_batch if loss_on == "eval" else batch)

    def body(state, t):
        k_batch, k_opt = jax.random.split(jax.random.fold_in(k_run, t))
        batch = task.sample_batch(k_batch)
        p = opt.params(state)
        loss, grads = jax.value_and_grad(task.loss)(p, batch)
        recorded = loss if loss_on == "batch" else measure(p, batch)
        state = opt.update(state, grads, loss=loss, key=k_opt)
        return state, recorded

    state, losses = jax.lax.scan(body, state, jnp.arange(steps))
    k_last, _ = jax.random.split(jax.random.fold_in(k_run, steps))
    last = measure(opt.params(state), task.sample_batch(k_last))
    return jnp.concatenate([losses, last[None].astype(losses.dtype)]), opt.params(state)


def _run_seeds(task, theta, keys, eval_key, *, learned_opt, steps, loss_on):
    eval_batch = task.sample_eval_batch(eval_key) if loss_on == "eval" else ()
    run = functools.partial(_run_one, learned_opt=learned_opt, steps=steps, loss_on=loss_on)
    return jax.vmap(run, in_axes=(None, None, 0, None))(task, theta, keys, eval_batch)


_STATIC = ("learned_opt", "steps", "loss_on")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _curves_jit(task, theta, keys, eval_key, *, learned_opt, steps, loss_on):
    return _run_seeds(task, theta, keys, eval_key, learned_opt=learned_opt, steps=steps,
                      loss_on=loss_on)[0]


@functools.partial(jax.jit, static_argnames=("learned_opt", "steps"))
def _test_accuracy_jit(task, theta, keys, *, learned_opt, steps):
    _, params = _run_seeds(task, theta, keys, None, learned_opt=learned_opt, steps=steps,
                           loss_on="batch")
    test = {"x": task.data.test_x, "y": task.data.test_y}
    return jax.vmap(task.accuracy, in_axes=(0, None))(params, test)


def final_test_accuracy(task: Task, learned_opt: LearnedOptimizer, theta: MetaParams, steps: int,
                  seeds: int, key: PRNGKey) -> np.ndarray | None:
    """Accuracy on the whole test split after ``steps`` steps, per seed (``[seeds]``).

    Same seeds and batches as :func:`loss_curves` with the same ``key``. ``None`` for tasks that
    are not classifiers of a dataset with a test split.
    """
    if not (hasattr(task, "accuracy") and hasattr(getattr(task, "data", None), "test_x")):
        return None
    _check_counts(steps, seeds)
    keys = jax.random.split(key, int(seeds))
    return np.asarray(_test_accuracy_jit(task, theta, keys, learned_opt=learned_opt,
                                         steps=int(steps)), dtype=np.float64)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _curves_many_jit(task, thetas, keys, eval_key, *, learned_opt, steps, loss_on):
    """Curves for a stack of θ (leading axis), shape ``[num_theta, seeds, steps + 1]``."""
    run = functools.partial(_run_seeds, learned_opt=learned_opt, steps=steps, loss_on=loss_on)
    return jax.vmap(run, in_axes=(None, 0, None, None))(task, thetas, keys, eval_key)[0]


def _check_loss_on(loss_on: str) -> None:
    if loss_on not in ("batch", "eval"):
        raise ValueError(f"loss_on must be 'batch' or 'eval', got {loss_on!r}")


def _check_counts(steps: int, seeds: int) -> None:
    if int(steps) < 1 or int(seeds) < 1:
        raise ValueError(f"steps and seeds must be >= 1, got steps={steps}, seeds={seeds}")


def loss_curves(task: Task, learned_opt: LearnedOptimizer, theta: MetaParams, steps: int,
                seeds: int, key: PRNGKey, *, loss_on: LossOn = "batch") -> np.ndarray:
    """Loss curves of ``learned_opt.opt_fn(theta)`` on ``seeds`` fresh initializations of ``task``.

    Returns a float array of shape ``[seeds, steps + 1]``; entry ``[i, 0]`` is seed ``i``'s loss at
    initialization. ``loss_on`` picks the training batch of each step (``"batch"``) or a fixed
    evaluation batch (``"eval"``); see the module docstring for the exact protocol and keys.
    ``theta`` may be ``{}`` (hand-designed baselines).
    """
    _check_loss_on(loss_on)
    _check_counts(steps, seeds)
    keys = jax.random.split(key, int(seeds))
    out = _curves_jit(task, theta, keys, jax.random.fold_in(key, EVAL_BATCH_TAG),
                      learned_opt=learned_opt, steps=int(steps), loss_on=loss_on)
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------
# Summaries


def final_loss(curves: np.ndarray, final_window: int = 1) -> float:
    """Mean over seeds of the mean of the last ``final_window`` entries of ``curves`` [seeds, T].

    Non-finite values propagate (a diverged seed makes the final loss non-finite).
    """
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim == 1:
        curves = curves[None]
    w = max(1, min(int(final_window), curves.shape[-1]))
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.mean(curves[:, -w:]))


@dataclasses.dataclass(frozen=True)
class CurveResult:
    """Loss curves of several seeds and their summary.

    ``curves`` is ``[seeds, steps + 1]``; ``mean`` and ``std`` are over seeds; ``final_loss`` is
    :func:`final_loss` with ``final_window``.
    """

    curves: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    final_loss: float
    final_window: int

    @classmethod
    def from_curves(cls, curves: np.ndarray, final_window: int = 1) -> CurveResult:
        """Summarize ``curves`` of shape ``[seeds, steps + 1]``."""
        curves = np.asarray(curves, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            mean, std = curves.mean(axis=0), curves.std(axis=0)
        return cls(curves=curves, mean=mean, std=std,
                   final_loss=final_loss(curves, final_window), final_window=int(final_window))

    @property
    def steps(self) -> int:
        """Number of inner steps the curves span."""
        return int(self.curves.shape[-1]) - 1


def _rank_key(x: float) -> float:
    """Sort key for final losses: non-finite ranks worst."""
    return float(x) if math.isfinite(x) else math.inf


# ---------------------------------------------------------------------------------------------
# The tuned-Adam sweep


@dataclasses.dataclass(frozen=True)
class _AdamLR(LearnedOptimizer):
    """Adam whose learning rate is θ (``{"lr": scalar}``), so a sweep can ``vmap`` over it."""

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def init(self, key: PRNGKey) -> MetaParams:
        return {"lr": jnp.asarray(1e-3, jnp.float32)}

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> Optimizer:
        tx = optax.inject_hyperparams(optax.adam)(
            learning_rate=theta["lr"], b1=self.b1, b2=self.b2, eps=self.eps)
        return OptaxOptimizer(tx, "adam")


@dataclasses.dataclass(frozen=True)
class AdamSweep:
    """Result of :func:`tuned_adam`.

    ``learning_rates[j]`` scored ``final_losses[j]`` (non-finite: diverged) with curves
    ``all_curves[j]`` (``[seeds, steps + 1]``); ``best_lr`` has the lowest final loss and
    ``best`` its :class:`CurveResult`.
    """

    best_lr: float
    best: CurveResult
    learning_rates: tuple[float, ...]
    final_losses: tuple[float, ...]
    all_curves: np.ndarray


def tuned_adam(task: Task, steps: int, seeds: int, key: PRNGKey,
               learning_rates: Sequence[float] = DEFAULT_ADAM_LEARNING_RATES, *,
               loss_on: LossOn = "batch", final_window: int = 1, b1: float = 0.9,
               b2: float = 0.999, eps: float = 1e-8) -> AdamSweep:
    """Adam at every learning rate in ``learning_rates``; the best one by final loss.

    All learning rates run in one compiled program (``vmap`` over the learning rate, which is a
    traced argument via ``optax.inject_hyperparams``) on the same seeds and batches as
    :func:`loss_curves` with the same ``key``. Each learning rate's curves equal those of
    ``l2o.optimizers.baselines.adam(lr)`` up to float rounding. Ties go to the first listed.
    """
    _check_loss_on(loss_on)
    _check_counts(steps, seeds)
    lrs = tuple(float(lr) for lr in learning_rates)
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise ValueError(f"learning_rates must be non-empty and positive, got {learning_rates}")
    keys = jax.random.split(key, int(seeds))
    thetas = {"lr": jnp.asarray(lrs, jnp.float32)}
    all_curves = np.asarray(
        _curves_many_jit(task, thetas, keys, jax.random.fold_in(key, EVAL_BATCH_TAG),
                         learned_opt=_AdamLR(b1=float(b1), b2=float(b2), eps=float(eps)),
                         steps=int(steps), loss_on=loss_on),
        dtype=np.float64)
    finals = tuple(final_loss(c, final_window) for c in all_curves)
    best = min(range(len(lrs)), key=lambda j: _rank_key(finals[j]))
    return AdamSweep(best_lr=lrs[best],
                     best=CurveResult.from_curves(all_curves[best], final_window),
                     learning_rates=lrs, final_losses=finals, all_curves=all_curves)


# ---------------------------------------------------------------------------------------------
# Speedup


@dataclasses.dataclass(frozen=True)
class Speedup:
    """How much faster the learned optimizer reached its final loss than tuned Adam.

    ``speedup = adam_steps_to_match / learned_steps``; above 1 the learned optimizer is faster.
    If Adam never matched within its horizon ``H`` (``reached`` is False), ``adam_steps_to_match``
    is None and ``speedup = H / learned_steps`` is only a *lower bound* (the true value is larger).
    """

    speedup: float
    adam_steps_to_match: int | None
    reached: bool
    target_loss: float
    learned_steps: int
    adam_steps: int

    @property
    def lower_bound(self) -> bool:
        """True when ``speedup`` is a lower bound (Adam never reached the target)."""
        return not self.reached

    def __str__(self) -> str:
        return f"{'>' if self.lower_bound else ''}{self.speedup:.3g}x"


def _trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean of ``x[max(0, t - window + 1) : t + 1]`` for every ``t`` (exact for ``window=1``)."""
    if window <= 1:
        return x
    return np.array([x[max(0, t - window + 1):t + 1].mean() for t in range(len(x))])


def speedup(learned_curve: np.ndarray, adam_curve: np.ndarray, *, window: int = 1) -> Speedup:
    """Speedup of a learned optimizer over (tuned) Adam, from their mean loss curves.

    Curves are 1-D (a ``[seeds, T]`` array is averaged over seeds first) with entry ``t`` the loss
    after ``t`` steps. With ``N = len(learned_curve) - 1`` and ``H = len(adam_curve) - 1``:

    * the target is the learned final loss, the mean of the learned curve's last ``window`` entries;
    * ``adam_steps_to_match`` is the first ``t`` at which Adam's trailing ``window``-mean
      (fewer entries near ``t = 0``) is ``<=`` the target;
    * ``speedup = adam_steps_to_match / N``: 2.0 means Adam needed twice the steps.

    Adam never matching gives ``reached=False`` and the lower bound ``H / N``. A non-finite target
    (the learned run diverged) counts as matched at step 0: speedup 0. Non-finite Adam losses
    never match.
    """
    lc = np.asarray(learned_curve, dtype=np.float64)
    ac = np.asarray(adam_curve, dtype=np.float64)
    if lc.ndim == 2:
        lc = lc.mean(axis=0)
    if ac.ndim == 2:
        ac = ac.mean(axis=0)
    if lc.ndim != 1 or ac.ndim != 1 or len(lc) < 2 or len(ac) < 1:
        raise ValueError("speedup needs 1-D curves; the learned one with at least 2 entries")
    n, h = len(lc) - 1, len(ac) - 1
    w = max(1, int(window))
    target = final_loss(lc, w)
    if not math.isfinite(target):
        return Speedup(0.0, 0, True, target, n, h)
    with np.errstate(invalid="ignore", over="ignore"):
        smoothed = _trailing_mean(np.where(np.isfinite(ac), ac, np.inf), w)
        hits = np.flatnonzero(smoothed <= target)
    if hits.size == 0:
        return Speedup(h / n, None, False, target, n, h)
    t = int(hits[0])
    return Speedup(t / n, t, True, target, n, h)


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _json_list(a: np.ndarray) -> list[float | None]:
    return [_json_float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def adam_baseline(task: Task, *, steps: int, seeds: int, key: PRNGKey,
                  adam_learning_rates: Sequence[float] = DEFAULT_ADAM_LEARNING_RATES,
                  adam_steps: int | None = None, loss_on: LossOn = "batch",
                  final_window: int = 1) -> dict[str, Any]:
    """The tuned-Adam side of :func:`evaluate`, as a JSON-ready dict that can be cached.

    Adam is tuned at the evaluated horizon: ``best_lr`` has the lowest loss after ``steps`` steps,
    and ``final_loss``, ``mean`` and ``std`` are that learning rate's. Every learning rate also runs
    on to ``adam_steps`` (default ``steps``); ``lr_means`` holds each one's mean curve over that
    longer horizon, from which :func:`score_against_baseline` measures speedups above 1.
    """
    adam_steps = int(steps if adam_steps is None else adam_steps)
    if adam_steps < steps:
        raise ValueError(f"adam_steps ({adam_steps}) must be at least steps ({steps})")
    sweep = tuned_adam(task, adam_steps, seeds, key, adam_learning_rates, loss_on=loss_on,
                       final_window=final_window)
    at_horizon = sweep.all_curves[:, :, : steps + 1]
    finals = tuple(final_loss(c, final_window) for c in at_horizon)
    best = min(range(len(finals)), key=lambda j: _rank_key(finals[j]))
    best_curves = CurveResult.from_curves(at_horizon[best], final_window)
    return {
        "task": task.name,
        "steps": int(steps),
        "seeds": int(seeds),
        "adam_steps": adam_steps,
        "loss_on": loss_on,
        "final_window": int(final_window),
        "learning_rates": list(sweep.learning_rates),
        "final_losses": [_json_float(x) for x in finals],
        "best_lr": float(sweep.learning_rates[best]),
        "best_at_grid_edge": best in (0, len(finals) - 1),
        "final_loss": _json_float(best_curves.final_loss),
        "mean": _json_list(best_curves.mean),
        "std": _json_list(best_curves.std),
        "lr_means": [_json_list(c.mean(axis=0)) for c in sweep.all_curves],
    }


def _from_json(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def score_against_baseline(learned: CurveResult, baseline: dict[str, Any]) -> dict[str, Any]:
    """The result of :func:`evaluate` from the learned curves and an :func:`adam_baseline`.

    The speedup is the fewest steps any learning rate of the grid needs to reach the learned
    final loss, over the learned run's steps (a lower bound when none gets there).
    """
    window = int(baseline["final_window"])
    per_lr = [speedup(learned.mean, _from_json(m), window=window) for m in baseline["lr_means"]]
    reached = [sp for sp in per_lr if sp.reached]
    sp = min(reached, key=lambda x: x.speedup) if reached else per_lr[0]
    return {
        "task": baseline["task"],
        "steps": learned.steps,
        "seeds": int(learned.curves.shape[0]),
        "adam_steps": baseline["adam_steps"],
        "loss_on": baseline["loss_on"],
        "final_window": window,
        "learned_final_loss": _json_float(learned.final_loss),
        "adam_final_loss": baseline["final_loss"],
        "adam_best_lr": baseline["best_lr"],
        "adam_best_lr_at_grid_edge": baseline["best_at_grid_edge"],
        "adam_learning_rates": baseline["learning_rates"],
        "adam_final_losses": baseline["final_losses"],
        "speedup": float(sp.speedup),
        "speedup_reached": bool(sp.reached),
        "speedup_str": str(sp),
        "adam_steps_to_match": sp.adam_steps_to_match,
        "learned_mean": _json_list(learned.mean),
        "learned_std": _json_list(learned.std),
        "adam_mean": baseline["mean"],
        "adam_std": baseline["std"],
    }


def evaluate(task: Task, learned_opt: LearnedOptimizer, theta: MetaParams, *, steps: int,
             seeds: int, key: PRNGKey,
             adam_learning_rates: Sequence[float] = DEFAULT_ADAM_LEARNING_RATES,
             adam_steps: int | None = None, loss_on: LossOn = "batch",
             final_window: int = 1, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score ``learned_opt.opt_fn(theta)`` on ``task`` against Adam tuned over a learning-rate grid.

    Both run on the same ``seeds`` initializations and batches (same ``key``). Adam is tuned at the
    evaluated horizon (see :func:`adam_baseline`; pass a cached one as ``baseline`` to skip the
    sweep). Every learning rate also runs on to ``adam_steps`` (default ``steps``) so that the
    speedup -- the fewest steps any learning rate of the grid needs to reach the learned final
    loss, over ``steps`` -- can be measured above 1 instead of only bounded.

    Returns a JSON-serializable dict. Summary keys: ``task``, ``learned_optimizer``, ``steps``,
    ``seeds``, ``adam_steps``, ``loss_on``, ``final_window``, ``learned_final_loss``,
    ``adam_final_loss``, ``adam_best_lr``, ``adam_best_lr_at_grid_edge`` (True: widen the grid),
    ``adam_learning_rates``, ``adam_final_losses``,
    ``speedup``, ``speedup_reached`` (False: ``speedup`` is a lower bound), ``speedup_str``,
    ``adam_steps_to_match`` (None if never). Curve keys (:data:`CURVE_KEYS`, lists over steps):
    ``learned_mean``, ``learned_std``, ``adam_mean``, ``adam_std``. Non-finite numbers
    (diverged runs) are None.
    """
    learned = CurveResult.from_curves(
        loss_curves(task, learned_opt, theta, steps, seeds, key, loss_on=loss_on), final_window)
    if baseline is None:
        baseline = adam_baseline(task, steps=steps, seeds=seeds, key=key,
                                 adam_learning_rates=adam_learning_rates, adam_steps=adam_steps,
                                 loss_on=loss_on, final_window=final_window)
    result = {"learned_optimizer": learned_opt.name, **score_against_baseline(learned, baseline)}
    # the test metric next to the train loss: accuracy on the held-out split, same seeds
    acc = final_test_accuracy(task, learned_opt, theta, steps, seeds, key)
    if acc is not None:
        adam_acc = final_test_accuracy(task, _AdamLR(), {"lr": jnp.float32(baseline["best_lr"])},
                                 steps, seeds, key)
        result.update(learned_test_accuracy=float(acc.mean()),
                      learned_test_accuracy_std=float(acc.std()),
                      adam_test_accuracy=float(adam_acc.mean()),
                      adam_test_accuracy_std=float(adam_acc.std()))
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`evaluate`'s result without the per-step curves."""
    return {k: v for k, v in result.items() if k not in CURVE_KEYS}
