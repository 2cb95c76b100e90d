"""The truncated step: one inner-training step of one inner problem, shared by all estimators.

An inner problem is a task drawn from a :class:`~l2o.tasks.TaskFamily`, its parameters and the
state of the optimizer ``opt_fn(θ)`` training it. :meth:`TruncatedStep.step` advances it by one
inner step and resets it (new task, new initialization, fresh optimizer state) once its horizon
``num_steps`` is reached. Estimators ``lax.scan`` this step over a truncation and ``vmap`` it over
several inner problems; truncated backprop differentiates through it, ES and PES perturb θ.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from l2o.optimizers.base import LearnedOptimizer
from l2o.tasks.base import TaskFamily
from l2o.types import MetaParams, PRNGKey


@struct.dataclass
class InnerState:
    """One inner problem: its task config, optimizer state (holding params) and step count."""

    task_cfg: Any
    opt_state: Any
    step: jax.Array  # int32: inner steps done since the last reset


@struct.dataclass
class StepOutput:
    """What one inner step reports."""

    loss: jax.Array  # loss of the parameters *before* the update, on this step's batch
    reset: jax.Array  # bool: the problem was re-initialized at the start of this step


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

    def init_state(self, theta: MetaParams, key: PRNGKey) -> InnerState:
        """A fresh inner problem (unbatched; ``vmap`` for several)."""
        k_task, k_init = jax.random.split(key)
        cfg = self.family.sample(k_task)
        params = self.family.task(cfg).init(k_init)
        opt = self.learned_opt.opt_fn(theta)
        opt_state = opt.init(params, num_steps=self.num_steps, key=k_init)
        return InnerState(task_cfg=cfg, opt_state=opt_state, step=jnp.zeros((), jnp.int32))

    def step(self, theta: MetaParams, state: InnerState,
             key: PRNGKey) -> tuple[InnerState, StepOutput]:
        """Reset the problem if its horizon is reached, then take one inner step."""
        k_reset, k_batch, k_opt = jax.random.split(key, 3)
        reset = state.step >= self.num_steps
        state = tree_where(reset, self.init_state(theta, k_reset), state)

        task = self.family.task(state.task_cfg)
        opt = self.learned_opt.opt_fn(theta, is_training=True)
        batch = task.sample_batch(k_batch)
        params = opt.params(state.opt_state)
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        if not self.second_derivatives:
            grads = jax.lax.stop_gradient(grads)
        opt_state = opt.update(state.opt_state, grads, loss=loss, key=k_opt)
        new_state = InnerState(task_cfg=state.task_cfg, opt_state=opt_state, step=state.step + 1)
        return new_state, StepOutput(loss=loss, reset=reset)

    def final_loss(self, theta: MetaParams, state: InnerState, key: PRNGKey) -> jax.Array:
        """Loss of the problem's current parameters on a fresh batch."""
        task = self.family.task(state.task_cfg)
        params = self.learned_opt.opt_fn(theta).params(state.opt_state)
        return task.loss(params, task.sample_batch(key))

    def init_states(self, theta: MetaParams, key: PRNGKey, num_tasks: int) -> InnerState:
        """``num_tasks`` fresh inner problems, stacked on a leading axis."""
        return jax.vmap(self.init_state, in_axes=(None, 0))(theta, jax.random.split(key, num_tasks))

    def unroll(self, theta: MetaParams, states: InnerState, key: PRNGKey,
               length: int) -> tuple[InnerState, StepOutput]:
        """``length`` steps of every stacked problem: ``lax.scan`` over steps, ``vmap`` over tasks.

        Returns the final states and the per-step outputs with shape ``[length, num_tasks]``.
        """
        num_tasks = jax.tree_util.tree_leaves(states.step)[0].shape[0]
        batched_step = jax.vmap(self.step, in_axes=(None, 0, 0))

        def body(carry, k):
            return batched_step(theta, carry, jax.random.split(k, num_tasks))

        return jax.lax.scan(body, states, jax.random.split(key, length))
