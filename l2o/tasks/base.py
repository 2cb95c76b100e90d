"""The ``Task`` and ``TaskFamily`` interfaces.

A :class:`Task` is one inner problem: it initializes parameters from a key, samples a batch from
its data (inside ``jit``: data lives on the device) and returns the loss of parameters on a batch.

A :class:`TaskFamily` is a distribution over tasks. ``sample(key)`` returns a small pytree, the
*task config* (e.g. the matrix ``W`` and target ``y`` of a quadratic), and ``task(cfg)`` builds the
:class:`Task`. Estimators ``vmap`` over configs, never over data, so a dataset is stored once and
shared by every vmapped problem.

Both are ``flax.struct`` dataclasses. Arrays (datasets, configs) are pytree leaves, so a family can
be passed *as an argument* to a jitted function instead of being baked into the compiled program as
a constant; sizes and names are static fields.
"""

from __future__ import annotations

import jax
from flax import struct

from l2o.types import Batch, Params, PRNGKey


@struct.dataclass
class Task:
    """One inner problem. Subclasses are ``flax.struct`` dataclasses."""

    def init(self, key: PRNGKey) -> Params:
        """Initial parameters drawn from ``key``."""
        raise NotImplementedError

    def sample_batch(self, key: PRNGKey) -> Batch:
        """A training batch drawn from ``key`` (jit-friendly). Tasks without data return ``()``."""
        return ()

    def sample_eval_batch(self, key: PRNGKey) -> Batch:
        """A batch for evaluation; held-out data where the task has a split."""
        return self.sample_batch(key)

    def loss(self, params: Params, batch: Batch) -> jax.Array:
        """Scalar loss of ``params`` on ``batch``."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """A short human-readable name."""
        return type(self).__name__


@struct.dataclass
class TaskFamily:
    """A distribution over tasks. Subclasses are ``flax.struct`` dataclasses."""

    def sample(self, key: PRNGKey) -> struct.PyTreeNode | tuple | jax.Array:
        """A task config (a small pytree) drawn from ``key``."""
        raise NotImplementedError

    def task(self, cfg) -> Task:
        """The task described by ``cfg`` (a value returned by :meth:`sample`)."""
        raise NotImplementedError

    def sample_task(self, key: PRNGKey) -> Task:
        """Convenience: ``task(sample(key))``."""
        return self.task(self.sample(key))

    @property
    def name(self) -> str:
        """A short human-readable name."""
        return type(self).__name__


@struct.dataclass
class SingleTaskFamily(TaskFamily):
    """The family holding exactly one task (every sample is the same problem).

    Inner problems still differ through their initialization and batch keys.
    """

    base: Task

    def sample(self, key: PRNGKey) -> jax.Array:
        # A dummy leaf so vmapped code always has something to map over.
        return jax.numpy.zeros(())

    def task(self, cfg) -> Task:
        return self.base

    @property
    def name(self) -> str:
        return self.base.name
