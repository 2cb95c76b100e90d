"""Meta-gradient estimators by name: each estimator module registers its config class.

A config class derives from :class:`EstimatorSettings`, declares ``name: Literal["…"] = "…"`` and
the fields only it uses, and builds its estimator in :meth:`EstimatorSettings.build`; the module
applies :func:`register_estimator` to it. ``l2o.io.config`` validates the ``estimator`` section
against the union of what is registered, so a field of another estimator is refused by its dotted
name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import PositiveInt

from l2o.registry import Registry, StrictConfig

if TYPE_CHECKING:
    from l2o.estimators.base import GradientEstimator
    from l2o.tasks.base import TaskFamily


class EstimatorSettings(StrictConfig):
    """The fields every estimator has: its name and its truncation."""

    name: str
    num_tasks: PositiveInt = 4  # inner problems per truncation (ES/PES: antithetic pairs)
    unroll_length: PositiveInt = 20  # inner steps per truncation
    num_steps: PositiveInt = 100  # the inner horizon: problems restart after this many steps

    def build(self, family: TaskFamily, learned_opt: Any) -> GradientEstimator:
        """The estimator for ``family`` and ``learned_opt`` (an optimizer, or a learned rule)."""
        raise NotImplementedError


S = TypeVar("S", bound=type[EstimatorSettings])

#: Config classes of every registered estimator, by name.
ESTIMATORS: Registry[type[EstimatorSettings]] = Registry(
    "estimator", ("l2o.estimators", "l2o.unsupervised"))


def register_estimator(config_cls: S) -> S:
    """Class decorator: register an :class:`EstimatorSettings` subclass under its ``name``."""
    ESTIMATORS.register(config_cls, config_cls)
    return config_cls
