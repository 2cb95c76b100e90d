"""A learned optimizer for some parameters, a hand-designed one for the rest.

L2L's ``simple-multi`` problem trains one variable with the learned optimizer and the other with
Adam (its ``net_assignments`` give a variable to a fixed Adam "net"). :class:`MixedOptimizer`
expresses that routing for any pair of optimizers:

* a parameter leaf whose ``"/"``-joined tree path (``"layer_0/w"``, ``"x_0"``) matches the regular
  expression ``learned_paths`` (``re.search``) is stepped by ``learned``;
* every other leaf is stepped by ``fallback`` (by default Adam, θ-free).

θ is the learned optimizer's θ, unchanged: ``init`` returns ``learned.init(key)`` and the fallback
always receives ``{}``. Each side sees a flat dict ``{path: leaf}`` of its own leaves, so the
learned optimizer's own selectors (e.g. an LSTM's ``net_assignments``) still work on the same path
strings. When no leaf matches one side, that side holds an empty dict and does nothing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, zero_iteration
from l2o.optimizers.baselines import adam
from l2o.optimizers.lstm import path_to_str
from l2o.optimizers.registry import make_learned_optimizer, register_optimizer
from l2o.types import MetaParams, Params, PRNGKey


@struct.dataclass
class MixedState:
    """The full parameters, the step counter and the states of both sides."""

    params: Params
    iteration: jax.Array
    learned: Any
    fallback: Any


class MixedInnerOptimizer(Optimizer):
    """The optimizer built by :meth:`MixedOptimizer.opt_fn`."""

    def __init__(self, config: MixedOptimizer, theta: MetaParams, is_training: bool):
        self.config = config
        self.learned = config.learned.opt_fn(theta, is_training=is_training)
        self.fallback = config.fallback.opt_fn({}, is_training=is_training)

    def split(self, tree: Params) -> tuple[dict[str, Any], dict[str, Any]]:
        """``tree``'s leaves as two dicts ``{path: leaf}``: the learned side's, then the rest."""
        learned, rest = {}, {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            spath = path_to_str(path)
            side = learned if re.search(self.config.learned_paths, spath) else rest
            side[spath] = leaf
        return learned, rest

    @staticmethod
    def merge(like: Params, learned: dict[str, Any], rest: dict[str, Any]) -> Params:
        """The inverse of :meth:`split`, with the tree structure of ``like``."""
        with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
        leaves = []
        for path, _ in with_path:
            spath = path_to_str(path)
            leaves.append(learned[spath] if spath in learned else rest[spath])
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> MixedState:
        """Both sides' initial states on their own leaves."""
        p_l, p_r = self.split(params)
        return MixedState(params=params, iteration=zero_iteration(),
                          learned=self.learned.init(p_l, num_steps=num_steps, key=key),
                          fallback=self.fallback.init(p_r, num_steps=num_steps, key=key))

    def update(self, state: MixedState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> MixedState:
        """One step of each side on its own gradients; the parameters are merged back."""
        g_l, g_r = self.split(grads)
        k_l = k_r = None
        if key is not None:
            k_l, k_r = jax.random.split(key)
        learned = self.learned.update(state.learned, g_l, loss=loss, key=k_l)
        fallback = self.fallback.update(state.fallback, g_r, loss=loss, key=k_r)
        params = self.merge(state.params, self.learned.params(learned),
                            self.fallback.params(fallback))
        return MixedState(params=params, iteration=state.iteration + 1, learned=learned,
                          fallback=fallback)

    @property
    def name(self) -> str:
        return self.config.name


@dataclasses.dataclass(frozen=True)
class MixedOptimizer(LearnedOptimizer):
    """``learned`` on the leaves whose path matches ``learned_paths``, ``fallback`` on the rest.

    Args:
      learned: the learned optimizer; θ is its θ.
      fallback: a hand-designed optimizer with empty θ (default: Adam, lr 1e-3).
      learned_paths: regex searched in each leaf's ``"/"``-joined tree path.
    """

    learned: LearnedOptimizer
    fallback: LearnedOptimizer = dataclasses.field(default_factory=adam)
    learned_paths: str = ""

    def init(self, key: PRNGKey) -> MetaParams:
        """The learned optimizer's initial θ."""
        return self.learned.init(key)

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> MixedInnerOptimizer:
        """The mixed optimizer with the learned side's weights ``theta``."""
        return MixedInnerOptimizer(self, theta, is_training)

    @property
    def name(self) -> str:
        return f"mixed({self.learned.name}|{self.fallback.name})"


@register_optimizer("mixed")
def mixed(learned: str = "lstm", learned_kwargs: dict[str, Any] | None = None,
          fallback: str = "adam", fallback_kwargs: dict[str, Any] | None = None,
          learned_paths: str = "") -> MixedOptimizer:
    """A :class:`MixedOptimizer` from registry names (what ``optimizer.name: mixed`` builds).

    ``learned``/``fallback`` name registered optimizers, built with ``learned_kwargs`` and
    ``fallback_kwargs``; ``learned_paths`` is the regex routing leaves to the learned one.
    """
    return MixedOptimizer(learned=make_learned_optimizer(learned, **(learned_kwargs or {})),
                          fallback=make_learned_optimizer(fallback, **(fallback_kwargs or {})),
                          learned_paths=str(learned_paths))
