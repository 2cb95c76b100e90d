"""Evaluation of the unsupervised update rule: what are its features worth after N steps?

For each of ``seeds`` fresh base models (:func:`evaluate_rule`):

1. **rule** — the rule is applied ``steps`` times (the seed used 3000) on class-balanced batches
   of unlabelled *train-split* images;
2. **random** — the same base model at its initialization;
3. **supervised** — the same initialization trained with Adam through a linear softmax head on
   labelled train-split batches for ``supervised_steps`` steps (default ``steps``).

Each model's output features are then scored by two readouts fit on
``readout_samples_per_class`` labelled train-split examples per class and scored on the whole
*test* split, which meta-training never touches: the ridge meta-objective
(:mod:`l2o.metaobjectives.ridge`: accuracy and normalized-prediction squared error) and
scikit-learn's logistic regression (:mod:`l2o.metaobjectives.logistic`: accuracy and log-loss).
Fit and test features come from one forward pass (the base model's batch norms use batch
statistics). Figures are averaged over seeds; ``figures_dir`` gets ``receptive_fields.png`` and
``activations.png`` of the first seed's three models.

The leaderboard score of a result is ``1 − rule_logistic_accuracy`` (``leaderboard_score``;
lower is better), since there is no tuned-Adam loss to divide by.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2o.metaobjectives.logistic import logistic_regression_scores
from l2o.metaobjectives.ridge import ridge_meta_objective
from l2o.types import MetaParams, PRNGKey
from l2o.unsupervised.data import UnsupervisedFamily
from l2o.unsupervised.estimator import apply_rule_steps

#: the ``kind`` of an unsupervised evaluation result
KIND = "unsupervised_rule"
#: feature sets compared, in report order
MODELS = ("rule", "random", "supervised")
#: per-model figures (``{model}_{figure}`` keys of a result)
FIGURES = ("ridge_accuracy", "ridge_mse", "logistic_accuracy", "logistic_log_loss")
#: the keys of a result that go into ``summary.json``
SUMMARY_KEYS = ("kind", "task", "steps", "seeds", "supervised_steps",
                "readout_samples_per_class", "test_examples",
                *(f"{m}_{f}" for m in MODELS for f in FIGURES),
                "supervised_head_accuracy", "leaderboard_score", "figures")


def is_unsupervised(cfg: Any) -> bool:
    """Whether a :class:`~l2o.io.config.TrainConfig` meta-trains the unsupervised rule."""
    return cfg.estimator.name == "unsupervised" or cfg.optimizer.name == "unsupervised_rule"


@functools.partial(jax.jit, static_argnums=(0, 5))
def _apply_rule(rule: Any, family: UnsupervisedFamily, theta: MetaParams, params: Any,
                key: PRNGKey, steps: int) -> Any:
    return apply_rule_steps(rule, family, theta, params, key, steps)


@functools.partial(jax.jit, static_argnums=(3, 4))
def train_supervised(family: UnsupervisedFamily, params: Any, key: PRNGKey, steps: int,
                     learning_rate: float = 3e-3) -> tuple[Any, jax.Array, jax.Array]:
    """``(params, head_w, head_b)``: the base model's forward weights and biases trained with
    Adam through a linear softmax head (from zeros) on ``steps`` class-balanced labelled batches
    of the train split (backward weights and the input permutation are left as they are)."""
    model, data = family.model, family.data
    head = (jnp.zeros((model.output_size, data.num_classes)), jnp.zeros((data.num_classes,)))
    trainable = (params.w, params.b, head)
    tx = optax.adam(learning_rate)

    def loss_fn(tr, x, y):
        w, b, (hw, hb) = tr
        logits = model.features(params.replace(w=w, b=b), x) @ hw + hb
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def body(carry, k):
        tr, opt = carry
        x, y = data.sample_balanced(k, family.batch_per_class, "train")
        g = jax.grad(loss_fn)(tr, x, y)
        upd, opt = tx.update(g, opt, tr)
        return (optax.apply_updates(tr, upd), opt), None

    (tr, _), _ = jax.lax.scan(body, (trainable, tx.init(trainable)), jax.random.split(key, steps))
    w, b, (hw, hb) = tr
    return params.replace(w=w, b=b), hw, hb


@jax.jit
def _features(family: UnsupervisedFamily, params: Any, x: jax.Array) -> jax.Array:
    return family.model.features(params, x)


def _score(family: UnsupervisedFamily, feats_fit, y_fit, feats_test, y_test) -> dict[str, float]:
    _, stats = ridge_meta_objective(feats_fit, y_fit, feats_test, y_test,
                                    family.data.num_classes, ridge_factor=family.ridge_factor)
    logistic = logistic_regression_scores(np.asarray(feats_fit), np.asarray(y_fit),
                                          np.asarray(feats_test), np.asarray(y_test),
                                          num_classes=family.data.num_classes)
    return {"ridge_accuracy": float(stats.accuracy_test), "ridge_mse": float(stats.mse_test),
            "logistic_accuracy": logistic.accuracy, "logistic_log_loss": logistic.log_loss}


def evaluate_rule(rule: Any, theta: MetaParams, family: UnsupervisedFamily, *, steps: int,
                  key: PRNGKey, seeds: int = 1, supervised_steps: int | None = None,
                  supervised_learning_rate: float = 3e-3, readout_samples_per_class: int = 50,
                  figures_dir: str | Path | None = None) -> dict[str, Any]:
    """Score the rule's features after ``steps`` applications against random-init and supervised
    features (see the module doc). Returns a flat dict: ``{model}_{figure}`` for every model in
    :data:`MODELS` and figure in :data:`FIGURES`, ``supervised_head_accuracy``,
    ``leaderboard_score``, the settings, ``figures`` (PNG paths) and ``eval_seconds``."""
    if not isinstance(family, UnsupervisedFamily):
        raise TypeError(f"evaluate_rule needs an unsupervised task family, got "
                        f"{getattr(family, 'name', type(family).__name__)!r}")
    for name, v in (("steps", steps), ("seeds", seeds)):
        if isinstance(v, bool) or int(v) != v or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    t0 = time.monotonic()
    sup_steps = int(steps if supervised_steps is None else supervised_steps)
    data = family.data
    spc = min(int(readout_samples_per_class), data.min_train_count)
    x_test, y_test = data.split_arrays("test")
    n_test = int(x_test.shape[0])
    per_seed: list[dict[str, float]] = []
    figures: list[str] = []
    for s, k in enumerate(jax.random.split(key, int(seeds))):
        k_init, k_rule, k_sup, k_fit = jax.random.split(k, 4)
        p0 = family.model.init(k_init)
        models = {"random": p0, "rule": _apply_rule(rule, family, theta, p0, k_rule, int(steps))}
        models["supervised"], hw, hb = train_supervised(family, p0, k_sup, sup_steps,
                                                        float(supervised_learning_rate))
        x_fit, y_fit = data.sample_balanced(k_fit, spc, "train")
        x_all = jnp.concatenate([x_fit, x_test], axis=0)
        n_fit = int(x_fit.shape[0])
        row: dict[str, float] = {}
        feats = {}
        for name in MODELS:
            f = _features(family, models[name], x_all)
            feats[name] = f
            for fig, v in _score(family, f[:n_fit], y_fit, f[n_fit:], y_test).items():
                row[f"{name}_{fig}"] = v
        head_pred = jnp.argmax(feats["supervised"][n_fit:] @ hw + hb, axis=1)
        row["supervised_head_accuracy"] = float(jnp.mean(head_pred == y_test))
        per_seed.append(row)
        if s == 0 and figures_dir is not None:
            from l2o.unsupervised.figures import write_figures

            k_show = jax.random.fold_in(k_fit, 1)
            x_show, y_show = data.sample_balanced(k_show, min(10, data.min_test_count), "test")
            order = np.argsort(np.asarray(y_show), kind="stable")
            x_show, y_show = x_show[order], y_show[order]
            figures = write_figures(
                figures_dir,
                {n: (models[n].w[0], models[n].perm) for n in MODELS},
                {n: np.asarray(_features(family, models[n], x_show)) for n in MODELS},
                np.asarray(y_show), data.num_classes, data.image_shape)
    result: dict[str, Any] = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
    acc = result["rule_logistic_accuracy"]
    result.update({
        "kind": KIND,
        "task": family.name,
        "steps": int(steps),
        "seeds": int(seeds),
        "supervised_steps": sup_steps,
        "readout_samples_per_class": spc,
        "test_examples": n_test,
        "leaderboard_score": 1.0 - acc if math.isfinite(acc) else math.inf,
        "figures": figures,
        "eval_seconds": round(time.monotonic() - t0, 3),
    })
    return result


def evaluate_config(cfg: Any, rule: Any, theta: MetaParams,
                    figures_dir: str | Path | None = None) -> dict[str, Any]:
    """:func:`evaluate_rule` as a run's config asks: family ``cfg.eval_task()``, ``cfg.eval.steps``
    rule applications (and supervised Adam steps), ``cfg.eval.seeds`` base models, keys from
    ``l2o.training.build.eval_key(cfg.seed)`` (so every scorer of a checkpoint gets the same
    numbers)."""
    from l2o.training.build import eval_key, task_family_from_config

    family = task_family_from_config(cfg.eval_task())
    return evaluate_rule(rule, theta, family, steps=cfg.eval.steps, key=eval_key(cfg.seed),
                         seeds=cfg.eval.seeds, figures_dir=figures_dir)


def format_result(result: dict[str, Any]) -> str:
    """A few human-readable lines of an unsupervised evaluation result."""
    lines = [f"eval on {result.get('task')}: rule applied {result.get('steps')} steps, "
             f"{result.get('seeds')} base model(s); readouts fit on "
             f"{result.get('readout_samples_per_class')}/class, scored on "
             f"{result.get('test_examples')} test examples"]
    for m in MODELS:
        lines.append(
            f"  {m:<10} ridge acc {result.get(f'{m}_ridge_accuracy', math.nan):.3f} "
            f"(mse {result.get(f'{m}_ridge_mse', math.nan):.3f})  logistic acc "
            f"{result.get(f'{m}_logistic_accuracy', math.nan):.3f} "
            f"(log-loss {result.get(f'{m}_logistic_log_loss', math.nan):.3f})")
    return "\n".join(lines)
