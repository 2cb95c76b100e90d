"""Multi-layer perceptron classifiers on image data (L2L's MNIST problem and its relatives).

Parameters are a plain dict with stable names: ``{"layer_0": {"w": [in, h0], "b": [h0]}, ...,
"layer_<n>": {"w": [h_last, classes], "b": [classes]}}`` where the last layer is the linear
readout. Weights start from a LeCun truncated normal (variance ``1 / fan_in``), biases at zero.
The loss is the softmax cross-entropy averaged over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from l2o.tasks.classifier import ImageClassifier, get_activation, lecun_normal
from l2o.tasks.datasets import Dataset
from l2o.types import Params, PRNGKey


@struct.dataclass
class MLPTask(ImageClassifier):
    """Classify ``data`` with a fully connected net: flattened input → ``hidden_sizes`` (each
    followed by ``activation``) → linear readout to ``num_classes`` logits."""

    data: Dataset
    hidden_sizes: tuple[int, ...] = struct.field(pytree_node=False, default=(20,))
    activation: str = struct.field(pytree_node=False, default="sigmoid")
    batch_size: int = struct.field(pytree_node=False, default=128)
    num_classes: int = struct.field(pytree_node=False, default=10)

    def __post_init__(self):
        get_activation(self.activation)  # fail early on a bad name
        if not isinstance(self.hidden_sizes, tuple):  # static fields must be hashable
            object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """``(input, *hidden_sizes, num_classes)``."""
        return (self.input_size, *self.hidden_sizes, self.num_classes)

    def init(self, key: PRNGKey) -> Params:
        """LeCun-normal weights and zero biases for every layer."""
        sizes = self.layer_sizes
        keys = jax.random.split(key, len(sizes) - 1)
        return {
            f"layer_{i}": {"w": lecun_normal(k, (n_in, n_out), n_in),
                           "b": jnp.zeros((n_out,), jnp.float32)}
            for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
        }

    def logits(self, params: Params, x: jax.Array) -> jax.Array:
        """Class logits ``[B, num_classes]`` for images ``x`` ``[B, ...]``."""
        act = get_activation(self.activation)
        h = x.reshape(x.shape[0], -1)
        n = len(self.hidden_sizes)
        for i in range(n + 1):
            layer = params[f"layer_{i}"]
            h = h @ layer["w"] + layer["b"]
            if i < n:
                h = act(h)
        return h

    @property
    def name(self) -> str:
        sizes = "-".join(str(s) for s in self.layer_sizes)
        return f"{self.data.name}_mlp_{sizes}_{self.activation}"
