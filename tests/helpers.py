"""Assertions the test files share: pytrees compared leaf by leaf."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def assert_tree_equal(a: Any, b: Any) -> None:
    """``a`` and ``b`` have as many leaves, each exactly equal to its counterpart."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_tree_allclose(a: Any, b: Any, **tolerances: float) -> None:
    """``a`` and ``b`` have as many leaves, each close to its counterpart
    (``np.testing.assert_allclose`` with ``tolerances``: ``rtol``, ``atol``)."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerances)
