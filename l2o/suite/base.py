"""What one task of a held-out evaluation suite is.

A :class:`SuiteTask` wraps an ordinary :class:`~l2o.tasks.base.Task` (``init``, ``sample_batch``,
``loss``: what an optimizer trains on) with what the suite needs to score a run:

- ``horizon``: the number of inner steps ``N`` every optimizer gets;
- :meth:`SuiteTask.train_loss`: the loss on a fixed part of the *training* split (deterministic,
  unlike the minibatch loss), which curves, final losses and speedups are computed from;
- :meth:`SuiteTask.test_metric`: the metric on the *test* split, which no optimizer ever trains on
  (``accuracy``: higher is better; ``loss``: lower is better).

Both functions are pure and traceable: the suite's runner closes over a ``SuiteTask`` inside
``jit``/``vmap``/``lax.scan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from l2o.tasks.base import Task
from l2o.types import Params

#: Test metrics a suite task may report, and whether higher is better.
METRICS: dict[str, bool] = {"accuracy": True, "loss": False}


@dataclasses.dataclass(frozen=True, eq=False)
class SuiteTask:
    """One held-out task: an inner problem, its horizon and its train/test measurements.

    Args:
      name: unique within its suite, e.g. ``"wine_mlp"``.
      kind: a few words on what kind of problem it is, e.g. ``"tabular MLP"``.
      horizon: ``N``, the inner steps each optimizer is given.
      task: the problem optimizers train on (minibatches of the training split).
      metric: the test metric's name, a key of :data:`METRICS`.
      train_loss_fn: ``(params) -> scalar``, the loss on a fixed part of the training split.
      test_metric_fn: ``(params) -> scalar``, the metric on the test split.
      description: one line for reports (data, architecture, split sizes).
    """

    name: str
    kind: str
    horizon: int
    task: Task
    metric: str
    train_loss_fn: Callable[[Params], jax.Array]
    test_metric_fn: Callable[[Params], jax.Array]
    description: str = ""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"suite task {self.name!r}: unknown metric {self.metric!r}; "
                             f"known: {sorted(METRICS)}")
        if self.horizon < 1:
            raise ValueError(f"suite task {self.name!r}: horizon must be positive")

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger test metric is better (accuracy) or worse (loss)."""
        return METRICS[self.metric]

    def train_loss(self, params: Params) -> jax.Array:
        """The loss of ``params`` on the fixed training-split evaluation set."""
        return self.train_loss_fn(params)

    def test_metric(self, params: Params) -> jax.Array:
        """The test metric of ``params`` on the test split."""
        return self.test_metric_fn(params)
