"""Quadratic problems of "Learning to learn by gradient descent by gradient descent".

``f(x) = ‖W x − y‖²`` with ``W`` (d×d) and ``y`` (d) drawn from a standard normal per problem, and
``x`` initialized from a standard normal. The paper uses d = 10; its "batch of 128 functions" is
128 vmapped inner problems of this family.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from l2o.tasks.base import Task, TaskFamily
from l2o.types import PRNGKey


@struct.dataclass
class QuadraticConfig:
    """The random pieces of one quadratic: matrix ``w`` and target ``y``."""

    w: jax.Array
    y: jax.Array


@struct.dataclass
class QuadraticTask(Task):
    """``f(x) = ‖W x − y‖²`` (summed over coordinates, as in L2L)."""

    w: jax.Array
    y: jax.Array

    def init(self, key: PRNGKey) -> dict:
        return {"x": jax.random.normal(key, self.y.shape)}

    def loss(self, params: dict, batch=()) -> jax.Array:
        r = self.w @ params["x"] - self.y
        return jnp.sum(r * r)

    @property
    def name(self) -> str:
        return f"quadratic{self.y.shape[0]}"


@struct.dataclass
class QuadraticFamily(TaskFamily):
    """Random ``d``-dimensional quadratics (``d = 10`` in L2L)."""

    dim: int = struct.field(pytree_node=False, default=10)

    def sample(self, key: PRNGKey) -> QuadraticConfig:
        kw, ky = jax.random.split(key)
        return QuadraticConfig(
            w=jax.random.normal(kw, (self.dim, self.dim)),
            y=jax.random.normal(ky, (self.dim,)),
        )

    def task(self, cfg: QuadraticConfig) -> QuadraticTask:
        return QuadraticTask(w=cfg.w, y=cfg.y)

    @property
    def name(self) -> str:
        return f"quadratic{self.dim}"
