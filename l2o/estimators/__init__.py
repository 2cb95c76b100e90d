"""Meta-gradient estimators on a shared truncated-step abstraction."""

from l2o.estimators.base import GradientEstimator
from l2o.estimators.tbptt import TruncatedBackprop
from l2o.estimators.truncated_step import InnerState, StepOutput, TruncatedStep

__all__ = ["GradientEstimator", "InnerState", "StepOutput", "TruncatedBackprop", "TruncatedStep"]
