"""What every image-classification task shares: batches from a ``Dataset``, loss and accuracy.

Subclasses (``MLPTask``, ``ConvTask``, the sampled MLPs) hold a ``data`` field and static
``batch_size`` and ``num_classes`` fields, and define :meth:`ImageClassifier.logits`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from l2o.tasks.base import Task
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
class ImageClassifier(Task):
    """A classifier of ``self.data``'s images; subclasses define :meth:`logits`."""

    @property
    def input_size(self) -> int:
        """Number of input features (pixels × channels)."""
        size = 1
        for s in self.data.image_shape:
            size *= int(s)
        return size

    def sample_batch(self, key: PRNGKey) -> Batch:
        """``batch_size`` training examples ``{"x", "y"}``, drawn with replacement."""
        return self.data.sample_batch(key, self.batch_size, "train")

    def sample_eval_batch(self, key: PRNGKey) -> Batch:
        """``batch_size`` examples from the test split."""
        return self.data.sample_batch(key, self.batch_size, "test")

    def logits(self, params: Params, x: jax.Array) -> jax.Array:
        """Class logits ``[B, num_classes]`` for images ``x``."""
        raise NotImplementedError

    def loss(self, params: Params, batch: Batch) -> jax.Array:
        """Softmax cross-entropy, mean over the batch."""
        return softmax_cross_entropy(self.logits(params, batch["x"]), batch["y"])

    def accuracy(self, params: Params, batch: Batch) -> jax.Array:
        """Fraction of the batch classified correctly."""
        pred = jnp.argmax(self.logits(params, batch["x"]), axis=-1)
        return jnp.mean((pred == batch["y"]).astype(jnp.float32))
