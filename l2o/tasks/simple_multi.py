"""L2L's ``simple-multi`` problem: scalars ``x_0`` and ``x_1``, both from 1, loss ``x_0² + x_1²``.

In L2L one variable is optimized by the learned optimizer and the other by Adam. Here the task is
only the objective; the split is the optimizer's business: the ``l2l-simple-multi`` preset uses
:class:`~l2o.optimizers.mixed.MixedOptimizer` with ``learned_paths="^x_0$"`` (``x_0`` learned,
``x_1`` Adam).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from l2o.tasks.base import SingleTaskFamily, Task
from l2o.types import Batch, Params, PRNGKey


@struct.dataclass
class SimpleMultiTask(Task):
    """Minimize ``x_0² + x_1²`` from ``x_0 = x_1 = 1`` (scalars; the init ignores its key)."""

    def init(self, key: PRNGKey) -> Params:
        """``{"x_0": 1.0, "x_1": 1.0}`` (0-d float32 arrays)."""
        one = jnp.ones((), jnp.float32)
        return {"x_0": one, "x_1": one}

    def loss(self, params: Params, batch: Batch = ()) -> jax.Array:
        """``x_0² + x_1²``."""
        return jnp.square(params["x_0"]) + jnp.square(params["x_1"])

    @property
    def name(self) -> str:
        return "simple_multi"


def simple_multi_family() -> SingleTaskFamily:
    """The family holding the single :class:`SimpleMultiTask`."""
    return SingleTaskFamily(base=SimpleMultiTask())
