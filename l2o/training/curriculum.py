"""Curriculum over the training horizon (L2O-Scale's ``if_cl``; Chen et al. 2020).

Meta-training goes through *stages*. Stage ``i`` unrolls inner problems of ``stages[i]`` steps
(the estimator's ``num_steps``; the truncation length ``unroll_length`` stays fixed) and is scored
on the *next* stage's horizon ``stages[i + 1]``, so a stage is judged by how well its θ
generalizes to longer runs. The last stage has no next one and is scored on its own horizon.

Every ``eval_period`` meta-steps θ is scored (lower is better, e.g. the mean final inner loss) and
:func:`curriculum_update` decides:

- ``NEW_BEST``: the score beats every earlier score *of this stage* → save θ as the stage's best;
- ``KEEP``: no improvement, patience left → go on training;
- ``ADVANCE``: ``patience`` evaluations in a row without a new best → restore the stage's best θ
  and train the next stage (longer horizon, fresh inner problems, a fresh best score);
- ``FINISHED``: the same in the last stage → restore its best θ and stop.

A non-finite score never counts as an improvement. If a stage never produced a finite score there
is nothing to restore (``restore_version`` is ``None``) and θ is kept as it is.

The state is a small immutable value (:class:`CurriculumState`) with a JSON form, so trainers keep
it in checkpoint metadata and the service publishes it in Redis. The rule needs no JAX; the
single-machine trainer (:class:`l2o.training.trainer.Trainer`) and the service's driver
(:class:`ServiceCurriculum`) act on its decisions.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from flax import struct


class Action(enum.StrEnum):
    """What a trainer does after an evaluation."""

    KEEP = "keep"
    NEW_BEST = "new_best"
    ADVANCE = "advance"
    FINISHED = "finished"


class Decision(NamedTuple):
    """The outcome of one evaluation.

    ``restore_version``: for ``ADVANCE``/``FINISHED``, the θ version of the finished stage's best
    (``None`` if it had no finite score); ``stage``: the stage training continues in.
    """

    action: Action
    stage: int
    restore_version: int | None = None


@struct.dataclass
class CurriculumState:
    """Where a curriculum stands (immutable; see :func:`curriculum_update`).

    Attributes:
        stage: index into ``stages`` of the stage being trained.
        best_score: the best score of this stage so far (``inf`` before its first finite one).
        since_best: evaluations of this stage since its last new best (or since it began).
        best_version: θ version of this stage's best (``-1``: none yet).
        done: the last stage ran out of patience.
        stage_bests: ``(version, score)`` of the best of each finished stage, in order.
        stage_starts: the θ version at which each stage began (stage 0 at version 0).
    """

    stage: int = struct.field(pytree_node=False, default=0)
    best_score: float = struct.field(pytree_node=False, default=math.inf)
    since_best: int = struct.field(pytree_node=False, default=0)
    best_version: int = struct.field(pytree_node=False, default=-1)
    done: bool = struct.field(pytree_node=False, default=False)
    stage_bests: tuple[tuple[int, float], ...] = struct.field(pytree_node=False, default=())
    stage_starts: tuple[int, ...] = struct.field(pytree_node=False, default=(0,))

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict (``inf`` as ``None``)."""
        fin = lambda x: x if math.isfinite(x) else None
        return {"stage": self.stage, "best_score": fin(self.best_score),
                "since_best": self.since_best, "best_version": self.best_version,
                "done": self.done,
                "stage_bests": [[v, fin(s)] for v, s in self.stage_bests],
                "stage_starts": list(self.stage_starts)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CurriculumState:
        """The state :meth:`to_json` wrote."""
        num = lambda x: math.inf if x is None else float(x)
        return cls(stage=int(data["stage"]), best_score=num(data.get("best_score")),
                   since_best=int(data.get("since_best", 0)),
                   best_version=int(data.get("best_version", -1)),
                   done=bool(data.get("done", False)),
                   stage_bests=tuple((int(v), num(s)) for v, s in data.get("stage_bests", [])),
                   stage_starts=tuple(int(v) for v in data.get("stage_starts", [0])))


def check_stages(stages: Sequence[int], patience: int) -> tuple[int, ...]:
    """``stages`` as a tuple, after checking it is a non-empty, strictly increasing list of
    positive horizons and ``patience`` is positive (``ValueError`` naming the problem)."""
    out = tuple(int(s) for s in stages)
    if not out:
        raise ValueError("curriculum.stages must list at least one horizon")
    if any(s <= 0 for s in out):
        raise ValueError(f"curriculum.stages must be positive, got {list(out)}")
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"curriculum.stages must increase strictly, got {list(out)}")
    if int(patience) < 1:
        raise ValueError(f"curriculum.patience must be positive, got {patience}")
    return out


def curriculum_init() -> CurriculumState:
    """The state at the start of stage 0."""
    return CurriculumState()


def train_horizon(stages: Sequence[int], stage: int) -> int:
    """The inner horizon (``num_steps``) stage ``stage`` trains at."""
    return int(stages[stage])


def eval_horizon(stages: Sequence[int], stage: int) -> int:
    """The inner horizon stage ``stage`` is scored at: the next stage's (the last: its own)."""
    return int(stages[min(stage + 1, len(stages) - 1)])


def curriculum_update(stages: Sequence[int], patience: int, state: CurriculumState,
                      score: float, version: int) -> tuple[CurriculumState, Decision]:
    """The state after an evaluation of θ ``version`` that scored ``score`` (lower is better),
    and what to do about it (see the module docstring). Pure: ``state`` is not modified.

    Raises ``ValueError`` when called on a finished curriculum or with a bad ``stages``.
    """
    stages = check_stages(stages, patience)
    if state.done:
        raise ValueError("the curriculum is finished; no more evaluations")
    if not 0 <= state.stage < len(stages):
        raise ValueError(f"curriculum stage {state.stage} is outside 0..{len(stages) - 1}")
    score = float(score)
    if math.isfinite(score) and score < state.best_score:
        new = state.replace(best_score=score, since_best=0, best_version=int(version))
        return new, Decision(Action.NEW_BEST, state.stage)
    since = state.since_best + 1
    if since < patience:
        return state.replace(since_best=since), Decision(Action.KEEP, state.stage)
    restore = state.best_version if state.best_version >= 0 else None
    bests = (*state.stage_bests, (state.best_version, state.best_score))
    if state.stage == len(stages) - 1:
        new = state.replace(since_best=since, done=True, stage_bests=bests)
        return new, Decision(Action.FINISHED, state.stage, restore)
    nxt = state.stage + 1
    new = CurriculumState(stage=nxt, stage_bests=bests,
                          stage_starts=(*state.stage_starts, int(version)))
    return new, Decision(Action.ADVANCE, nxt, restore)


def best_checkpoint_name(stage: int) -> str:
    """File name (under ``checkpoints/``) of stage ``stage``'s best θ."""
    return f"best_stage{int(stage)}.ckpt"


def stage_config(cfg: Any, stage: int) -> Any:
    """``cfg`` (a :class:`~l2o.io.config.TrainConfig`) with ``estimator.num_steps`` set to stage
    ``stage``'s training horizon; ``cfg`` itself when it has no curriculum."""
    cur = getattr(cfg, "curriculum", None)
    if cur is None:
        return cfg
    est = cfg.estimator.model_copy(update={"num_steps": train_horizon(cur.stages, stage)})
    return cfg.model_copy(update={"estimator": est})


def stage_worker_key(key: Any, stage: int) -> Any:
    """The key a worker draws stage ``stage``'s fresh inner problems from: ``key`` itself in
    stage 0 (so a run without a curriculum is unchanged), else ``key`` folded with the stage."""
    if stage == 0:
        return key
    import jax

    return jax.random.fold_in(key, int(stage))


# ------------------------------------------------------------------------------------------------
# The curriculum of a distributed run (services.train.run_service)


class ServiceCurriculum:
    """The curriculum of a service run, driven from the driver's status-polling loop.

    The learner owns θ and the workers own their inner problems, so the curriculum is split:

    - this object (in the driver) holds the :class:`CurriculumState`, persisted to
      ``run_dir/checkpoints/curriculum.json`` after every evaluation (a resumed run continues in the
      same stage) and published in Redis (:meth:`services.registry.Registry.set_curriculum`);
    - every ``eval_period`` learner updates (approximately: the learner keeps updating while the
      driver scores) :meth:`poll` fetches θ from the learner over gRPC and scores it (the learned
      optimizer's mean final loss over ``eval_seeds`` problems of the eval task at the stage's
      evaluation horizon; ``scorer`` replaces that); a new best goes to
      ``checkpoints/best_stage{i}.ckpt``;
    - on ``ADVANCE`` the new stage is published first, then ``restore(path, version)`` makes
      the learner adopt the stage's best θ as a new generation
      (:meth:`learner.core.Learner.new_generation`: version and ``gen_id`` go up, buffered
      gradients are dropped and in-flight ones computed on the old generation are refused as
      STALE_GENERATION, the meta-optimizer state is fresh); on ``FINISHED`` the run stops and
      :meth:`finish` restores the last stage's best once the workers are gone;
    - unroll workers read the stage after each θ refresh and, on a change, rebuild their estimator
      with the stage's ``num_steps`` and draw fresh inner problems.

    Args:
        cfg: the run's :class:`~l2o.io.config.TrainConfig` (with ``curriculum`` set).
        run_dir: the run directory.
        fetch: ``fetch() -> (version, θ)``: the learner's current θ.
        restore: ``restore(path, version)``: make the learner adopt the θ stored at ``path``.
        publish: ``publish(info)``: store the stage record (a dict) where workers read it.
        scorer: ``scorer(theta, version, eval_steps) -> float`` instead of the default score.
    """

    def __init__(self, cfg: Any, run_dir: Any, fetch: Any, restore: Any, publish: Any,
                 scorer: Any = None, updates: int = 0):
        from pathlib import Path

        if cfg.curriculum is None:
            raise ValueError("ServiceCurriculum needs cfg.curriculum")
        self.cfg = cfg
        self.stages = check_stages(cfg.curriculum.stages, cfg.curriculum.patience)
        self.run_dir = Path(run_dir)
        self.fetch, self.restore, self.publish, self.scorer = fetch, restore, publish, scorer
        self.state_path = self.run_dir / "checkpoints" / "curriculum.json"
        self.events: list[dict[str, Any]] = []
        self.state = curriculum_init()
        if self.state_path.exists():
            import json

            saved = json.loads(self.state_path.read_text())
            self.state = CurriculumState.from_json(saved["state"])
            self.events = list(saved.get("events", []))
        period = cfg.curriculum.eval_period
        self.next_eval = (int(updates) // period + 1) * period
        self._eval_setup: Any = None
        self._pending: tuple[Any, int, dict[str, Any]] | None = None
        self._publish()

    @property
    def done(self) -> bool:
        """Whether the last stage has finished."""
        return self.state.done

    def info(self) -> dict[str, Any]:
        """The stage record workers read: stage, its training and evaluation horizons, state."""
        s = self.state.stage
        return {"stage": s, "num_steps": train_horizon(self.stages, s),
                "eval_steps": eval_horizon(self.stages, s), "done": self.state.done,
                "state": self.state.to_json()}

    def _publish(self) -> None:
        from l2o.io.atomic import write_json

        write_json(self.state_path, {"state": self.state.to_json(), "events": self.events})
        self.publish(self.info())

    def _score(self, theta: Any, version: int, steps: int) -> float:
        if self.scorer is not None:
            return float(self.scorer(theta, version, steps))
        import numpy as np

        from l2o.evaluation.comparison import loss_curves
        from l2o.training.build import (
            learned_optimizer_from_config,
            task_family_from_config,
            validation_task_and_run_key,
        )

        if self._eval_setup is None:  # the same task and keys as Trainer.quick_eval
            family = task_family_from_config(self.cfg.eval_task())
            task, k_run = validation_task_and_run_key(self.cfg.seed, family)
            self._eval_setup = (task, k_run, learned_optimizer_from_config(self.cfg.optimizer))
        task, key, lopt = self._eval_setup
        curves = loss_curves(task, lopt, theta, steps=steps,
                             seeds=self.cfg.curriculum.eval_seeds, key=key)
        final = float(np.mean(curves[:, -1]))
        return final if math.isfinite(final) else math.inf

    def poll(self, status: dict[str, Any]) -> dict[str, Any] | None:
        """Evaluate θ when ``status["updates"]`` has reached the next evaluation; the recorded
        event (``None`` when it was not time yet or the curriculum is finished)."""
        updates = int(status.get("updates", 0))
        if self.state.done or updates < self.next_eval:
            return None
        from l2o.io.checkpoints import CheckpointMeta, save_checkpoint

        period = self.cfg.curriculum.eval_period
        self.next_eval = (updates // period + 1) * period
        version, theta = self.fetch()
        stage = self.state.stage
        steps = eval_horizon(self.stages, stage)
        score = self._score(theta, version, steps)
        new_state, decision = curriculum_update(self.stages, self.cfg.curriculum.patience,
                                                self.state, score, version)
        event: dict[str, Any] = {"updates": updates, "version": version, "stage": stage,
                                 "train_steps": train_horizon(self.stages, stage),
                                 "eval_steps": steps, "eval_final_loss": score,
                                 "curriculum": decision.action.value}
        best_path = self.run_dir / "checkpoints" / best_checkpoint_name(stage)
        if decision.action is Action.NEW_BEST:
            save_checkpoint(best_path, theta, CheckpointMeta(
                kind="params", version=version, stage=stage, eval_final_loss=score,
                eval_steps=steps, seed=self.cfg.seed,
                optimizer=self.cfg.optimizer.model_dump(mode="json")))
        self.state = new_state
        self.events.append(event)
        if decision.restore_version is not None:
            event["restored_version"] = decision.restore_version
        if decision.action is Action.ADVANCE:
            event["next_stage"] = decision.stage
            self._publish()  # workers switch horizon before the restored θ exists
            if decision.restore_version is not None:
                event["restored"] = self.restore(best_path, decision.restore_version)
        elif decision.action is Action.FINISHED and decision.restore_version is not None:
            # restored by finish(), once the workers have stopped, so that no update lands on it
            self._pending = (best_path, decision.restore_version, event)
        self._publish()
        return event

    def finish(self) -> dict[str, Any] | None:
        """After the workers have stopped: restore the last stage's best θ if the curriculum
        finished (the learner's final checkpoint then holds it); the learner's answer or None."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        path, version, event = pending
        event["restored"] = self.restore(path, version)
        self._publish()
        return event["restored"]

    def summary(self) -> dict[str, Any]:
        """The curriculum's figures for ``summary.json``: stages, final state, every event."""
        return {"stages": list(self.stages), "patience": self.cfg.curriculum.patience,
                **self.info(), "events": self.events}
