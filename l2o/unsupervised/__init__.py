"""The learned unsupervised update rule of Metz et al. (2018) and the base model it trains.

:mod:`l2o.unsupervised.base_model` holds the base model (an MLP of batch-normalized linear layers
with backward weights), :mod:`l2o.unsupervised.rule` the interface of a learned update rule,
:mod:`l2o.unsupervised.update_rule` the rule itself.
"""

from l2o.unsupervised.base_model import Activations, BaseModel, BaseParams
from l2o.unsupervised.rule import UPDATE_RULES, LearnedUpdateRule
from l2o.unsupervised.update_rule import UPDATE_TERMS, UnsupervisedUpdateRule, rolling_step

__all__ = [
    "Activations",
    "BaseModel",
    "BaseParams",
    "LearnedUpdateRule",
    "UPDATE_RULES",
    "UPDATE_TERMS",
    "UnsupervisedUpdateRule",
    "rolling_step",
]
