"""Type aliases shared across the library."""

from typing import Any

import jax

PRNGKey = jax.Array
Params = Any  # a pytree of arrays
Batch = Any  # a pytree of arrays
MetaParams = Any  # θ: a pytree of arrays
