"""The coordinatewise deep LSTM optimizer of "Learning to learn by gradient descent by gradient
descent" (Andrychowicz et al. 2016).

Every parameter coordinate is processed by the same small network: its gradient is preprocessed
into two features (:func:`log_and_sign`), fed through a stack of LSTM layers (20 and 20 units by
default) whose weights are shared by all coordinates, and a linear read-out produces one number
per coordinate. That number times ``output_scale`` (0.01) is the step::

    params_next = params + output_scale * network(features(grad), lstm_state)

i.e. the network outputs the *step itself*, not a descent direction: a network that behaves like
SGD learns to output a multiple of ``-grad``. Each coordinate keeps its own LSTM state ``(h, c)``
for every layer.

Stable variant (preset ``l2l-digits-stable``). The seed's steps do not shrink with the gradient
(LogAndSign is scale-free: at ``|g| ≈ 1e-4`` a trained LSTM still moves each weight ~0.04 per
step, and with a zero gradient it moves every parameter) and its read-out is unbounded, so it
diverges on longer runs and other nets where Adam does not. Three options, all off by default
(the seed), change only how the read-out ``out`` becomes the step::

    step = output_scale · tanh(out) · min(|g|·e^k, 1) · max(rms(p₀), step_floor)
                 bounded_output       gated             relative_steps

``gated`` multiplies by the magnitude of the linear sign feature, so a zero gradient gives an
exactly zero step and steps shrink linearly with ``|g|`` below ``e^-k``; ``bounded_output`` caps
``|step|`` at ``output_scale`` whatever the LSTM sees; ``relative_steps`` makes that cap a fraction
of each tensor's RMS at initialization (frozen then, as in :mod:`l2o.optimizers.normalized_mlp`;
``step_floor`` for tensors that start at zero), so one θ carries over to tensors of other scales.
θ has the same shapes either way.

Adam-direction variant (preset ``l2l-digits-adam``). Bounded steps still do not shrink near a
minimum, so a bounded LSTM trained on one small MLP still drove held-out nets (a transformer, a
conv net, noisy batch-8 runs) to a loss above their starting one where Adam does not. With
``adam_direction`` the LSTM no longer chooses the direction at all, only each coordinate's learning
rate around Adam's::

    step = -output_scale · exp(lr_range · tanh(out)) · m̂ / (√v̂ + ε)

with Adam's bias-corrected moments ``m̂``, ``v̂`` (β₁ 0.9, β₂ 0.999, kept per coordinate in the
state). Each coordinate's learning rate stays within ``output_scale · e^±lr_range`` (default
``1e-3 · e^±2``, 1.35e-4 to 7.39e-3) whatever the LSTM sees, so each coordinate's step is at most
e^lr_range times Adam's at ``output_scale``; a zero gradient from the start gives exactly zero
steps, and steps shrink as the momentum does. The LSTM, its inputs and θ's shapes are the seed's.

``net_assignments`` maps subsets of the parameters (selected by their tree paths, e.g. conv vs.
fully connected weights) to separate networks, each with its own weights; θ is then
``{net_name: net_weights}``. By default one net, ``"coordinatewise"``, handles everything.

Layout. All coordinates handled by one net are concatenated into a flat slab of ``P`` columns, and
the LSTM state of that net is stored in this flat layout between steps (one ``[units, P]`` array
for ``h`` and one for ``c`` per layer), so each layer is one fused ``[4·units, in] @ [in, P]``
matmul over every coordinate, with no per-leaf work and no copies of the large state. The
units-major layout (rather than ``[P, units]``) makes each gate a contiguous block of rows and
measured faster on CPU. Only the parameters keep the user's tree shape: gradients are flattened into
the slab (one float per coordinate) and steps are split back out of it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, tensor_rms, zero_iteration
from l2o.optimizers.registry import register_optimizer
from l2o.types import MetaParams, Params, PRNGKey

#: Selects parameters for a net: a regular expression searched in the ``"/"``-joined tree path
#: (``"layers/0/w"``), or a callable ``(path, leaf) -> bool``.
Selector = str | Callable[[str, Any], bool]

DEFAULT_NET = "coordinatewise"
_EPS = float(jnp.finfo(jnp.float32).eps)


def log_and_sign(grads: jax.Array, k: float = 5.0) -> tuple[jax.Array, jax.Array]:
    """The LogAndSign gradient preprocessing of L2L: two features per coordinate.

    ``log = max(log(|g| + eps) / k, -1)`` (magnitude, clamped below at -1) and
    ``sign = clip(g · e^k, -1, 1)`` (the sign, made linear for ``|g| < e^-k``).
    """
    log = jnp.maximum(jnp.log(jnp.abs(grads) + _EPS) / k, -1.0)
    sign = jnp.clip(grads * math.exp(k), -1.0, 1.0)
    return log, sign


def path_to_str(path: tuple) -> str:
    """A tree path as ``"a/0/b"`` (dict keys, sequence indices and attribute names)."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _matches(selector: Selector, path: str, leaf: Any) -> bool:
    if isinstance(selector, str):
        return re.search(selector, path) is not None
    return bool(selector(path, leaf))


@struct.dataclass
class LSTMNetState:
    """The LSTM state of one net, flat over its ``P`` coordinates.

    ``h[l]`` and ``c[l]`` are the ``[units, P]`` hidden and cell states of layer ``l`` (units-major:
    each unit's values over all coordinates are contiguous).
    """

    h: tuple[jax.Array, ...]
    c: tuple[jax.Array, ...]


@struct.dataclass
class LSTMOptState:
    """Parameters (user's tree), iteration counter and the LSTM state of each net; with
    ``relative_steps``, ``scale[net]`` is ``max(rms(p₀), step_floor)`` of each coordinate's tensor
    (flat ``[P]``, like the LSTM state), else ``None``; with ``adam_direction``, ``moments[net]``
    is optax's Adam state of that net's flat gradients, else ``None``."""

    params: Params
    iteration: jax.Array
    rnn: dict[str, LSTMNetState]
    scale: dict[str, jax.Array] | None = None
    moments: dict[str, optax.ScaleByAdamState] | None = None


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static routing of parameter leaves to nets: for each net, its leaf indices (in order)."""

    treedef: Any
    leaf_net: tuple[str, ...]  # net name of each leaf
    net_leaves: dict[str, tuple[int, ...]]


class LSTMOptimizer(Optimizer):
    """The coordinatewise LSTM optimizer with weights θ (see :class:`LSTMLearnedOptimizer`)."""

    def __init__(self, config: LSTMLearnedOptimizer, theta: MetaParams):
        self.config = config
        self.theta = theta

    # -- routing -------------------------------------------------------------------------------

    def layout(self, params: Params) -> _Layout:
        """Which net handles each leaf of ``params`` (static: depends on the tree and shapes)."""
        with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = self.config.net_names
        leaf_net = []
        for path, leaf in with_path:
            spath = path_to_str(path)
            for name, selector in self.config.assignments:
                if _matches(selector, spath, leaf):
                    leaf_net.append(name)
                    break
            else:
                raise ValueError(
                    f"parameter {spath!r} matches no entry of net_assignments "
                    f"({', '.join(names)})"
                )
        net_leaves = {n: tuple(i for i, m in enumerate(leaf_net) if m == n) for n in names}
        return _Layout(treedef, tuple(leaf_net), net_leaves)

    @staticmethod
    def _flat(leaves: list[jax.Array], idx: tuple[int, ...]) -> jax.Array:
        # at least float32 (bf16/f16 parameters are stepped in float32); float64 stays float64
        parts = [jnp.ravel(leaves[i]).astype(jnp.promote_types(leaves[i].dtype, jnp.float32))
                 for i in idx]
        if not parts:
            return jnp.zeros((0,), jnp.float32)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    # -- Optimizer API -------------------------------------------------------------------------

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> LSTMOptState:
        """Zero LSTM state for every coordinate."""
        lay = self.layout(params)
        leaves = jax.tree_util.tree_leaves(params)
        rnn = {}
        for name, idx in lay.net_leaves.items():
            n = sum(int(math.prod(jnp.shape(leaves[i]))) for i in idx)
            zeros = tuple(jnp.zeros((u, n), jnp.float32) for u in self.config.layers)
            rnn[name] = LSTMNetState(h=zeros, c=zeros)
        scale = None
        if self.config.relative_steps:
            scale = {name: self._flat([self._tensor_scale(leaves[i]) for i in idx],
                                      tuple(range(len(idx))))
                     for name, idx in lay.net_leaves.items()}
        moments = None
        if self.config.adam_direction:
            moments = {name: ADAM.init(self._flat(leaves, idx))
                       for name, idx in lay.net_leaves.items()}
        return LSTMOptState(params=params, iteration=zero_iteration(), rnn=rnn, scale=scale,
                            moments=moments)

    def _tensor_scale(self, p: jax.Array) -> jax.Array:
        """``max(rms(p), step_floor)`` broadcast to ``p``'s shape, in float32."""
        return jnp.full(jnp.shape(p), jnp.maximum(tensor_rms(jnp.asarray(p)),
                                                  self.config.step_floor), jnp.float32)

    def update(self, state: LSTMOptState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> LSTMOptState:
        """One step: ``params + output_scale * lstm(log_and_sign(grads))`` per coordinate (with
        the stable options: gated, bounded and relative; with ``adam_direction``, Adam's step at
        the learning rate the LSTM chose; see :class:`LSTMLearnedOptimizer`)."""
        lay = self.layout(state.params)
        g_leaves = lay.treedef.flatten_up_to(grads)
        p_leaves = lay.treedef.flatten_up_to(state.params)
        new_leaves = list(p_leaves)
        rnn = {}
        moments = None if state.moments is None else {}
        for name, idx in lay.net_leaves.items():
            g = self._flat(g_leaves, idx)
            step, rnn[name] = _lstm_step(self.theta[name], state.rnn[name], g, self.config)
            if state.scale is not None:
                step = step * state.scale[name].astype(step.dtype)
            if moments is not None:
                step, moments[name] = _adam_direction_step(step, state.moments[name], g,
                                                           self.config)
            off = 0
            for i in idx:
                p = p_leaves[i]
                n = int(math.prod(p.shape))
                new_leaves[i] = p + step[off:off + n].reshape(p.shape).astype(p.dtype)
                off += n
        params = jax.tree_util.tree_unflatten(lay.treedef, new_leaves)
        return LSTMOptState(params=params, iteration=state.iteration + 1, rnn=rnn,
                            scale=state.scale, moments=moments)

    @property
    def name(self) -> str:
        return self.config.name


def _lstm_step(net: dict, state: LSTMNetState, g: jax.Array,
               cfg: LSTMLearnedOptimizer) -> tuple[jax.Array, LSTMNetState]:
    """One application of a net to the flat gradient slab ``g`` [P]: (step [P], new state).

    The step is ``output_scale · out`` (seed), ``output_scale · tanh(out)`` with
    ``bounded_output``, times ``|sign|`` with ``gated`` (the caller applies ``relative_steps``, and
    with ``adam_direction`` turns ``output_scale · out`` into a learning rate for Adam's step).

    Units-major layout: inputs and states are ``[units, P]``, so each layer is a single
    ``[4·units, in + units] @ [in + units, P]`` matmul (input and recurrent weights stacked, gates
    fused in the order i, f, g, o) and each gate is a contiguous block of rows. The read-out is a
    weighted sum over units, which XLA fuses with the last layer's nonlinearities.
    """
    log, sign = log_and_sign(g, cfg.preprocess_k)
    x = jnp.stack([log, sign], axis=0)
    hs, cs = [], []
    for layer, (h, c) in enumerate(zip(state.h, state.c, strict=True)):
        w = net["lstm"][layer]
        units = h.shape[0]
        z = w["w"].T @ jnp.concatenate([x, h], axis=0) + w["b"][:, None]
        i, f, gg, o = (z[j * units:(j + 1) * units] for j in range(4))
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(gg)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        hs.append(h)
        cs.append(c)
        x = h
    out = jnp.sum(x * net["out"]["w"][:, None], axis=0) + net["out"]["b"]
    if cfg.bounded_output:
        out = jnp.tanh(out)
    if cfg.gated:
        out = out * jnp.abs(sign)
    # keep the state's dtype fixed (a scan carry), whatever the dtype of θ
    hs = [x.astype(h.dtype) for x, h in zip(hs, state.h, strict=True)]
    cs = [x.astype(c.dtype) for x, c in zip(cs, state.c, strict=True)]
    return cfg.output_scale * out, LSTMNetState(h=tuple(hs), c=tuple(cs))


#: Adam's direction ``m̂ / (√v̂ + ε)`` for ``adam_direction`` (optax.adam's constants). The tiny
#: ``eps_root`` keeps the derivative of √v̂ finite where a gradient was always zero, so
#: second-order meta-gradients stay finite; it moves no value measurably.
ADAM = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-30)


def _adam_direction_step(scaled_out: jax.Array, moments: optax.ScaleByAdamState, g: jax.Array,
                         cfg: LSTMLearnedOptimizer
                         ) -> tuple[jax.Array, optax.ScaleByAdamState]:
    """Adam's step at the learning rate the LSTM chose per coordinate, and Adam's new state.

    ``scaled_out`` is :func:`_lstm_step`'s ``output_scale · out``; the learning rate is
    ``output_scale · exp(lr_range · tanh(out))``.
    """
    direction, moments = ADAM.update(g, moments)
    out = scaled_out / cfg.output_scale
    lr = cfg.output_scale * jnp.exp(cfg.lr_range * jnp.tanh(out))
    return -lr * direction, moments


def _as_tuple(x: Any) -> Any:
    if isinstance(x, list | tuple):
        return tuple(_as_tuple(v) for v in x)
    return x


@register_optimizer("lstm")
@dataclasses.dataclass(frozen=True)
class LSTMLearnedOptimizer(LearnedOptimizer):
    """L2L's coordinatewise deep LSTM optimizer (θ = the weights of each net).

    Args:
      layers: units of each LSTM layer (L2L: ``(20, 20)``).
      preprocess_k: the ``k`` of :func:`log_and_sign` (L2L: 5).
      output_scale: multiplies the network output to give the step (L2L: 0.01).
      net_assignments: ``((net_name, selector), ...)``; each parameter leaf goes to the first net
        whose selector matches (a regex searched in its ``"/"``-joined tree path, or a callable
        ``(path, leaf) -> bool``); a leaf that matches none is an error. Default: one net
        ``"coordinatewise"`` for every parameter.
      forget_bias: initial bias of the forget gates.
      gated: multiply each coordinate's step by the magnitude of its linear sign feature,
        ``min(|g|·e^k, 1)``: a zero gradient gives a zero step, and steps shrink linearly with
        ``|g|`` below ``e^-k``. Off in L2L.
      bounded_output: ``tanh`` on the read-out, so ``|step| ≤ output_scale`` (times the tensor
        scale with ``relative_steps``). Off in L2L (a linear, unbounded read-out).
      relative_steps: multiply each step by its tensor's scale at initialization,
        ``max(rms(p₀), step_floor)``. Off in L2L.
      step_floor: the smallest tensor scale with ``relative_steps`` (tensors starting at zero).
      adam_direction: step along Adam's direction ``m̂/(√v̂ + ε)`` at the learning rate
        ``output_scale · exp(lr_range · tanh(out))`` per coordinate (``output_scale`` is then
        the base learning rate). Off in L2L; excludes the three options above.
      lr_range: with ``adam_direction``, the natural-log half-width of the learning rates the
        LSTM can choose around ``output_scale``.
    """

    layers: tuple[int, ...] = (20, 20)
    preprocess_k: float = 5.0
    output_scale: float = 0.01
    net_assignments: tuple[tuple[str, Selector], ...] | None = None
    forget_bias: float = 1.0
    gated: bool = False
    bounded_output: bool = False
    relative_steps: bool = False
    step_floor: float = 0.1
    adam_direction: bool = False
    lr_range: float = 2.0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(u) for u in _as_tuple(self.layers)))
        if self.net_assignments is not None:
            na = _as_tuple(self.net_assignments)
            names = [n for n, _ in na]
            if len(set(names)) != len(names):
                raise ValueError(f"repeated net name in net_assignments: {names}")
            if not names:
                raise ValueError("net_assignments is empty")
            object.__setattr__(self, "net_assignments", na)
        if not self.layers:
            raise ValueError("layers must name at least one LSTM layer")
        if not self.step_floor > 0:
            raise ValueError(f"step_floor must be > 0, got {self.step_floor}")
        if self.adam_direction and (self.gated or self.bounded_output or self.relative_steps):
            raise ValueError("adam_direction replaces gated, bounded_output and relative_steps; "
                             "turn those off")
        if self.adam_direction and not self.output_scale > 0:
            raise ValueError("with adam_direction, output_scale is the base learning rate and "
                             f"must be > 0, got {self.output_scale}")
        if not self.lr_range >= 0:
            raise ValueError(f"lr_range must be >= 0, got {self.lr_range}")

    @property
    def assignments(self) -> tuple[tuple[str, Selector], ...]:
        """The effective ``(net_name, selector)`` pairs."""
        return self.net_assignments or ((DEFAULT_NET, ""),)

    @property
    def net_names(self) -> tuple[str, ...]:
        """Names of the nets, the keys of θ."""
        return tuple(n for n, _ in self.assignments)

    def init_net(self, key: PRNGKey) -> dict:
        """Weights of one net.

        ``lstm[l]["w"]``: ``[in + units, 4·units]`` (rows: the layer's inputs, then its recurrent
        state; columns: gates i, f, g, o), ``lstm[l]["b"]``: ``[4·units]`` (forget gates start at
        ``forget_bias``); ``out["w"]``: ``[units]``, ``out["b"]``: scalar.
        """
        layers = []
        fan_in = 2
        keys = jax.random.split(key, len(self.layers) + 1)
        for u, k in zip(self.layers, keys[:-1], strict=True):
            std = 1.0 / math.sqrt(fan_in + u)
            b = jnp.zeros((4 * u,), jnp.float32).at[u:2 * u].set(self.forget_bias)
            layers.append({
                "w": std * jax.random.normal(k, (fan_in + u, 4 * u), jnp.float32),
                "b": b,
            })
            fan_in = u
        out = {
            "w": jax.random.normal(keys[-1], (fan_in,), jnp.float32) / math.sqrt(fan_in),
            "b": jnp.zeros((), jnp.float32),
        }
        return {"lstm": layers, "out": out}

    def init(self, key: PRNGKey) -> MetaParams:
        """θ = ``{net_name: net_weights}``, each net initialized from its own key."""
        names = self.net_names
        keys = jax.random.split(key, len(names))
        return {n: self.init_net(k) for n, k in zip(names, keys, strict=True)}

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> LSTMOptimizer:
        """The LSTM optimizer with weights ``theta``."""
        return LSTMOptimizer(self, theta)

    @property
    def name(self) -> str:
        return "lstm"
