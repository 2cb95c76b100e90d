"""L2L's ``simple`` problem: one scalar ``x``, initialized to 1, with loss ``x²``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from l2o.tasks.base import SingleTaskFamily, Task
from l2o.types import Batch, Params, PRNGKey


@struct.dataclass
class SimpleTask(Task):
    """Minimize ``x²`` from ``x = 1`` (a scalar, as in L2L; the init ignores its key)."""

    def init(self, key: PRNGKey) -> Params:
        """``{"x": 1.0}`` (a 0-d float32 array)."""
        return {"x": jnp.ones((), jnp.float32)}

    def loss(self, params: Params, batch: Batch = ()) -> jax.Array:
        """``x²``."""
        return jnp.square(params["x"])

    @property
    def name(self) -> str:
        return "simple"


def simple_family() -> SingleTaskFamily:
    """The family holding the single :class:`SimpleTask`."""
    return SingleTaskFamily(base=SimpleTask())
