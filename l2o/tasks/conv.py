"""A small convolutional classifier on image data, cheap enough for CPU meta-training.

Architecture: for each entry of ``channels``, a ``kernel_size``×``kernel_size`` convolution with
stride ``stride`` and ``SAME`` padding followed by ``activation``; then a linear readout of the
flattened features. With the defaults (8 and 16 channels, 3×3, stride 2) an 8×8 digit becomes
2×2×16 = 64 features and a 28×28 MNIST image 7×7×16 = 784 features.

Parameters are a plain dict: ``{"conv_0": {"w": [k, k, c_in, c_out], "b": [c_out]}, ...,
"readout": {"w": [features, classes], "b": [classes]}}`` (``HWIO`` kernels, ``NHWC`` images).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from l2o.tasks.classifier import ImageClassifier, get_activation, lecun_normal
from l2o.tasks.datasets import Dataset
from l2o.types import Params, PRNGKey


@struct.dataclass
class ConvTask(ImageClassifier):
    """Classify ``data`` with strided convolutions and a linear readout."""

    data: Dataset
    channels: tuple[int, ...] = struct.field(pytree_node=False, default=(8, 16))
    kernel_size: int = struct.field(pytree_node=False, default=3)
    stride: int = struct.field(pytree_node=False, default=2)
    activation: str = struct.field(pytree_node=False, default="relu")
    batch_size: int = struct.field(pytree_node=False, default=128)
    num_classes: int = struct.field(pytree_node=False, default=10)

    def __post_init__(self):
        get_activation(self.activation)  # fail early on a bad name
        if not isinstance(self.channels, tuple):  # static fields must be hashable
            object.__setattr__(self, "channels", tuple(self.channels))

    def feature_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the last convolution's output."""
        h, w, c = self.data.image_shape
        for out in self.channels:
            h, w, c = -(-h // self.stride), -(-w // self.stride), out  # SAME: ceil(h / s)
        return h, w, c

    def init(self, key: PRNGKey) -> Params:
        """LeCun-normal kernels and readout weights, zero biases."""
        keys = jax.random.split(key, len(self.channels) + 1)
        params = {}
        c_in = self.data.image_shape[-1]
        k = self.kernel_size
        for i, c_out in enumerate(self.channels):
            params[f"conv_{i}"] = {"w": lecun_normal(keys[i], (k, k, c_in, c_out), k * k * c_in),
                                   "b": jnp.zeros((c_out,), jnp.float32)}
            c_in = c_out
        h, w, c = self.feature_shape()
        features = h * w * c
        params["readout"] = {
            "w": lecun_normal(keys[-1], (features, self.num_classes), features),
            "b": jnp.zeros((self.num_classes,), jnp.float32),
        }
        return params

    def logits(self, params: Params, x: jax.Array) -> jax.Array:
        """Class logits ``[B, num_classes]`` for ``NHWC`` images ``x``."""
        act = get_activation(self.activation)
        h = x
        for i in range(len(self.channels)):
            layer = params[f"conv_{i}"]
            h = jax.lax.conv_general_dilated(
                h, layer["w"], window_strides=(self.stride, self.stride), padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = act(h + layer["b"])
        h = h.reshape(h.shape[0], -1)
        return h @ params["readout"]["w"] + params["readout"]["b"]

    @property
    def name(self) -> str:
        chans = "-".join(str(c) for c in self.channels)
        return f"{self.data.name}_conv_{chans}_{self.activation}"
