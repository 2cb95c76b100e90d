"""A per-parameter MLP learned optimizer (the family of Metz et al. 2019, 2022; our own code).

Every parameter coordinate is described by a handful of features, the same small MLP (weights θ,
shared by all coordinates) maps them to a *direction* ``d`` and a *log-magnitude* ``m``, and::

    step         = d · exp(a · m) · b          (a = exp_mult, b = step_mult; 1e-3 each by default)
    params_next  = params − step

Features of one coordinate (rows of the input slab, ``F = K + 3`` with ``K`` momentum decays):

=========================  ===============================================================
``p̃ = p / rms_T(p)``       the parameter, divided by its RMS over its tensor ``T``
``ṽ = √v̂ / rms_T(√v̂)``     the gradient's RMS (``v ← β₂ v + (1 − β₂) g²``, bias-corrected),
                           relative to its tensor's
``m̂_k / √(v̂ + ε)``         Adam-like directions from the momenta ``m_k ← β_k m_k + (1 − β_k) g``
                           (bias-corrected), one per decay ``β_k``
``g / √(v̂ + ε)``           the gradient, normalized the same way
=========================  ===============================================================

Every feature is invariant to rescaling the gradient, and ``p̃``/``ṽ`` carry the per-tensor
relative magnitudes. (Normalizing the raw ``g`` and ``m_k`` by their per-tensor mean squares
instead, as some implementations do, needs a reduction and a broadcast over every feature row and
measured markedly slower here for about the same information.)
The step count enters through ``tanh(t / τ)`` for a ladder of timescales ``τ``; it is the same for
every coordinate, so instead of widening the input slab it is folded into the first layer's bias
(``b₁ + W_τᵀ tanh(t / τ)``), which is the same function at a fraction of the cost.

Initialization. A learned linear *skip* from the features to ``d`` starts as the indicator of the
``m̂ / √v̂`` feature of the 0.9 momentum, and the MLP's read-out starts small, so the untrained
optimizer takes (nearly) Adam's steps with learning rate ``b`` (ε inside the root): small and
sensible.

Layout and cost. All coordinates live in one flat slab of ``P`` columns (units-major, as in
:mod:`l2o.optimizers.lstm`): features are ``[F, P]`` and the momenta and second moments are stored
flat (``[K, P]`` and ``[P]``) between steps. Only the parameters keep the user's tree shape.
Per-tensor statistics are two reductions (of ``p²`` per leaf and of ``v̂`` over slab slices).
The default MLP has one hidden layer of 32 units, evaluated as one fused loop over the
coordinates (:func:`mlp_step`) that never writes the ``[32, P]`` hidden activations: on CPU this
is ~3× faster than matmuls, and a second hidden layer of 32 (``hidden_sizes=(32, 32)``, evaluated
with matmuls) roughly triples the cost of the update, past the issue's targets (≤ 3× / ≤ 6× Adam's
step on the 784-20-10 / 784-128-128-10 MLPs; see ``benchmarks/lopt_step_cost.py``). The price of
the fused form is compile time (a few seconds per large tensor). Optimizer state: ``4·(K + 1)``
bytes per parameter besides the parameters themselves (20 with the default four decays).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, zero_iteration
from l2o.optimizers.registry import register_optimizer
from l2o.types import MetaParams, Params, PRNGKey

#: Timescales of the step-count embedding ``tanh(t / τ)``.
DEFAULT_TIMESCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
_FEATURE_EPS = 1e-12  # inside rsqrt of the per-tensor mean squares
_RMS_EPS = 1e-8  # inside rsqrt of the gradient second moment


# ---------------------------------------------------------------------------------------------
# the flat slab


@dataclasses.dataclass(frozen=True)
class SlabLayout:
    """Static description of a parameter tree as a flat slab of ``total`` columns.

    Leaf ``i`` occupies columns ``offsets[i] : offsets[i] + sizes[i]`` (row-major ravel).
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    total: int

    @classmethod
    def of(cls, tree: Params) -> SlabLayout:
        """The layout of ``tree`` (only shapes matter: works on tracers)."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        shapes = tuple(tuple(int(s) for s in jnp.shape(x)) for x in leaves)
        sizes = tuple(int(math.prod(s)) for s in shapes)
        offsets = tuple(int(sum(sizes[:i])) for i in range(len(sizes)))
        return cls(treedef, shapes, sizes, offsets, int(sum(sizes)))

    @property
    def num_tensors(self) -> int:
        """Number of leaves."""
        return len(self.sizes)

    def flatten(self, tree: Params) -> jax.Array:
        """The leaves of ``tree`` raveled and concatenated, as float32 ``[total]``."""
        leaves = self.treedef.flatten_up_to(tree)
        parts = [jnp.ravel(x).astype(jnp.float32) for x in leaves]
        if not parts:
            return jnp.zeros((0,), jnp.float32)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    def apply_step(self, tree: Params, step: jax.Array) -> Params:
        """``tree − step`` with the flat ``step`` split back into the leaves (leaf dtypes kept)."""
        leaves = self.treedef.flatten_up_to(tree)
        out = [p - step[o:o + n].reshape(s).astype(p.dtype)
               for p, o, n, s in zip(leaves, self.offsets, self.sizes, self.shapes)]
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def tensor_mean(self, x: jax.Array) -> jax.Array:
        """Per-tensor means of ``x`` ``[..., total]`` over its columns: ``[..., num_tensors]``."""
        cols = [jnp.mean(x[..., o:o + n], axis=-1) if n else jnp.zeros(x.shape[:-1], x.dtype)
                for o, n in zip(self.offsets, self.sizes)]
        return jnp.stack(cols, axis=-1)

    def expand(self, v: jax.Array) -> jax.Array:
        """Per-tensor values ``[..., num_tensors]`` broadcast to their columns: ``[..., total]``."""
        if self.num_tensors == 1:
            return jnp.broadcast_to(v, v.shape[:-1] + (self.total,))
        parts = [jnp.broadcast_to(v[..., i:i + 1], v.shape[:-1] + (n,))
                 for i, n in enumerate(self.sizes)]
        return jnp.concatenate(parts, axis=-1)


def step_embedding(iteration: jax.Array, timescales: tuple[float, ...]) -> jax.Array:
    """``tanh(t / τ)`` for each timescale ``τ``: ``[len(timescales)]`` float32."""
    t = iteration.astype(jnp.float32)
    return jnp.tanh(t / jnp.asarray(timescales, jnp.float32))


def scale_free_features(layout: SlabLayout, params: Params, g: jax.Array, momenta: jax.Array,
                        v_hat: jax.Array, t: jax.Array,
                        decays: tuple[float, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The feature slab ``[K + 3, P]``: ``p̃``, ``ṽ``, ``m̂_k / √(v̂ + ε)``, ``g / √(v̂ + ε)``.

    ``g``, ``momenta`` (``[K, P]``, already updated) and ``v_hat`` (bias-corrected second moment,
    ``[P]``) are flat; ``params`` is the user's tree; ``t`` the 1-based step (float). Also returns
    the per-tensor mean squares of the parameters and means of ``v̂`` (``[L]`` each).
    """
    leaves = layout.treedef.flatten_up_to(params)
    p_ms, p_parts = [], []
    for leaf in leaves:
        x = jnp.ravel(leaf).astype(jnp.float32)
        ms = jnp.mean(x * x) if x.size else jnp.zeros((), jnp.float32)
        p_ms.append(ms)
        p_parts.append(x * jax.lax.rsqrt(ms + _FEATURE_EPS))
    p_ms = jnp.stack(p_ms) if p_ms else jnp.zeros((0,), jnp.float32)
    if not p_parts:
        p_tilde = jnp.zeros((0,), jnp.float32)
    else:
        p_tilde = p_parts[0] if len(p_parts) == 1 else jnp.concatenate(p_parts)
    v_mean = layout.tensor_mean(v_hat)
    v_tilde = jnp.sqrt(v_hat + _RMS_EPS) * layout.expand(jax.lax.rsqrt(v_mean + _RMS_EPS))
    inv = jax.lax.rsqrt(v_hat + _RMS_EPS)
    d = jnp.asarray(decays, jnp.float32)[:, None]
    m_hat = momenta / (1.0 - d ** t)
    x = jnp.concatenate([p_tilde[None], v_tilde[None], m_hat * inv[None], (g * inv)[None]], axis=0)
    return x, p_ms, v_mean


def dense_init(key: PRNGKey, fan_in: int, fan_out: int, scale: float = 2.0) -> jax.Array:
    """A ``[fan_in, fan_out]`` normal matrix with variance ``scale / fan_in`` (He for ReLU)."""
    return jax.random.normal(key, (fan_in, fan_out), jnp.float32) * math.sqrt(scale / fan_in)


def init_mlp(key: PRNGKey, num_inputs: int, hidden: tuple[int, ...], num_time: int,
             num_outputs: int = 2, out_scale: float = 1e-2) -> dict:
    """Weights of the per-coordinate MLP.

    ``layers[l]``: ``{"w": [in, units], "b": [units]}`` (ReLU after each); ``time``: ``[T, h₀]``,
    the step embedding's weights into the first layer; ``out``: ``{"w": [h_last, num_outputs],
    "b": [num_outputs]}``, started at ``out_scale`` of the usual scale.
    """
    keys = jax.random.split(key, len(hidden) + 2)
    layers = []
    fan_in = num_inputs
    for u, k in zip(hidden, keys[:len(hidden)]):
        layers.append({"w": dense_init(k, fan_in, u), "b": jnp.zeros((u,), jnp.float32)})
        fan_in = u
    net = {
        "layers": layers,
        "out": {"w": out_scale * dense_init(keys[-1], fan_in, num_outputs, 1.0),
                "b": jnp.zeros((num_outputs,), jnp.float32)},
    }
    if hidden:
        net["time"] = dense_init(keys[-2], num_time, hidden[0], 1.0)
    return net


def _step_dots(ws: tuple[jax.Array, ...], bs: tuple[jax.Array, ...], skip: jax.Array,
               x: jax.Array, exp_mult: float, step_mult: float) -> jax.Array:
    """Reference evaluation of the step: one matmul per layer over the units-major slab."""
    h = x
    for i, (w, b) in enumerate(zip(ws, bs)):
        z = w.T @ h + (b[:, None] if b.ndim == 1 else b)
        h = jax.nn.relu(z) if i < len(ws) - 1 else z
    direction = h[0] + skip @ x
    return direction * jnp.exp(exp_mult * h[1]) * step_mult


def _step_unrolled(w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, skip: jax.Array,
                   x: jax.Array, exp_mult: float, step_mult: float) -> jax.Array:
    """The step of a one-hidden-layer MLP, written as scalar-weighted sums of slab rows.

    XLA fuses all of it (hidden layer, read-out, skip, ``exp``) into one loop over the coordinates
    that keeps the hidden units in registers: each feature row is read once and nothing of size
    ``[units, P]`` is written. Measured ~3× faster on CPU than the matmul form, whose hidden
    activations do not fit in cache. Only for one hidden layer: with two, XLA would recompute the
    first layer for every unit of the second.
    """
    rows = [x[f] for f in range(x.shape[0])]
    direction = b2[0] + skip[0] * rows[0]
    for f in range(1, len(rows)):
        direction = direction + skip[f] * rows[f]
    magnitude = b2[1]
    for j in range(w1.shape[1]):
        z = b1[j] + w1[0, j] * rows[0]
        for f in range(1, len(rows)):
            z = z + w1[f, j] * rows[f]
        h = jax.nn.relu(z)
        direction = direction + w2[j, 0] * h
        magnitude = magnitude + w2[j, 1] * h
    return direction * jnp.exp(exp_mult * magnitude) * step_mult


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_step(exp_mult: float, step_mult: float, w1: jax.Array, b1: jax.Array, w2: jax.Array,
                b2: jax.Array, skip: jax.Array, x: jax.Array) -> jax.Array:
    return _step_unrolled(w1, b1, w2, b2, skip, x, exp_mult, step_mult)


def _fused_step_fwd(exp_mult, step_mult, w1, b1, w2, b2, skip, x):
    out = _step_unrolled(w1, b1, w2, b2, skip, x, exp_mult, step_mult)
    return out, (w1, b1, w2, b2, skip, x)


def _fused_step_bwd(exp_mult, step_mult, res, ct):
    # The backward pass recomputes with matmuls, whose transposes are matmuls too (the unrolled
    # form's weight gradients would be hundreds of separate reductions over the slab).
    w1, b1, w2, b2, skip, x = res

    def ref(w1, b1, w2, b2, skip, x):
        return _step_dots((w1, w2), (b1, b2), skip, x, exp_mult, step_mult)

    _, vjp = jax.vjp(ref, w1, b1, w2, b2, skip, x)
    return vjp(ct)


_fused_step.defvjp(_fused_step_fwd, _fused_step_bwd)


def mlp_step(net: dict, skip: jax.Array, x: jax.Array, emb: jax.Array, exp_mult: float,
             step_mult: float, first_bias: jax.Array | None = None) -> jax.Array:
    """``step = d · exp(a·m) · b`` for every coordinate of the units-major slab ``x`` ``[F, n]``.

    ``(d', m)`` are the MLP's two outputs and ``d = d' + skip · x`` (the learned linear skip);
    ``emb`` (the step embedding) enters the first layer's bias, and so does ``first_bias``
    (``[h₀]``, or ``[h₀, n]`` per column; used for per-tensor conditioning). A single hidden
    layer is evaluated in one fused pass (:func:`_step_unrolled`, with a custom VJP that
    differentiates the matmul form: reverse mode only); deeper nets use one matmul per layer.
    Both compute the same function.
    """
    layers = net["layers"]
    b1 = layers[0]["b"] + emb @ net["time"]
    if first_bias is not None:
        b1 = b1 + first_bias if first_bias.ndim == 1 else b1[:, None] + first_bias
    ws = tuple(layer["w"] for layer in layers) + (net["out"]["w"],)
    bs = (b1,) + tuple(layer["b"] for layer in layers[1:]) + (net["out"]["b"],)
    if len(layers) == 1:
        return _fused_step(float(exp_mult), float(step_mult), ws[0], bs[0], ws[1], bs[1], skip, x)
    return _step_dots(ws, bs, skip, x, exp_mult, step_mult)


#: Leaves with at least this many coordinates get their own fused step computation; smaller
#: leaves share one.
OWN_STEP_MIN_SIZE = 4096


def apply_steps(layout: SlabLayout, params: Params, x: jax.Array,
                step_fn: Callable[[jax.Array, jax.Array | None], jax.Array],
                leaf_bias: jax.Array | None = None,
                leaf_scale: jax.Array | None = None) -> Params:
    """``params − step`` with the step of some columns of ``x`` given by ``step_fn``.

    ``step_fn(x_cols, bias)`` returns the flat step of the feature columns ``x_cols``; ``bias`` is
    ``None`` or the first-layer bias to add (``[h₀]`` for one leaf, ``[h₀, n]`` per column).
    ``leaf_bias`` (``[L, h₀]``) and ``leaf_scale`` (``[L]``) are optional per-leaf conditioning.

    Each leaf of at least :data:`OWN_STEP_MIN_SIZE` coordinates gets its own ``step_fn`` call on
    its slice of the slab, so its fused step computation has a single consumer; the smaller
    leaves share one call. (One call for the whole slab, then sliced per leaf, gives the step
    several consumers, and XLA then splits the fused MLP at the ``exp``, evaluating the hidden
    layer twice; one call per leaf multiplies the compile time by the number of leaves.)
    """
    leaves = layout.treedef.flatten_up_to(params)
    cols = list(zip(layout.offsets, layout.sizes))
    big = [i for i, (_, n) in enumerate(cols) if n >= OWN_STEP_MIN_SIZE]
    small = [i for i, (_, n) in enumerate(cols) if 0 < n < OWN_STEP_MIN_SIZE]
    steps: dict[int, jax.Array] = {}
    for i in big:
        o, n = cols[i]
        bias = None if leaf_bias is None else leaf_bias[i]
        steps[i] = step_fn(x[:, o:o + n], bias)
    if small:
        xs = jnp.concatenate([x[:, cols[i][0]:cols[i][0] + cols[i][1]] for i in small], axis=1)
        bias = None
        if leaf_bias is not None:
            bias = jnp.concatenate([jnp.broadcast_to(leaf_bias[i][:, None],
                                                     (leaf_bias.shape[1], cols[i][1]))
                                    for i in small], axis=1)
        st = step_fn(xs, bias)
        off = 0
        for i in small:
            steps[i] = st[off:off + cols[i][1]]
            off += cols[i][1]
    out = []
    for i, (p, shape) in enumerate(zip(leaves, layout.shapes)):
        if i not in steps:
            out.append(p)
            continue
        st = steps[i] if leaf_scale is None else steps[i] * leaf_scale[i]
        out.append(p - st.reshape(shape).astype(p.dtype))
    return jax.tree_util.tree_unflatten(layout.treedef, out)


# ---------------------------------------------------------------------------------------------
# the optimizer


@struct.dataclass
class MLPLOptState:
    """Parameters (user's tree), iteration counter, momenta ``[K, P]`` and EMA of g² ``[P]``."""

    params: Params
    iteration: jax.Array
    momenta: jax.Array
    rms: jax.Array


class MLPLOptOptimizer(Optimizer):
    """The per-parameter MLP optimizer with weights θ (see :class:`MLPLOpt`)."""

    def __init__(self, config: MLPLOpt, theta: MetaParams):
        self.config = config
        self.theta = theta

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> MLPLOptState:
        """Zero momenta and second moments, stored flat."""
        n = SlabLayout.of(params).total
        return MLPLOptState(params=params, iteration=zero_iteration(),
                            momenta=jnp.zeros((len(self.config.decays), n), jnp.float32),
                            rms=jnp.zeros((n,), jnp.float32))

    def features(self, state: MLPLOptState, g: jax.Array, momenta: jax.Array,
                 rms: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """:func:`scale_free_features` of the *updated* momenta and second moment."""
        t = (state.iteration + 1).astype(jnp.float32)
        v_hat = rms / (1.0 - jnp.float32(self.config.rms_decay) ** t)
        return scale_free_features(SlabLayout.of(state.params), state.params, g, momenta, v_hat,
                                   t, self.config.decays)

    def _moments(self, state: MLPLOptState, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        decays = jnp.asarray(self.config.decays, jnp.float32)[:, None]
        momenta = decays * state.momenta + (1.0 - decays) * g[None]
        b2 = jnp.float32(self.config.rms_decay)
        rms = b2 * state.rms + (1.0 - b2) * g * g
        return momenta, rms

    def leaf_step(self, x: jax.Array, emb: jax.Array,
                  first_bias: jax.Array | None = None) -> jax.Array:
        """The flat step ``d · exp(a·m) · b`` of some feature columns (:func:`mlp_step`)."""
        cfg = self.config
        return mlp_step(self.theta["mlp"], self.theta["skip"], x, emb, cfg.exp_mult,
                        cfg.step_mult, first_bias)

    def update(self, state: MLPLOptState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> MLPLOptState:
        """One step: update the moments, build the features, run the MLP, step the params."""
        lay = SlabLayout.of(state.params)
        g = lay.flatten(grads)
        momenta, rms = self._moments(state, g)
        x, _, _ = self.features(state, g, momenta, rms)
        emb = step_embedding(state.iteration, self.config.timescales)
        params = apply_steps(lay, state.params, x, lambda xi, b: self.leaf_step(xi, emb, b))
        return MLPLOptState(params=params,
                            iteration=state.iteration + 1,
                            momenta=momenta.astype(state.momenta.dtype),
                            rms=rms.astype(state.rms.dtype))

    @property
    def name(self) -> str:
        return self.config.name


class PerParameterMLPSettings:
    """Settings checks shared by the per-parameter MLP optimizers (frozen dataclasses with
    ``hidden_sizes``, ``decays`` and ``timescales`` fields): YAML lists become tuples."""

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(u) for u in self.hidden_sizes))
        object.__setattr__(self, "decays", tuple(float(d) for d in self.decays))
        object.__setattr__(self, "timescales", tuple(float(t) for t in self.timescales))
        if not self.decays:
            raise ValueError("decays must name at least one momentum decay")
        if not self.hidden_sizes:
            raise ValueError("hidden_sizes must name at least one hidden layer")

    @property
    def num_features(self) -> int:
        """``F``: rows of the input slab."""
        return len(self.decays) + 3


@register_optimizer("mlp")
@dataclasses.dataclass(frozen=True)
class MLPLOpt(PerParameterMLPSettings, LearnedOptimizer):
    """A per-parameter MLP learned optimizer (θ = the MLP's weights and the direction skip).

    Args:
      hidden_sizes: units of each hidden ReLU layer of the shared MLP.
      decays: momentum decays ``β_k`` (one momentum slab row each).
      rms_decay: decay of the EMA of ``g²``.
      step_mult: ``b``, the step scale.
      exp_mult: ``a``, the scale of the log-magnitude output.
      timescales: of the step-count embedding ``tanh(t / τ)``.
      out_scale: initial scale of the MLP read-out relative to the usual (He) scale.
    """

    hidden_sizes: tuple[int, ...] = (32,)
    decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    rms_decay: float = 0.999
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    timescales: tuple[float, ...] = DEFAULT_TIMESCALES
    out_scale: float = 1e-2

    def skip_init(self) -> jax.Array:
        """The initial skip: the indicator of the ``m̂ / √v̂`` feature of the decay nearest 0.9."""
        k = min(range(len(self.decays)), key=lambda i: abs(self.decays[i] - 0.9))
        return jnp.zeros((self.num_features,), jnp.float32).at[2 + k].set(1.0)

    def init(self, key: PRNGKey) -> MetaParams:
        """θ = ``{"mlp": weights, "skip": [F]}``."""
        return {"mlp": init_mlp(key, self.num_features, self.hidden_sizes, len(self.timescales),
                                out_scale=self.out_scale),
                "skip": self.skip_init()}

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> MLPLOptOptimizer:
        """The MLP optimizer with weights ``theta``."""
        return MLPLOptOptimizer(self, theta)

    @property
    def name(self) -> str:
        return "mlp"
