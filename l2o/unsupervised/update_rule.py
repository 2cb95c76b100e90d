"""The learned unsupervised update rule of Metz et al. (2018), re-expressed in JAX/flax.

The rule trains a :class:`~l2o.unsupervised.base_model.BaseModel` without labels and without
gradients: from the activations of one batch it computes an update of every forward weight, bias
and backward weight of the base model, and takes the inner step of the seed's "rolling" optimizer::

    w ← w·(1 − lr) − Δ·lr                                       (:func:`rolling_step`)

for all of them (``lr = inner_lr``, 1e-4 by default). Its meta-parameters θ (the weights of the
small networks below) are what meta-training learns; the base model is reset for every
meta-objective evaluation. One application (:meth:`UnsupervisedUpdateRule.apply`) goes:

1. **Top-level error signal.** The output layer's post-activations ``[batch, n_out]`` become an
   error ``d`` ``[batch, n_out, delta_dim]`` through 1-d convolutions *over the batch axis* (each
   unit's column of activations is a sequence): a kernel-5 convolution to ``top_delta_size``
   channels, two kernel-3 convolutions whose channels are the ``n_out`` units (mixing units),
   ``top_delta_layers`` more kernel-3 convolutions and a last one to ``delta_dim`` channels.
2. **Per-unit hidden states, top to bottom.** For every layer of units ``k`` (output down to the
   input) a hidden state ``h_k`` ``[batch, n_k, compute_h_size]`` is computed from, per unit and
   example: its post-activation, its pre-activation (the input layer uses its values twice), a
   unit-identity embedding ``(sin θ_u, cos θ_u)`` with ``θ_u`` spaced over ``[0, 4π]``, and the
   incoming error ``d`` (batch-normalized together), plus per-unit statistics (mean |w|, RMS, mean,
   standard deviation) of the incoming weights (layer below) and the outgoing weights (layer
   above) — the existing matrix's twice at the edges — scaled to unit RMS, and the unit's bias.
   A kernel-3 convolution over the batch axis with batch norm and a residual block of two
   kernel-3 convolutions *over units* (the seed's unit convolutions) follow, ``compute_h_layers``
   + 1 times. The same network (shared θ) serves every layer.
3. **Error passed down.** ``δ_k = d_k · sigmoid(pre_k) + A h_k`` (a learned linear readout ``A``);
   the error for the layer below is ``δ_k`` sent through the *backward* weights,
   ``d_{k−1} = δ_k bw_kᵀ``, renormalized to unit RMS over its channels for every unit and example.
4. **Weight update of layer ``i``** (``w`` ``[n_lo, n_up]`` between units ``lo`` and ``up``), from
   the named terms below, where ``w̃`` is ``w`` with every column (receptive field) scaled to unit
   RMS, ``x̂`` are the activations standardized per unit over the batch (``B`` examples) and
   ``R(a, b) = mean_g(r_a(a)ᵀ r_b(b)) / B`` is a *low-rank readout*: learned linear maps ``r``
   from hidden states to ``num_grad_channels`` channels, contracted over the batch:

   ==================  ==========================================================================
   ``w_base``          ``w̃``: the normalized weights themselves
   ``large_decay``     ``w̃² · sign(w̃)``: pulls large weights towards zero
   ``decorr_x``        ``w̃ · (x̂_upᵀ x̂_up / B / √n_up)``, scaled to unit RMS: decorrelates the
                       units of the upper layer
   ``hebb``            ``−x̂_loᵀ x̂_up / B``: Hebbian co-activation of the pair
   ``order0``          ``R(h_lo, h_up)``: a zeroth-order (weight-independent) readout of the pair
   ``rbf``             ``exp(−w̃²) · R(h_lo, h_up)``: a readout acting on small weights (radial)
   ``order1``          ``w̃ · R(h_lo, h_up)``: a first-order (weight-proportional) readout
   ``lin_upper_symm``  ``w̃ · S_up``, ``S_up`` a symmetric, zero-diagonal readout ``R(h_up, h_up)``
   ``lin_upper_psd``   ``w̃ · P_up`` with ``P_up = R(h_up, h_up)`` using one map ``r`` (PSD)
   ``lin_lower_symm``  ``S_lo · w̃`` (symmetric readout of the lower layer)
   ``sqr_upper_symm``  ``sign(w̃) · ((√(1 + w̃²) − 1) · S_up)``
   ``sqr_lower_symm``  ``sign(w̃) · (S_lo · (√(1 + w̃²) − 1))``
   ==================  ==========================================================================

   (``S`` and ``P`` are divided by the square root of their size.) Each term is normalized per
   receptive field (``t / √(ε + mean_rows t²)``, ``ε = normalize_epsilon``), the terms are mixed
   by a learned linear readout (one weight per term, initialized to 0.1, plus a bias) and divided by
   their number. Rules against shrinking receptive fields: the component of the mix along ``w̃`` that
   would shrink it (positive mean of ``Δ·w̃``) is removed, the result is divided by
   ``√(number of terms)`` and renormalized per receptive field, and ``w̃/7`` is subtracted (so that
   the step grows every receptive field a little).
5. **Bias update.** A linear readout of ``h_up`` averaged over the batch; when its mean over units
   is negative (all biases would rise) it is shifted to mean zero; then divided by
   ``√(0.5 + mean Δb²)``.
6. **Backward weights** take the forward weights' update ``Δ`` by default
   (``identical_updates=True``); with ``identical_updates=False`` the same terms are computed on the
   backward weights and mixed by a second set of readouts in θ; with ``update_backward=False`` they
   stay fixed (feedback alignment with random feedback).

Batch norms in the rule: the seed's rule has two kinds. Those it runs in training mode (in the
hidden-state network) use the statistics of the current tensor (over batch and units, per channel)
here too. Those it runs in inference mode with moving statistics that are never updated (in the
top-level error network and the unit convolutions) reduce to ``x / √(1 + 10⁻³) + offset``, which
is what we compute. So θ holds only trainable weights and offsets: there are no running averages
and nothing in θ changes while the rule is applied.

Our changes: the seed's option to compute the hidden states of a random subset of units is left
out (it used all units by default). Everything else follows the seed's structure; the code and
words are ours.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2o.types import MetaParams, PRNGKey
from l2o.unsupervised.base_model import BaseModel, BaseParams
from l2o.unsupervised.rule import LearnedUpdateRule, register_update_rule

#: The named terms of a weight update, in the order of the mixing readout's weights.
UPDATE_TERMS: tuple[str, ...] = (
    "w_base", "large_decay", "decorr_x", "hebb", "order0", "rbf", "order1",
    "lin_upper_symm", "lin_upper_psd", "lin_lower_symm", "sqr_upper_symm", "sqr_lower_symm",
)
#: The low-rank readouts of hidden states (each a pair of maps, ``*_psd`` a single map).
READOUTS: tuple[str, ...] = (
    "order0", "rbf", "order1", "lin_upper_symm", "lin_upper_psd", "lin_lower_symm",
    "sqr_upper_symm", "sqr_lower_symm",
)
#: Slots of the stacked linear maps applied to the upper layer's hidden states (``*_top`` and
#: ``*_bottom`` are the two maps of a readout ``R(bottom, top)``; ``lin_upper_psd`` uses one map).
UPPER_MAPS: tuple[str, ...] = (
    "order0_top", "rbf_top", "order1_top", "lin_upper_symm_top", "sqr_upper_symm_top",
    "lin_upper_symm_bottom", "sqr_upper_symm_bottom", "lin_upper_psd",
)
#: Slots of the stacked linear maps applied to the lower layer's hidden states.
LOWER_MAPS: tuple[str, ...] = (
    "order0_bottom", "rbf_bottom", "order1_bottom", "lin_lower_symm_top", "sqr_lower_symm_top",
    "lin_lower_symm_bottom", "sqr_lower_symm_bottom",
)
#: Number of per-unit weight statistics fed to the hidden-state network (4 below + 4 above).
NUM_WEIGHT_STATS = 8
#: Per-unit activation features besides the error: post, pre, sin and cos of the unit id.
NUM_UNIT_FEATURES = 4
_BN_EPS = 1e-3  # the seed's batch norms (Sonnet's default)
_MIX_INIT = 0.1  # initial weight of every term in the mixing readout
_SHRINK_GUARD = 7.0  # w̃ / 7 is subtracted from every weight update


def rolling_step(x: jax.Array, delta: jax.Array, lr: float | jax.Array) -> jax.Array:
    """The inner step of the seed's rolling optimizer: ``x·(1 − lr) − delta·lr``."""
    return x * (1 - lr) - delta * lr


# ---------------------------------------------------------------------------------------------
# small building blocks


class FrozenNorm(nn.Module):
    """A batch norm in inference mode whose statistics stay at (0, 1): ``x/√(1+ε) + offset``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        offset = self.param("offset", nn.initializers.zeros, (x.shape[-1],))
        return x * (1.0 / math.sqrt(1.0 + _BN_EPS)) + offset.astype(x.dtype)


class BatchStatNorm(nn.Module):
    """A batch norm with the current tensor's statistics over all axes but the last, plus a
    learned offset (no scale, no running averages)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        offset = self.param("offset", nn.initializers.zeros, (x.shape[-1],))
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + _BN_EPS) + offset.astype(x.dtype)


def _conv(features: int, width: int, name: str | None = None) -> nn.Conv:
    """A 1-d convolution over axis 1 of ``[n, length, channels]`` with 'SAME' padding."""
    return nn.Conv(features, kernel_size=(width,), padding="SAME", name=name)


class TopDelta(nn.Module):
    """Step 1: the output layer's activations ``[batch, n_out]`` → error ``[batch, n_out, D]``."""

    size: int = 64
    layers: int = 2
    delta_dim: int = 32

    @nn.compact
    def __call__(self, top: jax.Array) -> jax.Array:
        n_out = top.shape[1]
        a = top.T[:, :, None]                                   # [units, batch, 1]
        a = nn.relu(FrozenNorm()(_conv(self.size, 5)(a)))       # over the batch axis
        a = jnp.transpose(a, (2, 1, 0))                         # [channels, batch, units]
        for _ in range(2):                                      # units become channels: mix them
            a = nn.relu(FrozenNorm()(_conv(n_out, 3)(a)))
        a = jnp.transpose(a, (2, 1, 0))                         # [units, batch, channels]
        for _ in range(self.layers):
            a = nn.relu(FrozenNorm()(_conv(self.size, 3)(a)))
        a = _conv(self.delta_dim, 3)(a)                         # [units, batch, D]
        return jnp.transpose(a, (1, 0, 2))


class UnitConv(nn.Module):
    """Residual block of two kernel-3 convolutions over units: ``[units, batch, C]`` → same."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        a = jnp.transpose(x, (1, 0, 2))                         # [batch, units, C]
        for _ in range(2):
            a = nn.relu(FrozenNorm()(_conv(channels, 3)(a)))
        return x + jnp.transpose(a, (1, 0, 2))


class HiddenState(nn.Module):
    """Step 2: per-unit hidden states ``[batch, units, size]`` of one layer of units.

    ``feats`` ``[units, batch, 4 + D]`` (post, pre, unit id sin/cos, error), ``stats``
    ``[units, 8]`` (RMS-normalized weight statistics), ``bias`` ``[units]``.
    """

    size: int = 64
    layers: int = 1

    @nn.compact
    def __call__(self, feats: jax.Array, stats: jax.Array, bias: jax.Array) -> jax.Array:
        units, batch = feats.shape[:2]
        a = BatchStatNorm()(feats)
        stats = jnp.broadcast_to(stats[:, None, :], (units, batch, stats.shape[-1]))
        bias = jnp.broadcast_to(bias[:, None, None], (units, batch, 1)).astype(a.dtype)
        a = jnp.concatenate([stats.astype(a.dtype), bias, a], axis=-1)
        for _ in range(self.layers + 1):
            a = nn.relu(BatchStatNorm()(_conv(self.size, 3)(a)))    # over the batch axis
            a = UnitConv()(a)                                       # over units
        return jnp.transpose(a, (1, 0, 2))


class LowRankReadouts(nn.Module):
    """The low-rank readouts of one layer pair: ``{name: matrix}`` for :data:`READOUTS`.

    ``order0``, ``rbf`` and ``order1`` are ``[n_lo, n_up]``; ``*_upper_*`` are ``[n_up, n_up]``
    and ``*_lower_*`` ``[n_lo, n_lo]``, the symmetric ones with zero diagonals; all but the first
    three are divided by the square root of their size. Every readout's linear maps (hidden state
    → ``channels``) are slots of two stacked kernels, ``upper`` (applied to ``h_up``, slots
    :data:`UPPER_MAPS`) and ``lower`` (``h_lo``, :data:`LOWER_MAPS`), so that one layer pair
    costs two matrix products.
    """

    channels: int = 4

    @nn.compact
    def __call__(self, upper_h: jax.Array, lower_h: jax.Array) -> dict[str, jax.Array]:
        batch, size, g = upper_h.shape[0], upper_h.shape[-1], self.channels
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))

        def maps(name: str, h: jax.Array, slots: int) -> jax.Array:
            k = self.param(name + "_maps", init, (size, slots, g))
            b = self.param(name + "_bias", nn.initializers.zeros, (slots, g))
            return jnp.einsum("buc,cmg->bumg", h, k.astype(h.dtype)) + b.astype(h.dtype)

        ru = maps("upper", upper_h, len(UPPER_MAPS))            # [batch, n_up, 8, G]
        rl = maps("lower", lower_h, len(LOWER_MAPS))            # [batch, n_lo, 7, G]
        scale = 1.0 / (g * batch)

        def contract(r_a: jax.Array, r_b: jax.Array) -> jax.Array:
            """``mean_g(r_aᵀ r_b) / batch`` per slot: ``[slots, n_a, n_b]``."""
            return jnp.einsum("bimg,bjmg->mij", r_a, r_b) * scale

        def symm(m: jax.Array) -> jax.Array:
            m = (m + jnp.swapaxes(m, -1, -2)) / math.sqrt(2.0)
            m = m * (1 - jnp.eye(m.shape[-1], dtype=m.dtype))
            return m / math.sqrt(m.shape[-1])

        pair = contract(rl[:, :, 0:3], ru[:, :, 0:3])
        up = symm(contract(ru[:, :, 5:7], ru[:, :, 3:5]))
        lo = symm(contract(rl[:, :, 5:7], rl[:, :, 3:5]))
        psd = contract(ru[:, :, 7:8], ru[:, :, 7:8])[0]
        return {"order0": pair[0], "rbf": pair[1], "order1": pair[2],
                "lin_upper_symm": up[0], "sqr_upper_symm": up[1],
                "lin_lower_symm": lo[0], "sqr_lower_symm": lo[1],
                "lin_upper_psd": psd / math.sqrt(psd.shape[0])}


# ---------------------------------------------------------------------------------------------
# pure functions of the rule


def normalize_columns(t: jax.Array, eps: float) -> jax.Array:
    """``t`` with each column (receptive field) divided by ``√(eps + mean over rows t²)``."""
    return t * jax.lax.rsqrt(eps + jnp.mean(jnp.square(t), axis=0, keepdims=True))


def standardize(x: jax.Array) -> jax.Array:
    """Activations ``[batch, units]`` centred and scaled per unit over the batch."""
    x0 = x - jnp.mean(x, axis=0, keepdims=True)
    return x0 * jax.lax.rsqrt(jnp.mean(jnp.square(x0), axis=0, keepdims=True) + 1e-6)


def weight_stats(w: jax.Array, axis: int) -> jax.Array:
    """Per-unit statistics of ``w`` reduced over ``axis``: ``[units, 4]`` (mean |w|, RMS, mean,
    standard deviation)."""
    mean = jnp.mean(w, axis=axis)
    var = jnp.mean(jnp.square(w - jnp.expand_dims(mean, axis)), axis=axis)
    return jnp.stack([jnp.mean(jnp.abs(w), axis=axis),
                      jnp.sqrt(jnp.mean(jnp.square(w), axis=axis) + 1e-6),
                      mean, jnp.sqrt(var + 1e-8)], axis=-1)


def unit_weight_stats(w_below: jax.Array | None, w_above: jax.Array | None) -> jax.Array:
    """The 8 weight statistics of a layer of units ``[units, 8]``, scaled to unit RMS: of the
    incoming weights ``w_below`` ``[n_lo, units]`` then of the outgoing ``w_above``
    ``[units, n_up]``; at an edge the existing matrix's statistics are used twice."""
    parts = []
    if w_below is not None:
        parts.append(weight_stats(w_below, 0))
    if w_above is not None:
        parts.append(weight_stats(w_above, 1))
    if len(parts) == 1:
        parts = parts * 2
    s = jnp.concatenate(parts, axis=-1)
    return s * jax.lax.rsqrt(jnp.mean(jnp.square(s)) + 1e-6)


def unit_features(post: jax.Array, pre: jax.Array, d: jax.Array) -> jax.Array:
    """Per-unit inputs of the hidden-state network ``[units, batch, 4 + D]``: post- and
    pre-activation, the unit-identity embedding and the error ``d`` ``[batch, units, D]``."""
    batch, units = post.shape
    angle = jnp.linspace(0.0, 4 * jnp.pi, units, dtype=post.dtype)
    ident = jnp.broadcast_to(angle[:, None], (units, batch))
    cols = [post.T, pre.T, jnp.sin(ident), jnp.cos(ident)]
    return jnp.concatenate([jnp.stack(cols, axis=-1), jnp.transpose(d, (1, 0, 2))], axis=-1)


def weight_update_terms(w: jax.Array, upper_x: jax.Array, lower_x: jax.Array,
                        readouts: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The named terms :data:`UPDATE_TERMS` of the update of ``w`` ``[n_lo, n_up]`` (before
    normalization), from the activations of both layers and the low-rank ``readouts``."""
    batch = upper_x.shape[0]
    wt = normalize_columns(w, 1e-6)
    ux, lx = standardize(upper_x), standardize(lower_x)
    terms = {"w_base": wt, "large_decay": jnp.square(wt) * jnp.sign(wt)}
    cov_up = (ux.T @ ux) / batch / math.sqrt(ux.shape[1])
    cw = wt @ cov_up
    terms["decorr_x"] = cw * jax.lax.rsqrt(jnp.mean(jnp.square(cw) + 1e-8))
    terms["hebb"] = -(lx.T @ ux) / batch
    terms["order0"] = readouts["order0"]
    terms["rbf"] = jnp.exp(-jnp.square(wt)) * readouts["rbf"]
    terms["order1"] = wt * readouts["order1"]
    sq = jnp.sqrt(1 + jnp.square(wt)) - 1
    sign = jnp.sign(wt)
    terms["lin_upper_symm"] = wt @ readouts["lin_upper_symm"]
    terms["lin_upper_psd"] = wt @ readouts["lin_upper_psd"]
    terms["lin_lower_symm"] = readouts["lin_lower_symm"] @ wt
    terms["sqr_upper_symm"] = (sq @ readouts["sqr_upper_symm"]) * sign
    terms["sqr_lower_symm"] = (readouts["sqr_lower_symm"] @ sq) * sign
    return terms


def merge_update_terms(terms: dict[str, jax.Array], mix: dict[str, jax.Array],
                       eps: float) -> jax.Array:
    """Mix the normalized ``terms`` with the readout ``mix`` (``w`` ``[T]``, ``b`` ``[]``) and
    apply the rules against shrinking receptive fields (module docstring, step 4)."""
    num = len(UPDATE_TERMS)
    wt = terms["w_base"]
    stack = normalize_columns(jnp.stack([terms[k] for k in UPDATE_TERMS], axis=-1), eps)
    dw = (stack @ mix["w"].astype(stack.dtype) + mix["b"].astype(stack.dtype)) / num
    shrink = jax.nn.relu(jnp.mean(dw * wt))   # w ← w − lr·Δ shrinks w when Δ·w̃ > 0
    dw = (dw - wt * shrink) / math.sqrt(num)
    return normalize_columns(dw, eps) - wt / _SHRINK_GUARD


def bias_update(raw: jax.Array) -> jax.Array:
    """The bias update from the readout ``raw`` ``[batch, units]``: averaged over the batch,
    centred when its mean is negative, divided by ``√(0.5 + mean²)``."""
    db = jnp.mean(raw, axis=0)
    db = db - jnp.minimum(jnp.mean(db), 0.0)
    return db * jax.lax.rsqrt(0.5 + jnp.mean(jnp.square(db)))


def pass_down(delta: jax.Array, bw: jax.Array) -> jax.Array:
    """Error ``delta`` ``[batch, n_up, D]`` sent through the backward weights ``bw``
    ``[n_lo, n_up]`` and renormalized over its channels: ``[batch, n_lo, D]``."""
    d = jnp.einsum("bjc,ij->bic", delta, bw)
    return d * jax.lax.rsqrt(jnp.mean(jnp.square(d), axis=-1, keepdims=True) + 1e-6)


# ---------------------------------------------------------------------------------------------
# the rule


@register_update_rule("unsupervised_rule")
@dataclasses.dataclass(frozen=True)
class UnsupervisedUpdateRule(LearnedUpdateRule):
    """The learned unsupervised update rule (module docstring); θ = :meth:`init`'s dict.

    ``output_size`` must be the base model's (the top-level error network mixes output units);
    every other size of the base model is free. Sizes of the rule's networks: ``top_delta_size``
    and ``top_delta_layers`` (step 1), ``compute_h_size`` and ``compute_h_layers`` (step 2),
    ``delta_dim`` (channels of the error), ``num_grad_channels`` (rank of the low-rank readouts);
    ``normalize_epsilon`` is the ε of the per-receptive-field normalization, ``inner_lr`` the
    rolling optimizer's learning rate.
    """

    output_size: int = 32
    top_delta_size: int = 64
    top_delta_layers: int = 2
    compute_h_size: int = 64
    compute_h_layers: int = 1
    delta_dim: int = 32
    num_grad_channels: int = 4
    normalize_epsilon: float = 1.0
    inner_lr: float = 1e-4
    update_backward: bool = True
    identical_updates: bool = True

    def __post_init__(self):
        for field in ("output_size", "top_delta_size", "compute_h_size", "delta_dim",
                      "num_grad_channels"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"UnsupervisedUpdateRule.{field} must be a positive integer, "
                                 f"got {getattr(self, field)!r}")
        for field in ("top_delta_layers", "compute_h_layers"):
            if int(getattr(self, field)) < 0:
                raise ValueError(f"UnsupervisedUpdateRule.{field} must be >= 0, "
                                 f"got {getattr(self, field)!r}")
        if not float(self.normalize_epsilon) > 0:
            raise ValueError("UnsupervisedUpdateRule.normalize_epsilon must be > 0, "
                             f"got {self.normalize_epsilon!r}")
        if not 0 < float(self.inner_lr) < 1:
            raise ValueError(f"UnsupervisedUpdateRule.inner_lr must be in (0, 1), "
                             f"got {self.inner_lr!r}")

    @property
    def name(self) -> str:
        return "unsupervised_rule"

    @property
    def update_terms(self) -> tuple[str, ...]:
        """The named terms of a weight update, in the order of θ's mixing weights."""
        return UPDATE_TERMS

    @property
    def separate_backward(self) -> bool:
        """Whether the backward weights get their own update (own readouts in θ)."""
        return self.update_backward and not self.identical_updates

    # modules
    def _top_delta(self) -> TopDelta:
        return TopDelta(self.top_delta_size, self.top_delta_layers, self.delta_dim)

    def _hidden(self) -> HiddenState:
        return HiddenState(self.compute_h_size, self.compute_h_layers)

    def _readouts(self) -> LowRankReadouts:
        return LowRankReadouts(self.num_grad_channels)

    def init(self, key: PRNGKey) -> MetaParams:
        """θ: ``{"top_delta", "hidden", "to_delta", "bias_readout", "forward"}`` (+
        ``"backward"`` with separate backward updates); ``forward``/``backward`` hold the
        low-rank ``readouts`` and the mixing readout ``mix`` (``w`` ``[len(UPDATE_TERMS)]``).

        Kernels are LeCun-normal (truncated at 2σ, as flax's default), biases and offsets zero and
        every mixing weight 0.1. The random leaves come from one draw (the structure from
        ``jax.eval_shape`` of the modules' own init), which keeps the first call fast.
        """
        shapes = jax.eval_shape(self._module_init, key)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        fan_ins = []
        for path, leaf in leaves:
            name = str(getattr(path[-1], "key", ""))
            if name == "kernel":
                fan_ins.append(math.prod(leaf.shape[:-1]))
            elif name.endswith("_maps"):
                fan_ins.append(leaf.shape[0])
            else:
                fan_ins.append(None)
        sizes = [math.prod(leaf.shape) if f else 0 for (_, leaf), f in zip(leaves, fan_ins)]
        bounds = [sum(sizes[:i + 1]) for i in range(len(sizes))]
        # truncated at ±2 and rescaled to unit variance (0.8796 is the std of that truncation)
        draws = jax.random.truncated_normal(key, -2.0, 2.0, (bounds[-1],), jnp.float32)
        chunks = jnp.split(draws / 0.87962566103423978, bounds[:-1])
        out = []
        for (path, leaf), fan_in, chunk in zip(leaves, fan_ins, chunks):
            if fan_in:
                out.append(chunk.reshape(leaf.shape) * (1.0 / math.sqrt(fan_in)))
            elif str(getattr(path[-2], "key", "")) == "mix" and path[-1].key == "w":
                out.append(jnp.full(leaf.shape, _MIX_INIT, leaf.dtype))
            else:
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    def _module_init(self, key: PRNGKey) -> MetaParams:
        """θ from the flax modules' own initializers (used for its structure by :meth:`init`)."""
        k = jax.random.split(key, 6)
        batch, units, c = 8, 5, self.compute_h_size
        feats = jnp.zeros((units, batch, NUM_UNIT_FEATURES + self.delta_dim))
        h = jnp.zeros((batch, units, c))

        def side(k_side):
            return {"readouts": self._readouts().init(k_side, h, h)["params"],
                    "mix": {"w": jnp.full((len(UPDATE_TERMS),), _MIX_INIT, jnp.float32),
                            "b": jnp.zeros((), jnp.float32)}}

        theta = {
            "top_delta": self._top_delta().init(
                k[0], jnp.zeros((batch, self.output_size)))["params"],
            "hidden": self._hidden().init(
                k[1], feats, jnp.zeros((units, NUM_WEIGHT_STATS)), jnp.zeros((units,)))["params"],
            "to_delta": nn.Dense(self.delta_dim).init(k[2], h)["params"],
            "bias_readout": nn.Dense(1).init(k[3], h)["params"],
            "forward": side(k[4]),
        }
        if self.separate_backward:
            theta["backward"] = side(k[5])
        return theta

    def hidden_states(self, theta: MetaParams, model: BaseModel, params: BaseParams,
                      x: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """Steps 1-3: the hidden states ``h_k`` ``[batch, n_k, compute_h_size]`` of every layer of
        units (input first) and the activations they came from."""
        if int(model.output_size) != int(self.output_size):
            raise ValueError(f"the rule was built for output_size={self.output_size} but the "
                             f"base model has output_size={model.output_size}")
        acts = model.forward(params, x)
        n_layers = model.num_layers
        d = self._top_delta().apply({"params": theta["top_delta"]}, acts.post[-1])
        hs: list = [None] * (n_layers + 1)
        for k in range(n_layers, -1, -1):
            post = acts.post[k]
            pre = acts.pre[k - 1] if k > 0 else post
            bias = params.b[k - 1] if k > 0 else jnp.zeros((post.shape[1],), post.dtype)
            stats = unit_weight_stats(params.w[k - 1] if k > 0 else None,
                                      params.w[k] if k < n_layers else None)
            feats = unit_features(post, pre, d)
            h = self._hidden().apply({"params": theta["hidden"]}, feats, stats, bias)
            hs[k] = h
            if k > 0:
                to_delta = nn.Dense(self.delta_dim).apply({"params": theta["to_delta"]}, h)
                delta = d * jax.nn.sigmoid(pre)[..., None] + to_delta
                d = pass_down(delta, params.bw[k - 1])
        return hs, acts

    def weight_update(self, side: MetaParams, w: jax.Array, upper_h: jax.Array,
                      lower_h: jax.Array, upper_x: jax.Array, lower_x: jax.Array) -> jax.Array:
        """Step 4: the update ``Δ`` of one weight matrix with the readouts ``side`` of θ."""
        readouts = self._readouts().apply({"params": side["readouts"]}, upper_h, lower_h)
        terms = weight_update_terms(w, upper_x, lower_x, readouts)
        return merge_update_terms(terms, side["mix"], float(self.normalize_epsilon))

    def updates(self, theta: MetaParams, model: BaseModel, params: BaseParams,
                x: jax.Array) -> BaseParams:
        """The updates ``Δ`` of one application, as a :class:`BaseParams` (``perm`` unchanged;
        ``bw`` zeros when the backward weights are not updated)."""
        hs, acts = self.hidden_states(theta, model, params, x)
        dws, dbs, dbws = [], [], []
        for i in range(model.num_layers):
            args = (hs[i + 1], hs[i], acts.post[i + 1], acts.post[i])
            dw = self.weight_update(theta["forward"], params.w[i], *args)
            raw_b = nn.Dense(1).apply({"params": theta["bias_readout"]}, hs[i + 1])[..., 0]
            if not self.update_backward:
                dbw = jnp.zeros_like(params.bw[i])
            elif self.identical_updates:
                dbw = dw
            else:
                dbw = self.weight_update(theta["backward"], params.bw[i], *args)
            dws.append(dw)
            dbs.append(bias_update(raw_b))
            dbws.append(dbw)
        return params.replace(w=tuple(dws), b=tuple(dbs), bw=tuple(dbws))

    def apply(self, theta: MetaParams, model: BaseModel, params: BaseParams, x: jax.Array,
              key: PRNGKey | None = None) -> BaseParams:
        """One application of the rule on the batch ``x``: the base model's next parameters.

        ``key`` is accepted for interface stability; the rule is deterministic. Pure, jit-able,
        vmap-able over base models and differentiable with respect to ``theta``.
        """
        up = self.updates(theta, model, params, x)
        lr = self.inner_lr

        def step(old, delta):
            return tuple(rolling_step(p, dp, lr).astype(p.dtype) for p, dp in zip(old, delta))

        bw = step(params.bw, up.bw) if self.update_backward else params.bw
        return params.replace(w=step(params.w, up.w), b=step(params.b, up.b), bw=bw)

