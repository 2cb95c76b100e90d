"""The main job: meta-train, evaluate against tuned Adam, write the run's outputs.

Both entry points produce the same outputs in the run directory:

- ``summary.json`` -- meta-loss first/last, the evaluation block and run figures;
- ``curves.png`` -- learned optimizer vs tuned Adam loss curves;
- ``tensorboard/`` -- scalars of every logged step;
- ``checkpoints/`` -- full and params checkpoints.

:func:`run_local` is the single-machine path; ``services.train.run_service`` is the distributed
one and uses :func:`evaluate_theta` and :func:`write_outputs` from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from l2o.io.atomic import write_json
from l2o.io.config import TrainConfig
from l2o.io.storage import as_path
from l2o.optimizers.base import LearnedOptimizer
from l2o.tasks.base import Task
from l2o.training.build import eval_key, task_family_from_config
from l2o.training.trainer import Trainer, meta_loss_summary
from l2o.types import MetaParams, PRNGKey


def eval_task_and_key(cfg: TrainConfig) -> tuple[Task, PRNGKey]:
    """The held-out task evaluation runs on (fresh initializations) and the key it uses."""
    import jax

    k_task, k_run = jax.random.split(eval_key(cfg.seed))
    return task_family_from_config(cfg.eval_task()).sample_task(k_task), k_run


def adam_baseline_for(cfg: TrainConfig) -> dict[str, Any]:
    """The tuned-Adam baseline of ``cfg``'s evaluation (cacheable: see
    ``l2o.evaluation.comparison``).

    Empty for the unsupervised update rule, which is compared with random-init and supervised
    features instead (:func:`evaluate_theta`).
    """
    if is_unsupervised(cfg):
        return {}
    from l2o.evaluation.comparison import adam_baseline

    task, key = eval_task_and_key(cfg)
    return adam_baseline(task, steps=cfg.eval.steps, seeds=cfg.eval.seeds, key=key,
                         adam_learning_rates=tuple(cfg.eval.adam_learning_rates),
                         adam_steps=cfg.eval.steps * cfg.eval.adam_steps_factor)


def is_unsupervised(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` meta-trains the unsupervised update rule (``l2o.unsupervised``)."""
    return cfg.estimator.name == "unsupervised" or cfg.optimizer.name == "unsupervised_rule"


def evaluate_theta(cfg: TrainConfig, learned_opt: LearnedOptimizer, theta: MetaParams,
                   baseline: dict[str, Any] | None = None,
                   figures_dir: str | Path | None = None) -> dict[str, Any]:
    """Score θ on fresh initializations of the eval task against tuned Adam.

    ``baseline`` is a cached :func:`adam_baseline_for` result; without it the sweep runs here.
    For the unsupervised rule: ``l2o.unsupervised.evaluation.evaluate_config`` instead (rule vs
    random-init vs supervised features, no Adam), its PNGs written to ``figures_dir`` (default
    the run dir).
    """
    if is_unsupervised(cfg):
        from l2o.unsupervised.evaluation import evaluate_config

        return evaluate_config(cfg, learned_opt, theta, figures_dir=figures_dir or cfg.run_path())
    from l2o.evaluation.comparison import evaluate

    task, key = eval_task_and_key(cfg)
    return evaluate(task, learned_opt, theta, steps=cfg.eval.steps, seeds=cfg.eval.seeds,
                    key=key, baseline=baseline or adam_baseline_for(cfg))


def load_theta(path: str | Path) -> tuple[LearnedOptimizer, MetaParams, dict[str, Any]]:
    """The learned optimizer, θ and metadata of a params or full checkpoint.

    The optimizer is rebuilt from the ``optimizer`` config stored in the checkpoint's metadata.
    """
    import jax
    from flax import serialization

    from l2o.io.checkpoints import CheckpointError, CheckpointMeta, read_checkpoint
    from l2o.io.config import optimizer_config
    from l2o.training.build import learned_optimizer_from_config

    raw, meta = read_checkpoint(path)
    typed = CheckpointMeta.from_stored(meta, path)
    if typed.optimizer is None:
        raise CheckpointError(f"checkpoint {path} does not say which optimizer it holds")
    lopt = learned_optimizer_from_config(optimizer_config(**typed.optimizer))
    stored = raw["theta"] if typed.kind == "full" else raw
    template = lopt.init(jax.random.PRNGKey(0))
    try:
        theta = serialization.from_state_dict(template, stored)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not hold θ of {lopt.name}: {e}") from e
    return lopt, jax.tree_util.tree_map(jax.numpy.asarray, theta), meta


EVAL_SUMMARY_KEYS = ("task", "steps", "seeds", "learned_final_loss", "adam_final_loss",
                     "adam_best_lr", "adam_best_lr_at_grid_edge", "speedup", "speedup_reached",
                     "adam_steps_to_match", "adam_steps",
                     # the test metric of classifier tasks
                     # (l2o.evaluation.comparison.final_test_accuracy)
                     "learned_test_accuracy", "learned_test_accuracy_std", "adam_test_accuracy",
                     "adam_test_accuracy_std",
                     # the unsupervised rule's evaluation (l2o.unsupervised.evaluation)
                     "kind", "supervised_steps", "readout_samples_per_class", "test_examples",
                     *(f"{m}_{f}" for m in ("rule", "random", "supervised") for f in (
                         "ridge_accuracy", "ridge_mse", "logistic_accuracy", "logistic_log_loss")),
                     "supervised_head_accuracy", "leaderboard_score", "figures")


def write_outputs(run_dir: str | Path, summary: dict[str, Any],
                  eval_result: dict[str, Any] | None) -> Path:
    """Write ``summary.json`` (and ``curves.png`` when there is an eval result) into ``run_dir``
    (a local path or a storage URL, :mod:`l2o.io.storage`); its path."""
    run_dir = as_path(run_dir)
    if eval_result is not None and eval_result.get("kind") == "unsupervised_rule":
        import shutil  # its PNGs (receptive fields, activations) go to the run dir, no curves

        for fig in eval_result.get("figures") or []:
            if Path(fig).is_file() and Path(fig).resolve().parent != run_dir.resolve():
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(fig, run_dir / Path(fig).name)
    elif eval_result is not None:
        from l2o.evaluation.plots import plot_curves

        plot_curves(eval_result, run_dir / "curves.png")
    return write_json(run_dir / "summary.json", summary)


class TensorBoardLogger:
    """Writes each logged entry's numbers as TensorBoard scalars under ``run_dir/tensorboard``."""

    def __init__(self, run_dir: str | Path, prefix: str = "train"):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.prefix = prefix

    def __call__(self, entry: dict[str, float]) -> None:
        step = int(entry["step"])
        for name, value in entry.items():
            if name != "step" and isinstance(value, int | float):
                self.writer.add_scalar(f"{self.prefix}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def run_local(cfg: TrainConfig,
              on_log: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Meta-train on this machine (resuming from the run dir), evaluate, write the outputs.

    Returns the summary dict.
    """
    start = time.monotonic()
    trainer = Trainer(cfg)
    trainer.restore()
    tb = TensorBoardLogger(trainer.run_dir)

    def log(entry: dict[str, float]) -> None:
        tb(entry)
        if on_log is not None:
            on_log(entry)

    try:
        trainer.train(on_log=log)
    finally:
        tb.close()
    train_seconds = time.monotonic() - start
    result = evaluate_theta(cfg, trainer.learned_opt, trainer.state.theta)
    first, last = meta_loss_summary(trainer.history)
    summary = {
        "run": cfg.run_name,
        "mode": "local",
        "meta_loss_first": first,
        "meta_loss_last": last,
        "meta_steps": trainer.step,
        "skipped_nonfinite": trainer.skipped_nonfinite,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.monotonic() - start, 2),
        "eval": {k: result[k] for k in EVAL_SUMMARY_KEYS if k in result},
        "history": trainer.history,
        "evaluations": trainer.evaluations,  # cfg.evaluation_period's scores (best.ckpt)
    }
    write_outputs(trainer.run_dir, summary, result)
    return summary
