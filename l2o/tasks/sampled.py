"""A family of MLP classifiers whose width, depth, activation, normalization and batch size come
from a key.

``SampledMLPFamily.sample(key)`` draws one entry from each of five small static menus (widths,
depths, activations, norms, batch sizes) and returns their values as int32 scalars. Shapes must
be static under ``jit``, and ``vmap`` needs every inner problem to have the *same* shapes, so every
task of the family is built inside the *maximal* architecture (widest width, deepest depth,
largest batch) and the sampled one is carved out of it by masking:

* **width**: every hidden layer has ``max(widths)`` units; units beyond the sampled width are
  multiplied by 0 after the activation, and their incoming weights start at 0. Their weights get
  exactly zero gradient, so they never influence the loss.
* **depth**: there are ``max(depths)`` hidden layers, all ``max(widths)`` wide; hidden layer ``l``
  is the identity when ``l ≥ depth`` (its weights are still there, with zero gradient).
* **activation**: an index into ``activations``, applied with ``lax.switch`` (under ``vmap`` every
  branch is computed and one is selected).
* **norm**: an index into ``norms``: ``"none"`` or ``"layernorm"`` (each hidden pre-activation
  normalized over the *active* units, then a learned per-unit scale and offset). When the menu
  offers ``"layernorm"`` every hidden layer carries ``scale``/``offset`` tensors; a problem that
  drew ``"none"`` leaves them at zero gradient.
* **batch size**: ``max(batch_sizes)`` examples are drawn and the loss averages over the first
  ``batch_size`` of them.

Trade-off. This samples under ``jit``/``vmap``, so :class:`~l2o.estimators.truncated_step.
TruncatedStep` can reset any vmapped problem to a new configuration without recompiling, and one
compiled program serves the whole family. The price: every problem costs as much as the largest
configuration; the optimizer keeps state for masked (always-zero-gradient) parameters, and
per-tensor statistics of a learned optimizer see those zeros (a narrow layer looks like a wide
one whose gradient is concentrated on a few units). The alternative, drawing the static
configuration on the host when a worker resets, gives exact shapes and cost but recompiles for
every new configuration and cannot vmap different configurations together; it is not implemented
here. The dataset is fixed per family (different datasets have different input shapes): build one
family per dataset (digits by default, MNIST when its files are present).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from l2o.tasks.base import TaskFamily
from l2o.tasks.classifier import ImageClassifier, get_activation, lecun_normal
from l2o.tasks.datasets import Dataset
from l2o.types import Batch, Params, PRNGKey

#: The normalizations a sampled MLP can draw (its ``norms`` menu).
NORMS = ("none", "layernorm")


@struct.dataclass
class SampledMLPConfig:
    """One configuration: sampled width, depth, activation index, norm index and batch size
    (int32)."""

    width: jax.Array
    depth: jax.Array
    activation: jax.Array
    batch_size: jax.Array
    norm: jax.Array


@struct.dataclass
class MaskedMLPTask(ImageClassifier):
    """An MLP classifier of sampled width/depth/activation/batch size inside a maximal one.

    ``params``: ``{"layer_0": {"w": [in, W], "b": [W]}, …, "layer_<D-1>": {"w": [W, W], …},
    "readout": {"w": [W, classes], "b": [classes]}}`` with ``W = max_width``, ``D = max_depth``.
    """

    data: Dataset
    cfg: SampledMLPConfig
    max_width: int = struct.field(pytree_node=False, default=64)
    max_depth: int = struct.field(pytree_node=False, default=2)
    max_batch: int = struct.field(pytree_node=False, default=128)
    activations: tuple[str, ...] = struct.field(pytree_node=False, default=("relu",))
    norms: tuple[str, ...] = struct.field(pytree_node=False, default=("none",))
    num_classes: int = struct.field(pytree_node=False, default=10)

    def unit_mask(self) -> jax.Array:
        """``[max_width]`` float mask of the active hidden units."""
        return (jnp.arange(self.max_width) < self.cfg.width).astype(jnp.float32)

    def init(self, key: PRNGKey) -> Params:
        """LeCun-normal weights into active units (fan-in = active inputs), zero elsewhere."""
        mask = self.unit_mask()
        keys = jax.random.split(key, self.max_depth + 1)
        width = self.cfg.width.astype(jnp.float32)
        params = {}
        fan_in, in_mask = self.input_size, jnp.ones((self.input_size,), jnp.float32)
        for i in range(self.max_depth):
            w = lecun_normal(keys[i], (in_mask.shape[0], self.max_width), 1)
            scale = jax.lax.rsqrt(jnp.asarray(fan_in, jnp.float32))
            params[f"layer_{i}"] = {"w": w * scale * in_mask[:, None] * mask[None, :],
                                    "b": jnp.zeros((self.max_width,), jnp.float32)}
            if "layernorm" in self.norms:
                params[f"layer_{i}"].update(scale=jnp.ones((self.max_width,), jnp.float32),
                                            offset=jnp.zeros((self.max_width,), jnp.float32))
            fan_in, in_mask = width, mask
        w = lecun_normal(keys[-1], (self.max_width, self.num_classes), 1)
        params["readout"] = {"w": w * jax.lax.rsqrt(width) * mask[:, None],
                             "b": jnp.zeros((self.num_classes,), jnp.float32)}
        return params

    def sample_batch(self, key: PRNGKey) -> Batch:
        """``max_batch`` training examples (the loss uses the first ``batch_size``)."""
        return self.data.sample_batch(key, self.max_batch, "train")

    def sample_eval_batch(self, key: PRNGKey) -> Batch:
        """``max_batch`` test examples."""
        return self.data.sample_batch(key, self.max_batch, "test")

    def _activation(self, h: jax.Array) -> jax.Array:
        fns = [get_activation(a) for a in self.activations]
        if len(fns) == 1:
            return fns[0](h)
        return jax.lax.switch(self.cfg.activation, fns, h)

    def _normalized(self, z: jax.Array, layer: Params, mask: jax.Array) -> jax.Array:
        """``z`` after the drawn normalization: layer norm over the active units, or as is."""
        if "layernorm" not in self.norms:
            return z
        n = jnp.sum(mask)
        mean = jnp.sum(z * mask, axis=-1, keepdims=True) / n
        var = jnp.sum(jnp.square((z - mean) * mask), axis=-1, keepdims=True) / n
        normed = (z - mean) * jax.lax.rsqrt(var + 1e-5) * layer["scale"] + layer["offset"]
        drew_layernorm = jnp.asarray([k == "layernorm" for k in self.norms])[self.cfg.norm]
        return jnp.where(drew_layernorm, normed, z)

    def logits(self, params: Params, x: jax.Array) -> jax.Array:
        """Logits ``[B, classes]`` of the masked network."""
        mask = self.unit_mask()
        h = x.reshape(x.shape[0], -1)
        for i in range(self.max_depth):
            layer = params[f"layer_{i}"]
            z = self._normalized(h @ layer["w"] + layer["b"], layer, mask)
            z = self._activation(z) * mask
            # layer 0 always runs (input → hidden width); deeper ones may be skipped
            h = z if i == 0 else jnp.where(i < self.cfg.depth, z, h)
        return h @ params["readout"]["w"] + params["readout"]["b"]

    def example_mask(self) -> jax.Array:
        """``[max_batch]`` float mask of the examples the loss uses."""
        return (jnp.arange(self.max_batch) < self.cfg.batch_size).astype(jnp.float32)

    def loss(self, params: Params, batch: Batch) -> jax.Array:
        """Softmax cross-entropy averaged over the first ``batch_size`` examples."""
        logp = jax.nn.log_softmax(self.logits(params, batch["x"]), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]
        m = self.example_mask()
        return jnp.sum(nll * m) / jnp.sum(m)

    @property
    def name(self) -> str:
        return f"{self.data.name}_sampled_mlp"


@struct.dataclass
class SampledMLPFamily(TaskFamily):
    """MLP classifiers on ``data`` with width, depth, activation, norm and batch size drawn from
    menus.

    Every menu entry is equally likely, independently. See the module docstring for how the
    sampled architecture lives inside the maximal one.
    """

    data: Dataset
    widths: tuple[int, ...] = struct.field(pytree_node=False, default=(16, 32, 64))
    depths: tuple[int, ...] = struct.field(pytree_node=False, default=(1, 2))
    activations: tuple[str, ...] = struct.field(pytree_node=False,
                                                default=("relu", "tanh", "sigmoid"))
    batch_sizes: tuple[int, ...] = struct.field(pytree_node=False, default=(32, 64, 128))
    norms: tuple[str, ...] = struct.field(pytree_node=False, default=("none",))

    def __post_init__(self):
        for name in ("widths", "depths", "batch_sizes"):
            values = tuple(int(v) for v in getattr(self, name))
            if not values or min(values) <= 0:
                raise ValueError(f"{name} must be a non-empty sequence of positive ints")
            object.__setattr__(self, name, values)
        acts = tuple(str(a) for a in self.activations)
        if not acts:
            raise ValueError("activations must name at least one activation")
        for a in acts:
            get_activation(a)
        object.__setattr__(self, "activations", acts)
        norms = tuple(str(n) for n in self.norms)
        unknown = sorted(set(norms) - set(NORMS))
        if not norms or unknown:
            raise ValueError(f"norms must be a non-empty sequence of {', '.join(NORMS)}; got "
                             f"{list(norms)}")
        object.__setattr__(self, "norms", norms)

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return self.data.num_classes

    def sample(self, key: PRNGKey) -> SampledMLPConfig:
        """Independent uniform draws from each menu."""
        kw, kd, ka, kb, kn = jax.random.split(key, 5)

        def pick(k: PRNGKey, menu: tuple[int, ...]) -> jax.Array:
            return jnp.asarray(menu, jnp.int32)[jax.random.randint(k, (), 0, len(menu))]

        return SampledMLPConfig(
            width=pick(kw, self.widths), depth=pick(kd, self.depths),
            activation=jax.random.randint(ka, (), 0, len(self.activations)).astype(jnp.int32),
            batch_size=pick(kb, self.batch_sizes),
            norm=jax.random.randint(kn, (), 0, len(self.norms)).astype(jnp.int32))

    def task(self, cfg: SampledMLPConfig) -> MaskedMLPTask:
        """The masked MLP of configuration ``cfg``."""
        return MaskedMLPTask(data=self.data, cfg=cfg, max_width=max(self.widths),
                             max_depth=max(self.depths), max_batch=max(self.batch_sizes),
                             activations=self.activations, norms=self.norms,
                             num_classes=self.data.num_classes)

    @property
    def name(self) -> str:
        return f"{self.data.name}_sampled_mlp"
