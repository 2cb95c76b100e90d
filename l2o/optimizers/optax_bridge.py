"""A trained learned optimizer as an ``optax.GradientTransformation``.

So that a θ trained with l2o drops into any optax training loop::

    tx = as_gradient_transformation(lopt, theta)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

The learned optimizer's own state (which holds a copy of the parameters) lives inside the optax
state. The ``params`` passed to ``update`` are authoritative: they replace the copy before the step
(so a loop that changes the parameters between steps, e.g. with weight decay or an EMA, stays
consistent), and ``updates = new_params - params``. The loss may be passed as the optax extra
argument ``value`` (or ``loss``) for optimizers that use it.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import struct

from l2o.optimizers.base import LearnedOptimizer
from l2o.types import MetaParams, Params


@struct.dataclass
class BridgeState:
    """The optax state of the bridge: the learned optimizer's state and an RNG key."""

    inner: Any
    key: jax.Array


def as_gradient_transformation(learned_opt: LearnedOptimizer, theta: MetaParams,
                               num_steps: int | None = None,
                               seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """``learned_opt.opt_fn(theta)`` as an optax transformation.

    ``num_steps`` is the training horizon told to the optimizer (when it uses one); ``seed`` seeds
    the per-step keys passed to stochastic optimizers. ``update`` requires ``params`` only if the
    state's copy may be stale; without them it steps from the copy.
    """
    opt = learned_opt.opt_fn(theta)

    def init_fn(params: Params) -> BridgeState:
        key = jax.random.PRNGKey(seed)
        k_init, key = jax.random.split(key)
        return BridgeState(inner=opt.init(params, num_steps=num_steps, key=k_init), key=key)

    def update_fn(updates: Params, state: BridgeState, params: Params | None = None,
                  **extra_args: Any) -> tuple[Params, BridgeState]:
        inner = state.inner
        if params is None:
            params = opt.params(inner)
        else:
            inner = inner.replace(params=params)
        loss = extra_args.get("value", extra_args.get("loss"))
        key, k_step = jax.random.split(state.key)
        inner = opt.update(inner, updates, loss=loss, key=k_step)
        new_params = opt.params(inner)
        deltas = jax.tree_util.tree_map(lambda n, p: n - p, new_params, params)
        return deltas, BridgeState(inner=inner, key=key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
