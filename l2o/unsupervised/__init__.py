"""The learned unsupervised update rule of Metz et al. (2018) and the base model it trains.

:mod:`l2o.unsupervised.base_model` holds the base model (an MLP of batch-normalized linear layers
with backward weights), :mod:`l2o.unsupervised.update_rule` the rule itself.
"""

# The optimizer registry imports the rule from here; importing l2o.optimizers first makes either
# import order work (the rule's module needs l2o.optimizers.base, the registry needs the rule).
import l2o.optimizers  # noqa: F401
from l2o.unsupervised.base_model import Activations, BaseModel, BaseParams
from l2o.unsupervised.update_rule import UPDATE_TERMS, UnsupervisedUpdateRule, rolling_step

__all__ = [
    "Activations",
    "BaseModel",
    "BaseParams",
    "UPDATE_TERMS",
    "UnsupervisedUpdateRule",
    "rolling_step",
]
