"""Inner-horizon schedules: how many steps an inner problem runs before it restarts.

The unroll length of a truncation is a static shape inside ``jit``, so schedules act on the
*inner horizon* instead, which is data: each inner problem draws its own horizon when it
(re)starts and stores it in :attr:`~l2o.estimators.truncated_step.InnerState.horizon`. Heavy-tailed
(log-uniform) horizons are what the learned-optimizer literature samples; a curriculum grows the
bounds with the meta-iteration so early meta-training sees short, cheap, low-variance problems.

Every schedule is a frozen (hashable) dataclass used as static configuration of a
:class:`~l2o.estimators.truncated_step.TruncatedStep`. ``bounds(iteration)`` and
``sample(key, iteration)`` accept a Python int *or* a traced int32 array, so the trainer can query a
schedule by meta-iteration on the host, and estimators can sample inside ``jit`` from the
truncation counter they keep in their worker state, without recompiling as the bounds move.
``max_length`` is the static upper bound (what ``num_steps`` must cover).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from l2o.types import PRNGKey

IntLike = int | jax.Array


@dataclasses.dataclass(frozen=True)
class HorizonSchedule:
    """A distribution over inner horizons, possibly depending on the meta-iteration."""

    def bounds(self, iteration: IntLike) -> tuple[jax.Array, jax.Array]:
        """``(low, high)``: the inclusive range horizons are drawn from at ``iteration``."""
        raise NotImplementedError

    @property
    def max_length(self) -> int:
        """The largest horizon this schedule can ever return."""
        raise NotImplementedError

    def sample(self, key: PRNGKey, iteration: IntLike = 0) -> jax.Array:
        """An int32 horizon in ``bounds(iteration)``, log-uniformly distributed.

        ``log h`` is uniform on ``[log low, log(high + 1))`` and ``h`` its floor, so every integer
        in the range has probability proportional to ``log((h + 1) / h)``.
        """
        low, high = self.bounds(iteration)
        low = jnp.asarray(low, jnp.float32)
        high = jnp.asarray(high, jnp.float32)
        u = jax.random.uniform(key, ())
        log_h = jnp.log(low) + u * (jnp.log(high + 1.0) - jnp.log(low))
        h = jnp.floor(jnp.exp(log_h))
        return jnp.clip(h, low, high).astype(jnp.int32)


def _check_range(low: int, high: int) -> None:
    if int(low) != low or int(high) != high or low < 1 or high < low:
        raise ValueError(f"horizon bounds must be ints with 1 <= low <= high, got {low}, {high}")


@dataclasses.dataclass(frozen=True)
class ConstantHorizon(HorizonSchedule):
    """Every problem runs exactly ``length`` steps."""

    length: int

    def __post_init__(self) -> None:
        _check_range(self.length, self.length)

    def bounds(self, iteration: IntLike) -> tuple[jax.Array, jax.Array]:
        n = jnp.asarray(self.length, jnp.int32)
        return n, n

    @property
    def max_length(self) -> int:
        return int(self.length)

    def sample(self, key: PRNGKey, iteration: IntLike = 0) -> jax.Array:
        return jnp.asarray(self.length, jnp.int32)


@dataclasses.dataclass(frozen=True)
class LogUniformHorizon(HorizonSchedule):
    """Horizons log-uniform between ``low`` and ``high`` (inclusive)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _check_range(self.low, self.high)

    def bounds(self, iteration: IntLike) -> tuple[jax.Array, jax.Array]:
        return jnp.asarray(self.low, jnp.int32), jnp.asarray(self.high, jnp.int32)

    @property
    def max_length(self) -> int:
        return int(self.high)


@dataclasses.dataclass(frozen=True)
class GrowingLogUniformHorizon(HorizonSchedule):
    """A curriculum: log-uniform horizons whose bounds grow with the meta-iteration.

    The bounds start at ``(start_min, start_max)`` and move geometrically to
    ``(end_min, end_max)`` over ``ramp_iterations`` meta-iterations, then stay there::

        frac = min(iteration / ramp_iterations, 1)
        low  = round(start_min · (end_min / start_min) ** frac)      (likewise high)
    """

    start_min: int
    start_max: int
    end_min: int
    end_max: int
    ramp_iterations: int = 1000

    def __post_init__(self) -> None:
        _check_range(self.start_min, self.start_max)
        _check_range(self.end_min, self.end_max)
        if self.ramp_iterations < 1:
            raise ValueError(f"ramp_iterations must be >= 1, got {self.ramp_iterations}")

    def bounds(self, iteration: IntLike) -> tuple[jax.Array, jax.Array]:
        frac = jnp.clip(jnp.asarray(iteration, jnp.float32) / self.ramp_iterations, 0.0, 1.0)

        def interp(a: int, b: int) -> jax.Array:
            v = jnp.exp(math.log(a) + frac * (math.log(b) - math.log(a)))
            return jnp.round(v).astype(jnp.int32)

        low = interp(self.start_min, self.end_min)
        high = jnp.maximum(interp(self.start_max, self.end_max), low)
        return low, high

    @property
    def max_length(self) -> int:
        return int(max(self.start_max, self.end_max))


def make_horizon_schedule(kind: str, num_steps: int, min_length: int | None = None,
                          max_length: int | None = None, start_min: int | None = None,
                          start_max: int | None = None,
                          ramp_iterations: int = 1000) -> HorizonSchedule | None:
    """The schedule named ``kind``: ``"constant"`` (``None``: every problem runs ``num_steps``),
    ``"log_uniform"`` or ``"growing"``.

    ``max_length`` defaults to ``num_steps`` and ``min_length`` to ``max(1, max_length // 10)``;
    a growing schedule starts at ``(start_min, start_max)`` (default ``min_length`` for both) and
    reaches ``(min_length, max_length)`` after ``ramp_iterations``.
    """
    if kind == "constant":
        return None
    hi = num_steps if max_length is None else max_length
    lo = max(1, hi // 10) if min_length is None else min_length
    if hi > num_steps:
        raise ValueError(f"max horizon {hi} exceeds num_steps {num_steps}")
    if kind == "log_uniform":
        return LogUniformHorizon(lo, hi)
    if kind == "growing":
        s_lo = lo if start_min is None else start_min
        s_hi = s_lo if start_max is None else start_max
        if s_hi > num_steps:
            raise ValueError(f"start horizon {s_hi} exceeds num_steps {num_steps}")
        return GrowingLogUniformHorizon(s_lo, s_hi, lo, hi, ramp_iterations)
    raise ValueError(f"unknown horizon schedule {kind!r}; known: constant, log_uniform, growing")
