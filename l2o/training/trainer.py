"""Single-machine meta-training: one process, one estimator, an optax meta-optimizer.

The loop is the distributed service with the network taken out: the "worker" (the estimator and
its inner problems) and the "learner" (θ and the meta-optimizer state) live in one process and
use the key schedule of :mod:`l2o.training.build`, so the service with one worker and
``max_staleness=0``
computes the same θ.

θ moves by :func:`l2o.training.meta_update.meta_update`, the learner's meta-update: a step whose
estimate or result is non-finite is skipped (θ and the optimizer state untouched) and counted in
``skipped_nonfinite``.

Checkpoints go to ``run_dir/checkpoints``: a full one (θ, meta-optimizer state, step, counters,
config) and a params-only one (θ, version) every ``checkpoint_every`` steps, their metadata in the
learner's schema (:class:`l2o.io.checkpoints.CheckpointMeta`). The trainer also keeps
its inner problems in ``worker_XXXXXXXX.ckpt`` beside them: that is local-side state, stored apart
from θ, and only used so a resumed single-machine run continues exactly where it stopped.

With ``cfg.curriculum`` set (L2O-Scale's curriculum, :mod:`l2o.training.curriculum`), each stage
builds its
estimator with ``num_steps`` = the stage's horizon (one recompile per stage) and draws fresh inner
problems. Every ``curriculum.eval_period`` meta-steps θ is scored at the next stage's horizon; a
new best of the stage goes to ``checkpoints/best_stage{i}.ckpt``. When the stage runs out of
patience its best θ is loaded back from that file, the meta-optimizer state is reset (its moments
belong to the discarded steps) and the version counter keeps counting up; then the next stage
starts or, after the last stage, training stops. The curriculum state is in the full checkpoint's
metadata, so a resumed run continues in the same stage.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2o.estimators.base import OPTIONAL_METRICS, GradientEstimator
from l2o.io.checkpoints import (
    CheckpointError,
    CheckpointMeta,
    checkpoint_path,
    load_checkpoint,
    load_run_checkpoint,
    newest_intact_checkpoint,
    save_checkpoint,
    set_aside,
)
from l2o.io.config import TrainConfig
from l2o.training.build import (
    estimator_from_config,
    learned_optimizer_from_config,
    meta_optimizer_from_config,
    task_family_from_config,
    theta_key,
    truncation_key,
    validation_task_and_run_key,
    worker_init_key,
)
from l2o.training.curriculum import (
    Action,
    CurriculumState,
    best_checkpoint_name,
    curriculum_init,
    curriculum_update,
    eval_horizon,
    stage_config,
    stage_worker_key,
    train_horizon,
)
from l2o.training.meta_update import MetaState, init_meta_state, meta_update

log = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnums=(1,))
def meta_step(est: GradientEstimator, meta_tx: optax.GradientTransformation, state: MetaState,
              worker_state: Any, key: jax.Array) -> tuple[MetaState, Any, dict[str, jax.Array]]:
    """One truncation and the meta-update it gives, fused in one compiled program.

    The update is :func:`~l2o.training.meta_update.meta_update`'s: skipped (θ and the optimizer
    state untouched, ``meta_update_applied`` false) when the estimate or its result is non-finite.
    """
    grad, worker_state, metrics = est.compute_gradient_estimate(state.theta, worker_state, key)
    new_state, info = meta_update(meta_tx, state, grad)
    return new_state, worker_state, dict(metrics, grad_finite=info.grad_finite,
                                         meta_update_applied=info.applied)


class Trainer:
    """Meta-trains ``cfg.optimizer`` on ``cfg.task`` with ``cfg.estimator`` on this machine."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None, *,
                 scorer: Callable[[Trainer, int], float] | None = None):
        """``scorer(trainer, eval_steps)`` replaces :meth:`quick_eval` as the curriculum's score
        (tests script it); by default θ is scored with :meth:`quick_eval`."""
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.run_path()
        self.family = task_family_from_config(cfg.worker_task(0))
        self.learned_opt = learned_optimizer_from_config(cfg.optimizer)
        #: the curriculum's state (``None`` without ``cfg.curriculum``)
        self.curriculum: CurriculumState | None = (
            curriculum_init() if cfg.curriculum is not None else None)
        self.scorer = scorer
        self.estimator = self._stage_estimator()
        self.meta_tx = meta_optimizer_from_config(cfg.meta_optimizer)
        self.history: list[dict[str, float]] = []
        self.skipped_nonfinite = 0
        theta = self.learned_opt.init(theta_key(cfg.seed))
        self.state = init_meta_state(theta, self.meta_tx)
        self.worker_state = self.estimator.init_worker_state(theta, self._worker_key())
        self.resumed_from: Path | None = None
        #: newer full checkpoints :meth:`restore` skipped as damaged (left in place)
        self.skipped_checkpoints: list[Path] = []
        #: periodic evaluations (``cfg.evaluation_period``): ``{"step", "eval_final_loss",
        #: "improved"}`` each; the best one's θ is in ``checkpoints/best.ckpt``
        self.evaluations: list[dict[str, Any]] = []
        self.best_eval: float | None = None
        self._eval_setup: tuple[Any, jax.Array] | None = None

    @property
    def step(self) -> int:
        """Meta-updates applied so far."""
        return int(self.state.version)

    @property
    def stage(self) -> int:
        """The curriculum stage being trained (0 without a curriculum)."""
        return self.curriculum.stage if self.curriculum is not None else 0

    def _stage_estimator(self, stage: int | None = None) -> GradientEstimator:
        est_cfg = stage_config(self.cfg, self.stage if stage is None else stage).estimator
        return estimator_from_config(est_cfg, self.family, self.learned_opt)

    def _worker_key(self, stage: int | None = None) -> jax.Array:
        return stage_worker_key(worker_init_key(self.cfg.seed, 0),
                                self.stage if stage is None else stage)

    # --- checkpoints -------------------------------------------------------------------------

    def _metadata(self) -> CheckpointMeta:
        """The full checkpoint's metadata for the current step."""
        return CheckpointMeta(
            kind="full", version=self.step, gen_id=0, seed=self.cfg.seed,
            optimizer=self.cfg.optimizer.model_dump(mode="json"),
            config=self.cfg.model_dump(mode="json"),
            counters={"skipped_nonfinite": self.skipped_nonfinite}, history=self.history,
            evaluations=self.evaluations, best_eval=self.best_eval,
            curriculum=self.curriculum.to_json() if self.curriculum is not None else None)

    def save(self) -> Path:
        """Write the full, params and worker checkpoints for the current step; the full path."""
        meta = self._metadata()
        step = self.step
        save_checkpoint(checkpoint_path(self.run_dir, "worker", step), self.worker_state,
                        CheckpointMeta(kind="worker", version=step))
        save_checkpoint(checkpoint_path(self.run_dir, "params", step), self.state.theta,
                        meta.for_params())
        full = checkpoint_path(self.run_dir, "full", step)
        set_aside(full, self.skipped_checkpoints)
        return save_checkpoint(full,
                               {"theta": self.state.theta, "opt_state": self.state.opt_state},
                               meta)

    def restore(self, path: str | Path | None = None) -> bool:
        """Resume from ``path`` or else the newest intact full checkpoint of the run dir; False
        if there is none.

        Newer full checkpoints that are damaged are skipped with a warning and left in place
        (:func:`~l2o.io.checkpoints.newest_intact_checkpoint`; listed in
        :attr:`skipped_checkpoints`, set aside before this run writes their step again); a
        damaged worker checkpoint gives fresh inner problems. Raises
        :class:`~l2o.io.checkpoints.CheckpointError` for a damaged ``path``, when no full
        checkpoint is intact, or when the newest intact one does not match this config, leaving
        the trainer as it was.
        """
        target = {"theta": self.state.theta, "opt_state": self.state.opt_state}
        if path is not None:
            path = Path(path)
            tree, meta = load_run_checkpoint(path, target, "full")
            skipped: tuple[Path, ...] = ()
        else:
            found = newest_intact_checkpoint(self.run_dir, target, "full")
            if found is None:
                return False
            path, tree, meta, skipped = found.path, found.tree, found.meta, found.skipped
        step = meta.version
        curriculum, estimator, worker_state = self.curriculum, self.estimator, self.worker_state
        saved = meta.curriculum
        service_file = self.run_dir / "checkpoints" / "curriculum.json"
        if saved is None and service_file.exists():  # a run dir written by the service
            saved = json.loads(service_file.read_text())["state"]
        if self.cfg.curriculum is not None and saved is not None:
            curriculum = CurriculumState.from_json(saved)
            if curriculum.stage >= len(self.cfg.curriculum.stages):
                raise CheckpointError(
                    f"checkpoint {path} is in curriculum stage {curriculum.stage}; the config "
                    f"has {len(self.cfg.curriculum.stages)} stages")
            if curriculum.stage != self.stage:  # the stage's estimator, a worker-state template
                estimator = self._stage_estimator(curriculum.stage)
                worker_state = estimator.init_worker_state(
                    tree["theta"], self._worker_key(curriculum.stage))
        stage = curriculum.stage if curriculum is not None else 0
        saved_worker = self._saved_worker_state(step, worker_state)
        worker_state = saved_worker if saved_worker is not None else \
            estimator.init_worker_state(tree["theta"], self._worker_key(stage))
        self.curriculum, self.estimator = curriculum, estimator
        to_jnp = lambda t: jax.tree_util.tree_map(jnp.asarray, t)
        self.state = MetaState(theta=to_jnp(tree["theta"]), opt_state=to_jnp(tree["opt_state"]),
                               version=jnp.asarray(step, jnp.int32))
        self.worker_state = to_jnp(worker_state)
        self.history = list(meta.history or [])
        self.skipped_nonfinite = int((meta.counters or {}).get("skipped_nonfinite", 0))
        self.evaluations = list(meta.evaluations or [])
        self.best_eval = meta.best_eval
        self.resumed_from = path
        self.skipped_checkpoints = list(skipped)
        return True

    def _saved_worker_state(self, step: int, template: Any) -> Any | None:
        """The inner problems saved with ``step`` (``worker_XXXXXXXX.ckpt``), or ``None`` when
        there are none (a run dir written by the service) or they are damaged (a warning)."""
        path = checkpoint_path(self.run_dir, "worker", step)
        if not path.exists():
            return None
        try:
            return load_checkpoint(path, template)[0]
        except CheckpointError as e:
            log.warning("fresh inner problems: %s", e)
            return None

    # --- the loop ----------------------------------------------------------------------------

    def train(self, num_steps: int | None = None,
              on_log: Callable[[dict[str, float]], None] | None = None,
              time_budget_s: float | None = None) -> list[dict[str, float]]:
        """Run meta-updates until ``num_steps`` (default ``cfg.meta_steps``) have been applied.

        With a curriculum, also stops when its last stage has finished. Stops early once
        ``time_budget_s`` (default ``cfg.time_budget_s``) has elapsed, after writing a
        checkpoint. Returns the logged history (one entry per ``log_every`` steps).
        """
        cfg = self.cfg
        total = cfg.meta_steps if num_steps is None else num_steps
        budget = cfg.time_budget_s if time_budget_s is None else time_budget_s
        start = time.monotonic()
        self._last_log = start
        window: list[dict[str, Any]] = []
        while self.step < total and not (self.curriculum is not None and self.curriculum.done):
            key = truncation_key(cfg.seed, 0, self.step)
            self.state, self.worker_state, metrics = meta_step(
                self.estimator, self.meta_tx, self.state, self.worker_state, key)
            window.append(metrics)
            step = self.step
            if step % cfg.log_every == 0 or step == total:
                self._log(window, step, time.monotonic() - start, on_log)
                window = []
            # before the checkpoint, so that a run resumed from it has this evaluation
            if cfg.curriculum is not None and step % cfg.curriculum.eval_period == 0:
                self.curriculum_step()
            if step % cfg.checkpoint_every == 0:
                self.save()
            if cfg.evaluation_period is not None and step % cfg.evaluation_period == 0:
                self.evaluate_and_keep_best()
            if self.curriculum is not None and self.curriculum.done:
                break
            if budget is not None and time.monotonic() - start > budget:
                break
        if window:
            self._log(window, self.step, time.monotonic() - start, on_log)
        self.save()
        return self.history

    # --- periodic evaluation (L2L's evaluation_period / evaluation_epochs) ----------------------

    def quick_eval(self, steps: int | None = None, seeds: int | None = None) -> float:
        """The learned optimizer's mean final loss over ``seeds`` (default
        ``cfg.evaluation_epochs``) fresh seeds of the eval task after ``steps`` (default
        ``cfg.eval.steps``) inner steps (``inf`` if it diverged).

        The end-of-run evaluation's task (:func:`l2o.training.job.eval_task_and_key`) on
        *validation*
        seeds (:func:`l2o.training.build.validation_key`), so θ chosen by these scores is then
        reported on
        seeds it was not chosen on; no Adam sweep: one jitted call of
        :func:`l2o.evaluation.comparison.loss_curves`.
        """
        from l2o.evaluation.comparison import loss_curves

        if self._eval_setup is None:
            family = task_family_from_config(self.cfg.eval_task())
            self._eval_setup = validation_task_and_run_key(self.cfg.seed, family)
        task, key = self._eval_setup
        curves = loss_curves(task, self.learned_opt, self.state.theta,
                             steps=self.cfg.eval.steps if steps is None else steps,
                             seeds=self.cfg.evaluation_epochs if seeds is None else seeds, key=key)
        final = float(np.mean(curves[:, -1]))
        return final if math.isfinite(final) else math.inf

    def evaluate_and_keep_best(self) -> dict[str, Any]:
        """Score θ with :meth:`quick_eval`, record it in :attr:`evaluations` and, when it beats
        every earlier evaluation, write θ to ``checkpoints/best.ckpt`` (a params checkpoint whose
        metadata also holds ``eval_final_loss``). Returns the recorded entry."""
        score = self.quick_eval()
        improved = self.best_eval is None or score < self.best_eval
        entry = {"step": self.step, "eval_final_loss": score, "improved": improved}
        self.evaluations.append(entry)
        if improved:
            self.best_eval = score
            save_checkpoint(self.best_checkpoint_path(), self.state.theta,
                            self._metadata().for_params(eval_final_loss=score))
        return entry

    # --- curriculum (L2O-Scale's if_cl; l2o.training.curriculum)
    # ---------------------------------------

    def curriculum_step(self) -> dict[str, Any]:
        """Score θ at the current stage's evaluation horizon and act on the curriculum's decision
        (save the stage's best, or restore it and advance / finish). Returns the entry recorded
        in :attr:`evaluations` (``stage``, ``eval_steps``, ``eval_final_loss``, ``curriculum``:
        the action, ``improved``, and for a stage change ``restored_version``/``next_stage``)."""
        cur = self.cfg.curriculum
        state = self.curriculum
        if cur is None or state is None:
            raise ValueError("curriculum_step needs cfg.curriculum")
        steps = eval_horizon(cur.stages, state.stage)
        if self.scorer is not None:
            score = float(self.scorer(self, steps))
        else:
            score = self.quick_eval(steps=steps, seeds=cur.eval_seeds)
        new_state, decision = curriculum_update(cur.stages, cur.patience, state, score,
                                                self.step)
        entry: dict[str, Any] = {
            "step": self.step, "stage": state.stage, "train_steps": train_horizon(
                cur.stages, state.stage), "eval_steps": steps, "eval_final_loss": score,
            "curriculum": decision.action.value,
            "improved": decision.action is Action.NEW_BEST}
        if decision.action is Action.NEW_BEST:
            save_checkpoint(self.stage_best_path(state.stage), self.state.theta,
                            self._metadata().for_params(eval_final_loss=score, eval_steps=steps,
                                                        stage=state.stage))
        elif decision.action in (Action.ADVANCE, Action.FINISHED):
            if decision.restore_version is not None:
                self._restore_theta(self.stage_best_path(state.stage), decision.restore_version)
                entry["restored_version"] = decision.restore_version
            if decision.action is Action.ADVANCE:
                entry["next_stage"] = decision.stage
                self.estimator = self._stage_estimator(decision.stage)
                self.worker_state = self.estimator.init_worker_state(
                    self.state.theta, self._worker_key(decision.stage))
        self.curriculum = new_state
        self.evaluations.append(entry)
        return entry

    def _restore_theta(self, path: Path, version: int) -> None:
        """θ := the stage-best checkpoint at ``path`` (which must hold ``version``), with a fresh
        meta-optimizer state; the version counter is left as it is."""
        tree, meta = load_run_checkpoint(path, self.state.theta, "params")
        if meta.version != int(version):
            raise CheckpointError(f"{path} holds θ version {meta.version}, the curriculum "
                                  f"expected {version}")
        theta = jax.tree_util.tree_map(jnp.asarray, tree)
        self.state = MetaState(theta=theta, opt_state=self.meta_tx.init(theta),
                               version=self.state.version)

    def stage_best_path(self, stage: int) -> Path:
        """``run_dir/checkpoints/best_stage{stage}.ckpt``: the best θ of a curriculum stage."""
        return self.run_dir / "checkpoints" / best_checkpoint_name(stage)

    def best_checkpoint_path(self) -> Path:
        """``run_dir/checkpoints/best.ckpt``: θ at the best periodic evaluation so far."""
        return self.run_dir / "checkpoints" / "best.ckpt"

    def _log(self, window: list[dict[str, Any]], step: int, elapsed: float,
             on_log: Callable[[dict[str, float]], None] | None) -> None:
        host = jax.device_get(window)
        self.skipped_nonfinite += sum(not bool(m["meta_update_applied"]) for m in host)
        entry = {"step": step, "elapsed_s": round(elapsed, 3), "truncations": len(host)}
        if self.curriculum is not None:
            entry["stage"] = self.stage
            entry["num_steps"] = train_horizon(self.cfg.curriculum.stages, self.stage)
        for name in ("meta_loss", "inner_loss", "final_inner_loss", *OPTIONAL_METRICS):
            if name in host[0]:
                entry[name] = float(np.mean([float(m[name]) for m in host]))
        now = time.monotonic()
        inner_steps = sum(int(m["inner_steps"]) for m in host)
        entry["inner_steps_per_s"] = inner_steps / max(now - self._last_log, 1e-9)
        self._last_log = now
        self.history.append(entry)
        if on_log is not None:
            on_log(entry)


def meta_loss_summary(history: list[dict[str, float]]) -> tuple[float, float]:
    """``(first, last)`` meta-loss: the first and last logged windows (each a mean)."""
    if not history:
        return math.nan, math.nan
    return float(history[0]["meta_loss"]), float(history[-1]["meta_loss"])
