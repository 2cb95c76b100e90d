"""Assertions the test files share: pytrees compared leaf by leaf."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def assert_tree_equal(a: Any, b: Any) -> None:
    """``a`` and ``b`` have as many leaves, each exactly equal to its counterpart."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_tree_allclose(a: Any, b: Any, **tolerances: float) -> None:
    """``a`` and ``b`` have as many leaves, each close to its counterpart
    (``np.testing.assert_allclose`` with ``tolerances``: ``rtol``, ``atol``)."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerances)


def squared_distance_to(target: Any):  # noqa: ANN201 - a loss function
    """The loss ``Σ (p - target)²`` over the leaves of a pytree shaped like ``target``."""
    return lambda p: sum(jnp.sum((a - b) ** 2) for a, b in
                         zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target),
                             strict=True))


def minimize(tx: optax.GradientTransformation, loss: Any, params: Any, steps: int) -> Any:
    """``params`` after ``steps`` jitted steps of ``tx`` on ``loss``."""

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params
