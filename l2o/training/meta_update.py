"""The meta-update: one optax step of θ along an aggregated meta-gradient, or none at all.

Both sides of training apply θ's updates through :func:`meta_update`: the single-machine trainer
(:func:`l2o.training.trainer.meta_step` fuses it with the truncation in one compiled program) and
the learner (:class:`learner.core.Learner` jits it once per meta-optimizer and feeds it the mean of
a batch of workers' gradients).

The non-finite policy, the same on both sides: the update is applied only when the gradient, the
new θ and the new meta-optimizer state are all finite. Otherwise θ, the optimizer state and the
version come back unchanged and :attr:`MetaUpdateInfo.applied` is false; the caller counts the
skipped update (``skipped_nonfinite``). A non-finite value never reaches θ or the optimizer state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from l2o.types import MetaParams


@struct.dataclass
class MetaState:
    """The learner's side of a run: θ, the meta-optimizer state and the update counter."""

    theta: MetaParams
    opt_state: optax.OptState
    version: jax.Array  # int32: meta-updates applied


@struct.dataclass
class MetaUpdateInfo:
    """What :func:`meta_update` did: whether it applied the step, and why not if it did not."""

    applied: jax.Array  # bool: θ, optimizer state and version moved on
    grad_finite: jax.Array  # bool: every gradient value was finite
    result_finite: jax.Array  # bool: the stepped θ and optimizer state were finite


def init_meta_state(theta: MetaParams, meta_tx: optax.GradientTransformation) -> MetaState:
    """A fresh :class:`MetaState` at version 0."""
    return MetaState(theta=theta, opt_state=meta_tx.init(theta), version=jnp.zeros((), jnp.int32))


def all_finite(tree: Any) -> jax.Array:
    """True when every leaf of ``tree`` is finite."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.True_


def meta_update(meta_tx: optax.GradientTransformation, state: MetaState,
                grad: MetaParams) -> tuple[MetaState, MetaUpdateInfo]:
    """``state`` after one ``meta_tx`` step along ``grad``, unless anything is non-finite.

    Pure and jit-able (``meta_tx`` static). When ``grad``, the new θ or the new optimizer state
    holds a NaN or an infinity, the returned state is ``state`` itself (version included).
    """
    updates, opt_state = meta_tx.update(grad, state.opt_state, state.theta)
    stepped = MetaState(theta=optax.apply_updates(state.theta, updates), opt_state=opt_state,
                        version=state.version + 1)
    grad_finite = all_finite(grad)
    result_finite = all_finite((stepped.theta, stepped.opt_state))
    applied = grad_finite & result_finite
    new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(applied, a, b), stepped, state)
    return new_state, MetaUpdateInfo(applied=applied, grad_finite=grad_finite,
                                     result_finite=result_finite)
