"""Multi-layer perceptron classifiers on image data (L2L's MNIST problem and its relatives).

Parameters are a plain dict with stable names: ``{"layer_0": {"w": [in, h0], "b": [h0]}, ...,
"layer_<n>": {"w": [h_last, classes], "b": [classes]}}`` where the last layer is the linear
readout. Weights start from a LeCun truncated normal (variance ``1 / fan_in``), biases at zero.
The loss is the softmax cross-entropy averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from l2o.tasks.base import Task
from l2o.tasks.datasets import Dataset
from l2o.types import Batch, Params, PRNGKey

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of ``-log softmax(logits)[label]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def lecun_normal(key: PRNGKey, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """Truncated normal (at ±2σ) rescaled to variance ``1 / fan_in``."""
    # A standard normal truncated to [-2, 2] has std ≈ 0.8796; divide it out.
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978
    return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


@struct.dataclass
class MLPTask(Task):
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
    def input_size(self) -> int:
        """Number of input features (pixels × channels)."""
        size = 1
        for s in self.data.image_shape:
            size *= int(s)
        return size

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

    def sample_batch(self, key: PRNGKey) -> Batch:
        """``batch_size`` training examples ``{"x", "y"}``, drawn with replacement."""
        return self.data.sample_batch(key, self.batch_size, "train")

    def sample_eval_batch(self, key: PRNGKey) -> Batch:
        """``batch_size`` examples from the test split."""
        return self.data.sample_batch(key, self.batch_size, "test")

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

    def loss(self, params: Params, batch: Batch) -> jax.Array:
        """Softmax cross-entropy, mean over the batch."""
        return softmax_cross_entropy(self.logits(params, batch["x"]), batch["y"])

    def accuracy(self, params: Params, batch: Batch) -> jax.Array:
        """Fraction of the batch classified correctly."""
        pred = jnp.argmax(self.logits(params, batch["x"]), axis=-1)
        return jnp.mean((pred == batch["y"]).astype(jnp.float32))

    @property
    def name(self) -> str:
        sizes = "-".join(str(s) for s in self.layer_sizes)
        return f"{self.data.name}_mlp_{sizes}_{self.activation}"
