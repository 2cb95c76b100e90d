"""Meta-gradient estimators on a shared truncated-step abstraction."""

from l2o.estimators.base import GradientEstimator
from l2o.estimators.es import ESWorkerState, TruncatedES
from l2o.estimators.full_es import FullES, FullESWorkerState
from l2o.estimators.imitation import Imitation, ImitationState, imitation_loss
from l2o.estimators.pes import PES, PESWorkerState
from l2o.estimators.schedules import (
    ConstantHorizon,
    GrowingLogUniformHorizon,
    HorizonSchedule,
    LogUniformHorizon,
    make_horizon_schedule,
)
from l2o.estimators.tbptt import TruncatedBackprop
from l2o.estimators.truncated_step import InnerState, StepOutput, TruncatedStep

__all__ = [
    "PES",
    "ConstantHorizon",
    "ESWorkerState",
    "FullES",
    "FullESWorkerState",
    "GradientEstimator",
    "GrowingLogUniformHorizon",
    "HorizonSchedule",
    "Imitation",
    "ImitationState",
    "InnerState",
    "LogUniformHorizon",
    "PESWorkerState",
    "StepOutput",
    "TruncatedBackprop",
    "TruncatedES",
    "TruncatedStep",
    "imitation_loss",
    "make_horizon_schedule",
]
