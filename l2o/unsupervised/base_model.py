"""The base model that the learned unsupervised update rule trains (Metz et al. 2018; our code).

An MLP of *batch-normalized linear layers*: layer ``i`` maps ``post[i]`` ``[batch, n_i]`` to::

    pre[i]      = standardize_over_batch(post[i] @ w[i]) + b[i]      (no learned scale)
    post[i + 1] = relu(pre[i])

with ``hidden_sizes`` inner layers (four of 128 by default) and an output layer of
``output_size`` units (32) whose post-activations are the *features*. Batch statistics are always
those of the current batch (there are no running averages), so the features of an example depend
on the batch it comes in.

Besides the forward weights, each layer owns *backward weights* ``bw[i]`` of the same shape
``[n_i, n_{i+1}]``. They never enter the forward pass: the update rule sends its error signals
down through ``bw`` instead of through the transposed forward weights (as in feedback alignment),
so that the rule does not need weight transport.

With ``shuffle_input=True`` the input coordinates are permuted by a fixed random permutation drawn
at ``init`` and held in the parameters (``perm``), so that a rule cannot rely on the spatial layout
of its training images. All of the model's state is in :class:`BaseParams`; :class:`BaseModel`
is static configuration (hashable, no array leaves), so it can be an argument of jitted or
vmapped code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from l2o.types import PRNGKey

#: Standard deviation of the forward and backward weights at init (truncated at 2σ, as in TF).
WEIGHT_INIT_STD = 0.01
#: Standard deviation of the biases (the batch norms' offsets) at init (truncated at 2σ).
BIAS_INIT_STD = 0.1
#: Added to the batch variance in the base model's batch norms.
BN_EPS = 1e-6


@struct.dataclass
class BaseParams:
    """Local-side state of one base model (a pytree).

    ``w[i]``, ``bw[i]``: forward and backward weights of layer ``i``, ``[n_i, n_{i+1}]``;
    ``b[i]``: its bias (the batch norm's offset), ``[n_{i+1}]``; ``perm``: the fixed input
    permutation (int32 ``[input_dim]``; the identity when the model does not shuffle).
    """

    w: tuple[jax.Array, ...]
    b: tuple[jax.Array, ...]
    bw: tuple[jax.Array, ...]
    perm: jax.Array


@struct.dataclass
class Activations:
    """Activations of one batch: ``pre[i]`` ``[batch, n_{i+1}]`` are layer ``i``'s
    pre-activations; ``post[0]`` is the (flattened, permuted) input and ``post[i + 1] =
    relu(pre[i])``."""

    pre: tuple[jax.Array, ...]
    post: tuple[jax.Array, ...]


def batch_standardize(z: jax.Array, eps: float = BN_EPS) -> jax.Array:
    """``z`` ``[batch, units]`` standardized per unit over the batch (mean 0, variance 1)."""
    mean = jnp.mean(z, axis=0, keepdims=True)
    var = jnp.mean(jnp.square(z - mean), axis=0, keepdims=True)
    return (z - mean) * jax.lax.rsqrt(var + eps)


@struct.dataclass
class BaseModel:
    """Static configuration of the base model (see the module docstring)."""

    input_dim: int = struct.field(pytree_node=False)
    hidden_sizes: tuple[int, ...] = struct.field(pytree_node=False, default=(128, 128, 128, 128))
    output_size: int = struct.field(pytree_node=False, default=32)
    shuffle_input: bool = struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        if int(self.input_dim) < 1:
            raise ValueError(f"BaseModel.input_dim must be positive, got {self.input_dim}")
        if int(self.output_size) < 1:
            raise ValueError(f"BaseModel.output_size must be positive, got {self.output_size}")
        sizes = tuple(self.hidden_sizes)
        if any(int(s) < 1 for s in sizes):
            raise ValueError(f"BaseModel.hidden_sizes must be positive, got {sizes}")
        # a list would make the dataclass unhashable (it is static config for jit)
        object.__setattr__(self, "hidden_sizes", tuple(int(s) for s in sizes))

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """Widths of every layer of units, input first: ``(input_dim, *hidden, output)``."""
        return (int(self.input_dim), *self.hidden_sizes, int(self.output_size))

    @property
    def num_layers(self) -> int:
        """Number of weight layers (hidden layers + the output layer)."""
        return len(self.hidden_sizes) + 1

    def init(self, key: PRNGKey) -> BaseParams:
        """Fresh parameters: weights ~ N(0, 0.01²), biases ~ N(0, 0.1²) (truncated at 2σ)."""
        sizes = self.layer_sizes
        k_draw, k_perm = jax.random.split(key)
        shapes, stds = [], []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            shapes += [(n_in, n_out), (n_out,), (n_in, n_out)]
            stds += [WEIGHT_INIT_STD, BIAS_INIT_STD, WEIGHT_INIT_STD]
        # one draw for every leaf (fewer kernels to compile on the first, eager call)
        bounds = [sum(math.prod(s) for s in shapes[:i + 1]) for i in range(len(shapes))]
        draws = jax.random.truncated_normal(k_draw, -2.0, 2.0, (bounds[-1],), jnp.float32)
        leaves = [c.reshape(s) * std for c, s, std in
                  zip(jnp.split(draws, bounds[:-1]), shapes, stds)]
        w, b, bw = leaves[0::3], leaves[1::3], leaves[2::3]
        if self.shuffle_input:
            perm = jax.random.permutation(k_perm, self.input_dim).astype(jnp.int32)
        else:
            perm = jnp.arange(self.input_dim, dtype=jnp.int32)
        return BaseParams(w=tuple(w), b=tuple(b), bw=tuple(bw), perm=perm)

    def check_params(self, params: BaseParams) -> None:
        """Raise ``ValueError`` naming the first field of ``params`` that does not fit."""
        sizes = self.layer_sizes
        for field in ("w", "b", "bw"):
            got = len(getattr(params, field))
            if got != self.num_layers:
                raise ValueError(f"BaseParams.{field} has {got} layers; the model has "
                                 f"{self.num_layers} (layer sizes {sizes})")
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            for field, want in (("w", (n_in, n_out)), ("bw", (n_in, n_out)), ("b", (n_out,))):
                got = tuple(jnp.shape(getattr(params, field)[i]))
                if got != want:
                    raise ValueError(f"BaseParams.{field}[{i}] has shape {got}, expected {want} "
                                     f"(layer sizes {sizes})")
        if tuple(jnp.shape(params.perm)) != (self.input_dim,):
            raise ValueError(f"BaseParams.perm has shape {tuple(jnp.shape(params.perm))}, "
                             f"expected ({self.input_dim},)")

    def flatten_input(self, x: jax.Array) -> jax.Array:
        """``x`` ``[batch, ...]`` flattened to ``[batch, input_dim]`` (float), or a ValueError."""
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"base model input must be [batch, ...], got shape {x.shape}")
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.input_dim:
            raise ValueError(f"base model input has {flat.shape[1]} features per example "
                             f"(shape {x.shape}), the model expects input_dim={self.input_dim}")
        if flat.shape[0] < 2:
            raise ValueError(f"base model needs a batch of at least 2 examples for its batch "
                             f"norms, got {flat.shape[0]}")
        if not jnp.issubdtype(flat.dtype, jnp.floating):
            flat = flat.astype(jnp.float32)
        return flat

    def forward(self, params: BaseParams, x: jax.Array) -> Activations:
        """Pre- and post-activations of every layer on the batch ``x`` ``[batch, ...]``."""
        self.check_params(params)
        h = jnp.take(self.flatten_input(x), params.perm, axis=1)
        post, pre = [h], []
        for w, b in zip(params.w, params.b):
            z = batch_standardize(h @ w) + b
            h = jax.nn.relu(z)
            pre.append(z)
            post.append(h)
        return Activations(pre=tuple(pre), post=tuple(post))

    def features(self, params: BaseParams, x: jax.Array) -> jax.Array:
        """The output layer's post-activations ``[batch, output_size]``."""
        return self.forward(params, x).post[-1]
