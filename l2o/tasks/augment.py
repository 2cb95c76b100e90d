"""Parameter-reparameterization augmentation: rescale each tensor, undo it in the loss.

:class:`ReparamFamily` wraps any task family. Each sampled task also draws one scale ``s`` per
parameter tensor, log-uniform in ``[min_scale, max_scale]``. The wrapped task works in rescaled
coordinates ``q = p / s``:

* ``init(key) = base.init(key) / s``
* ``loss(q, batch) = base.loss(q · s, batch)``

so it is the same problem (same losses along corresponding trajectories) but the optimizer sees
parameters divided by ``s`` and gradients multiplied by ``s`` (``∇_q = s ∇_p``). An optimizer
meta-trained on such tasks must cope with arbitrary per-tensor scales, i.e. learn scale
invariance. Plain SGD is not invariant to it; Adam is invariant to the gradient scale but not to
the parameter scale.

The scales are part of the task config (a pytree of scalars shaped like the parameter tree), so
sampling works under ``jit``/``vmap`` like any family.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from l2o.tasks.base import Task, TaskFamily
from l2o.types import Batch, Params, PRNGKey


@struct.dataclass
class ReparamConfig:
    """The base family's config and the per-tensor scales (a tree of float32 scalars)."""

    base: Any
    scales: Any


@struct.dataclass
class ReparamTask(Task):
    """``base`` seen through ``q = p / scales`` (``scales``: one scalar per parameter tensor)."""

    base: Task
    scales: Any

    def init(self, key: PRNGKey) -> Params:
        """The base initialization divided by the scales."""
        return jax.tree_util.tree_map(lambda p, s: p / s.astype(p.dtype), self.base.init(key),
                                      self.scales)

    def to_base(self, params: Params) -> Params:
        """Rescaled parameters back to the base task's coordinates (``q · s``)."""
        return jax.tree_util.tree_map(lambda q, s: q * s.astype(q.dtype), params, self.scales)

    def sample_batch(self, key: PRNGKey) -> Batch:
        return self.base.sample_batch(key)

    def sample_eval_batch(self, key: PRNGKey) -> Batch:
        return self.base.sample_eval_batch(key)

    def loss(self, params: Params, batch: Batch) -> jax.Array:
        """The base loss at ``params · scales``."""
        return self.base.loss(self.to_base(params), batch)

    @property
    def name(self) -> str:
        return f"reparam_{self.base.name}"


@struct.dataclass
class ReparamFamily(TaskFamily):
    """``base`` with per-tensor parameter scales log-uniform in ``[min_scale, max_scale]``."""

    base: TaskFamily
    min_scale: float = struct.field(pytree_node=False, default=1e-2)
    max_scale: float = struct.field(pytree_node=False, default=1e2)

    def __post_init__(self):
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, "
                             f"{self.max_scale}")

    def sample(self, key: PRNGKey) -> ReparamConfig:
        """The base config and one log-uniform scale per tensor of the base task's parameters."""
        k_base, k_scale = jax.random.split(key)
        base_cfg = self.base.sample(k_base)
        shapes = jax.eval_shape(lambda c, k: self.base.task(c).init(k), base_cfg, k_scale)
        leaves, treedef = jax.tree_util.tree_flatten(shapes)
        logs = jax.random.uniform(k_scale, (len(leaves),), jnp.float32,
                                  math.log(self.min_scale), math.log(self.max_scale))
        scales = jax.tree_util.tree_unflatten(treedef, list(jnp.exp(logs)))
        return ReparamConfig(base=base_cfg, scales=scales)

    def task(self, cfg: ReparamConfig) -> ReparamTask:
        """The base task of ``cfg.base`` in coordinates rescaled by ``cfg.scales``."""
        return ReparamTask(base=self.base.task(cfg.base), scales=cfg.scales)

    @property
    def name(self) -> str:
        return f"reparam_{self.base.name}"
