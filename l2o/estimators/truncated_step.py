"""The truncated step: one inner-training step of one inner problem, shared by all estimators.

An inner problem is a task drawn from a :class:`~l2o.tasks.TaskFamily`, its parameters and the
state of the optimizer ``opt_fn(θ)`` training it. :meth:`TruncatedStep.step` advances it by one
inner step and resets it (new task, new initialization, fresh optimizer state) once its horizon
``num_steps`` is reached. Estimators ``lax.scan`` this step over a truncation and ``vmap`` it over
several inner problems; truncated backprop differentiates through it, ES and PES perturb θ.

Optional extensions, all off by default (the behaviour above is then unchanged):

- ``horizon_schedule``: a :class:`~l2o.estimators.schedules.HorizonSchedule`. Each inner problem
  then draws its own horizon when it (re)starts, stored in :attr:`InnerState.horizon`, instead of
  using ``num_steps`` (which stays the static upper bound; keep it at least the schedule's
  ``max_length``); ``opt.init`` is then told the drawn horizon (a traced int32). Schedules may
  depend on a traced meta-iteration (a curriculum),
  passed as ``iteration`` to :meth:`TruncatedStep.step`, :meth:`~TruncatedStep.unroll` and
  :meth:`~TruncatedStep.init_states`.
- ``random_offset`` in :meth:`TruncatedStep.init_states`: the first problems start at a uniformly
  random step of their horizon, so vmapped problems do not restart in lock-step.
- ``eval_split_loss``: each step also reports the loss of the *updated* parameters on a batch of
  the task's evaluation split (``Task.sample_eval_batch``), for meta-losses on held-out data.
- ``theta_batched`` in :meth:`TruncatedStep.unroll`: θ carries a leading axis (one θ per problem),
  as ES and PES need for their perturbed copies.
- ``imitation``: an :class:`~l2o.estimators.imitation.Imitation`. Each problem then draws at every
  (re)start whether its episode imitates Adam, carries the teacher's state in
  :attr:`InnerState.imitation`, follows the teacher's steps while imitating and reports
  :attr:`StepOutput.imitation_loss` and :attr:`StepOutput.imitating` (see that module for the
  exact definition).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
from flax import struct
from pydantic import PositiveInt

from l2o.estimators.registry import EstimatorSettings
from l2o.estimators.schedules import make_horizon_schedule
from l2o.optimizers.base import LearnedOptimizer
from l2o.tasks.base import TaskFamily
from l2o.types import MetaParams, PRNGKey

if TYPE_CHECKING:
    from l2o.estimators.imitation import Imitation
    from l2o.estimators.schedules import HorizonSchedule


@struct.dataclass
class InnerState:
    """One inner problem: its task config, optimizer state (holding params) and step count."""

    task_cfg: Any
    opt_state: Any
    step: jax.Array  # int32: inner steps done since the last reset
    #: int32 horizon drawn at the last reset when a horizon schedule is used, else ``None``
    horizon: jax.Array | None = None
    #: :class:`~l2o.estimators.imitation.ImitationState` when imitation is on, else ``None``
    imitation: Any = None

    def limit(self, default: int) -> jax.Array | int:
        """The step count at which this problem restarts (``default`` without a schedule)."""
        return default if self.horizon is None else self.horizon


@struct.dataclass
class StepOutput:
    """What one inner step reports."""

    loss: jax.Array  # loss of the parameters *before* the update, on this step's batch
    reset: jax.Array  # bool: the problem was re-initialized at the start of this step
    #: loss of the parameters *after* the update on an evaluation-split batch, when
    #: ``TruncatedStep.eval_split_loss`` is set; else ``None``
    eval_loss: jax.Array | None = None
    #: with imitation on: ``0.5·Σ(Δ_teacher − Δ_learned)²`` of this step (computed for every
    #: step), and whether the step imitated (its parameters then moved by ``Δ_teacher``)
    imitation_loss: jax.Array | None = None
    imitating: jax.Array | None = None


def tree_where(cond: jax.Array, a, b):
    """Elementwise ``cond ? a : b`` over two pytrees of the same structure (scalar ``cond``)."""
    return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


@struct.dataclass
class TruncatedStep:
    """Inner training of tasks from ``family`` by ``learned_opt.opt_fn(θ)``.

    ``family`` is a pytree field (its data are jit arguments, not constants); the rest is static.
    """

    family: TaskFamily
    learned_opt: LearnedOptimizer = struct.field(pytree_node=False)
    num_steps: int = struct.field(pytree_node=False, default=100)
    second_derivatives: bool = struct.field(pytree_node=False, default=False)
    horizon_schedule: HorizonSchedule | None = struct.field(pytree_node=False, default=None)
    eval_split_loss: bool = struct.field(pytree_node=False, default=False)
    imitation: Imitation | None = struct.field(pytree_node=False, default=None)

    def init_state(self, theta: MetaParams, key: PRNGKey,
                   iteration: jax.Array | int | None = None) -> InnerState:
        """A fresh inner problem (unbatched; ``vmap`` for several).

        ``iteration`` (the meta-iteration, possibly traced) only matters to a curriculum schedule.
        """
        k_task, k_init = jax.random.split(key)
        cfg = self.family.sample(k_task)
        params = self.family.task(cfg).init(k_init)
        horizon = None
        if self.horizon_schedule is not None:
            k_h = jax.random.fold_in(key, 0x5C4ED)
            horizon = self.horizon_schedule.sample(k_h, 0 if iteration is None else iteration)
        # the optimizer is told the horizon this problem will actually run (traced when sampled)
        opt = self.learned_opt.opt_fn(theta)
        opt_state = opt.init(params, num_steps=self.num_steps if horizon is None else horizon,
                             key=k_init)
        imitation = None
        if self.imitation is not None:
            from l2o.estimators.imitation import ImitationState

            k_mt = jax.random.fold_in(key, 0x1A17A7E)
            imitation = ImitationState(
                active=jax.random.bernoulli(k_mt, self.imitation.ratio),
                teacher=self.imitation.teacher().init(params))
        return InnerState(task_cfg=cfg, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                          horizon=horizon, imitation=imitation)

    def step(self, theta: MetaParams, state: InnerState, key: PRNGKey,
             iteration: jax.Array | int | None = None) -> tuple[InnerState, StepOutput]:
        """Reset the problem if its horizon is reached, then take one inner step."""
        k_reset, k_batch, k_opt = jax.random.split(key, 3)
        reset = state.step >= state.limit(self.num_steps)
        state = tree_where(reset, self.init_state(theta, k_reset, iteration), state)
        return self._advance(theta, state, reset, k_batch, k_opt)

    def _advance(self, theta: MetaParams, state: InnerState, reset: jax.Array, k_batch: PRNGKey,
                 k_opt: PRNGKey) -> tuple[InnerState, StepOutput]:
        """The inner step proper, once a due reset has been applied."""
        task = self.family.task(state.task_cfg)
        opt = self.learned_opt.opt_fn(theta, is_training=True)
        batch = task.sample_batch(k_batch)
        params = opt.params(state.opt_state)
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        if not self.second_derivatives:
            grads = jax.lax.stop_gradient(grads)
        opt_state = opt.update(state.opt_state, grads, loss=loss, key=k_opt)
        imitation = mt_loss = imitating = None
        if self.imitation is not None:
            opt_state, imitation, mt_loss, imitating = self._imitate(
                opt, state, params, grads, opt_state)
        new_state = InnerState(task_cfg=state.task_cfg, opt_state=opt_state, step=state.step + 1,
                               horizon=state.horizon, imitation=imitation)
        eval_loss = None
        if self.eval_split_loss:
            k_eval = jax.random.fold_in(k_batch, 1)
            eval_loss = task.loss(opt.params(opt_state), task.sample_eval_batch(k_eval))
        return new_state, StepOutput(loss=loss, reset=reset, eval_loss=eval_loss,
                                     imitation_loss=mt_loss, imitating=imitating)

    def _imitate(self, opt, state: InnerState, params, grads, opt_state):
        """The teacher's step at the same point: the imitation loss, and the teacher's trajectory.

        Returns the learned optimizer's new state with its parameters moved by the teacher's step
        when this step imitates, the teacher's new state, the imitation loss and the flag.
        """
        from l2o.estimators.imitation import imitation_loss, tree_sub
        from l2o.optimizers.mixed import MixedState

        if isinstance(opt_state, MixedState) or not hasattr(opt_state, "params"):
            raise TypeError(f"imitation needs an optimizer state holding the whole parameters in "
                            f"a `params` field; {type(opt_state).__name__} does not (the mixed "
                            f"optimizer keeps copies per side)")
        mt = state.imitation
        d_teacher, teacher = self.imitation.teacher().update(grads, mt.teacher, params)
        learned_params = opt.params(opt_state)
        loss = imitation_loss(d_teacher, tree_sub(learned_params, params))
        imitating = jnp.logical_and(mt.active, state.step < self.imitation.steps)
        new_params = tree_where(imitating, jax.tree_util.tree_map(jnp.add, params, d_teacher),
                                learned_params)
        opt_state = opt_state.replace(params=new_params)
        return opt_state, mt.replace(teacher=teacher), loss, imitating

    def final_loss(self, theta: MetaParams, state: InnerState, key: PRNGKey,
                   split: str = "train") -> jax.Array:
        """Loss of the problem's current parameters on a fresh batch (``split``: train or eval)."""
        task = self.family.task(state.task_cfg)
        params = self.learned_opt.opt_fn(theta).params(state.opt_state)
        batch = task.sample_eval_batch(key) if split == "eval" else task.sample_batch(key)
        return task.loss(params, batch)

    def init_states(self, theta: MetaParams, key: PRNGKey, num_tasks: int,
                    random_offset: bool = False,
                    iteration: jax.Array | int | None = None) -> InnerState:
        """``num_tasks`` fresh inner problems, stacked on a leading axis.

        With ``random_offset`` each problem's step counter starts uniformly in
        ``[0, horizon)``, so the problems reach their horizons (and restart) at different
        truncations instead of in lock-step. Their parameters are still fresh: the first episode
        of each problem is just shorter.
        """
        keys = jax.random.split(key, num_tasks)
        states = jax.vmap(self.init_state, in_axes=(None, 0, None))(theta, keys, iteration)
        if random_offset:
            limit = states.limit(self.num_steps)
            u = jax.random.uniform(jax.random.fold_in(key, 0x0FF5E7), (num_tasks,))
            offset = jnp.floor(u * limit).astype(jnp.int32)
            states = states.replace(step=jnp.minimum(offset, jnp.asarray(limit) - 1))
        return states

    def unroll(self, theta: MetaParams, states: InnerState, key: PRNGKey, length: int,
               theta_batched: bool = False, iteration: jax.Array | int | None = None,
               key_groups: int = 1) -> tuple[InnerState, StepOutput]:
        """``length`` steps of every stacked problem: ``lax.scan`` over steps, ``vmap`` over tasks.

        Each step is :meth:`step` on every problem, with one difference in cost only: fresh
        problems are built only at steps where at least one problem restarts (a ``lax.cond`` over
        the whole batch), not at every step. With ``theta_batched`` θ has a leading axis, one θ
        per problem. ``key_groups = G`` splits the batch into ``G`` consecutive blocks whose
        problems ``i``, ``i + N/G``, … receive the same keys (antithetic pairs use ``G = 2``).
        Returns the final states and the per-step outputs with shape ``[length, num_tasks]``.
        """
        num_tasks = jax.tree_util.tree_leaves(states.step)[0].shape[0]
        if num_tasks % key_groups:
            raise ValueError(f"{num_tasks} problems do not split into {key_groups} key groups")
        th_axis = 0 if theta_batched else None
        init_b = jax.vmap(self.init_state, in_axes=(th_axis, 0, None))
        advance_b = jax.vmap(self._advance, in_axes=(th_axis, 0, 0, 0, 0))

        def body(carry: InnerState, k: PRNGKey):
            keys = jax.random.split(k, num_tasks // key_groups)
            if key_groups > 1:
                keys = jnp.concatenate([keys] * key_groups, axis=0)
            k3 = jax.vmap(lambda kk: jax.random.split(kk, 3))(keys)
            k_reset, k_batch, k_opt = k3[:, 0], k3[:, 1], k3[:, 2]
            reset = carry.step >= carry.limit(self.num_steps)

            def with_resets(st: InnerState) -> InnerState:
                fresh = init_b(theta, k_reset, iteration)
                pick = lambda a, b: jnp.where(reset.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
                return jax.tree_util.tree_map(pick, fresh, st)

            carry = jax.lax.cond(jnp.any(reset), with_resets, lambda st: st, carry)
            return advance_b(theta, carry, reset, k_batch, k_opt)

        return jax.lax.scan(body, states, jax.random.split(key, length))


class TruncatedStepSettings(EstimatorSettings):
    """The fields of the estimators built on a :class:`TruncatedStep`: second derivatives and the
    inner-horizon schedule (:mod:`l2o.estimators.schedules`).

    The schedule's bounds default to ``num_steps // 10`` and ``num_steps``; ``growing`` ramps from
    ``(horizon_start_min, horizon_start_max)`` over ``horizon_ramp`` truncations of a worker.
    """

    second_derivatives: bool = False
    horizon_schedule: Literal["constant", "log_uniform", "growing"] = "constant"
    horizon_min: PositiveInt | None = None
    horizon_max: PositiveInt | None = None
    horizon_start_min: PositiveInt | None = None
    horizon_start_max: PositiveInt | None = None
    horizon_ramp: PositiveInt = 1000

    def truncated_step(self, family: TaskFamily, learned_opt: LearnedOptimizer,
                       eval_split_loss: bool = False,
                       imitation: Imitation | None = None) -> TruncatedStep:
        """The :class:`TruncatedStep` these settings describe."""
        schedule = make_horizon_schedule(
            self.horizon_schedule, self.num_steps, self.horizon_min, self.horizon_max,
            self.horizon_start_min, self.horizon_start_max, self.horizon_ramp)
        return TruncatedStep(family=family, learned_opt=learned_opt, num_steps=self.num_steps,
                             second_derivatives=self.second_derivatives,
                             horizon_schedule=schedule, eval_split_loss=eval_split_loss,
                             imitation=imitation)
