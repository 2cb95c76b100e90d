"""A per-parameter MLP learned optimizer over normalized momenta, with relative, scheduled steps.

This is l2o's general-purpose learned optimizer (preset ``general``, packaged as
``l2o.pretrained.load("general-v4")``). It is written first as one optax transformation,
:func:`scale_by_normalized_mlp`, so that it reads top to bottom; :class:`NormalizedMLP` wraps the
same function in l2o's ``LearnedOptimizer`` interface for meta-training.

For every parameter tensor ``p`` with gradient ``g`` (all per coordinate unless said otherwise)::

    m_k ← β_k m_k + (1 − β_k) g            momenta at a few decays β_k (bias-corrected: m̂_k)
    v   ← β₂ v + (1 − β₂) g²               second moment (bias-corrected: v̂)
    x   = [m̂_1, …, m̂_K, g] / (√v̂ + ε)      features: Adam-like, invariant to the gradient scale
    d   = Σ_f a_f x_f + W₂ᵀ relu(W₁ᵀ x)     direction: a learned linear blend + a bias-free MLP
    s   = max(rms(p₀), ρ)                   the tensor's scale (its RMS at initialization, ≥ ρ)
    Δp  = − η · λ(t / T) · s · d

With ``adaptive_gain`` (off in ``general-v1``–``v3``), each tensor also carries a log gain ``γ``
that follows a learned, hypergradient-like rule: the cosine between the new gradient and the
momentum it arrives to says whether the last steps were too short (aligned: the loss kept falling
the same way) or too long (opposed: they overshot)::

    c   = cos(g, m_β≈0.9 before this step)               one number per tensor, in [-1, 1]
    γ  ← clip(γ + κ · (c − c*), −R, R)                   starts at 0; κ, c* learned; R = gain_range
    Δp  = − η · λ(t / T) · e^γ · s · d

so one θ can take steps 20× (e^3) longer on a task that wants them, or shorter, without a per-task
learning rate, and never more than e^±R from its own base.

Learned (θ): the blend ``a``, the MLP ``W₁``, ``W₂``, the global step size ``η``, the floor
``ρ``, with ``adaptive_gain`` the gain rule's rate ``κ`` and target ``c*``, and the schedule
``λ`` (piecewise-linear in log space over the fraction of training done, ``t / T``).
Design choices, and why:

- **Zero in, zero out.** Every feature is a multiple of the gradient history, and the MLP has no
  biases (``relu(0) = 0``), so a zero gradient from the start gives an exactly zero update, and the
  step shrinks with the momenta (``d`` is positively homogeneous in ``x``).
- **No per-task learning rate.** The step is relative to each tensor's scale at initialization
  (its initializer encodes the fan-in and the user's choice of scale), which carries over across
  architectures and reparameterizations; the floor ``ρ`` covers tensors that start at zero
  (biases). The scale is frozen at initialization on purpose: relative to the *current* RMS
  (Adafactor, LARS), a run of same-signed steps grows the tensor, which grows the steps, and
  parameters can blow up geometrically once the gradient vanishes.
- **The horizon is an explicit argument.** ``num_steps`` (``T``) is the length of training the
  user plans; ``λ`` starts as a short warm-up and a cosine decay. With ``num_steps=None`` the
  schedule is off (``λ = 1``, the peak step size throughout).
- **Starts as a sensible optimizer.** The untrained θ is Adam's direction (``β = 0.9``) with
  relative steps and warm-up/cosine: meta-training improves on a working optimizer rather than
  on noise.

The state is an ``optax`` state (``flax.struct``): step count, momenta ``[K, *shape]``, second
moments, initial RMS (and, with ``adaptive_gain``, the log gain ``γ`` of each tensor) in the
parameters' tree, and the horizon ``T`` as an array (so
meta-training can draw a different horizon per inner problem under ``vmap``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, tensor_rms, zero_iteration
from l2o.optimizers.registry import register_optimizer
from l2o.types import MetaParams, Params, PRNGKey

#: Fractions of training ``t / T`` at which the log step-size schedule ``log λ`` is learned.
SCHEDULE_KNOTS: tuple[float, ...] = (0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 1.0)
_EPS = 1e-8  # inside the Adam-like normalization, as Adam's ε
_MIN_LAMBDA = 0.02  # the initial schedule's value at the end of training (cosine floored)


def initial_schedule(knots: tuple[float, ...] = SCHEDULE_KNOTS,
                     warmup: float = 0.05) -> jax.Array:
    """``log λ`` at the knots of the untrained optimizer: linear warm-up, then cosine decay."""
    values = []
    for s in knots:
        if s < warmup:
            lam = 0.1 + 0.9 * s / warmup
        else:
            lam = 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / (1.0 - warmup)))
        values.append(math.log(max(lam, _MIN_LAMBDA)))
    return jnp.asarray(values, jnp.float32)


@struct.dataclass
class NormalizedMLPState:
    """The optax state: step count; per leaf momenta ``[K, *shape]``, ``v`` and the RMS at
    initialization; the horizon ``T`` (≤ 0: unknown, the schedule is off); with
    ``adaptive_gain``, each leaf's log gain ``γ`` (a scalar), else ``None``."""

    count: jax.Array
    momenta: Params
    second_moment: Params
    initial_rms: Params
    horizon: jax.Array
    log_gain: Params | None = None  # per tensor, with ``adaptive_gain``


def schedule_value(theta: MetaParams, progress: jax.Array) -> jax.Array:
    """``λ(progress)``: the learned schedule, linear between knots in log space."""
    knots = jnp.asarray(SCHEDULE_KNOTS, jnp.float32)
    return jnp.exp(jnp.interp(progress, knots, theta["schedule"]))


def leaf_direction(theta: MetaParams, x: jax.Array) -> jax.Array:
    """The direction ``d`` of every coordinate from its features ``x`` (``[F, n]``): ``[n]``."""
    mlp = theta["mlp"]
    hidden = jax.nn.relu(jnp.einsum("fh,fn->hn", mlp["w1"], x))
    return jnp.einsum("f,fn->n", theta["blend"], x) + jnp.einsum("h,hn->n", mlp["w2"], hidden)


#: Scales θ's gain rate to κ, so that meta-training's perturbations of θ (PES σ ≈ 0.02) move
#: γ by about 1e-3 per step rather than 1e-2.
GAIN_RATE_SCALE = 0.1


def gain_alignment(g: jax.Array, m: jax.Array) -> jax.Array:
    """``cos(g, m)`` of two flat vectors; 0 where either is zero."""
    dot = jnp.sum(g * m)
    sq = jnp.sum(g * g) * jnp.sum(m * m)
    ok = sq > 0  # the inner where keeps the derivative of rsqrt finite at zero too
    return jnp.where(ok, dot * jax.lax.rsqrt(jnp.where(ok, sq, 1.0)), 0.0)


def next_log_gain(theta: MetaParams, cfg: NormalizedMLP, log_gain: jax.Array,
                  g: jax.Array, m_prev: jax.Array) -> jax.Array:
    """``γ`` after one step: ``clip(γ + κ · (cos(g, m_prev) − c*), −R, R)``."""
    kappa = GAIN_RATE_SCALE * theta["gain"]["rate"]
    change = kappa * (gain_alignment(g, m_prev) - theta["gain"]["target"])
    return jnp.clip(log_gain + change, -cfg.gain_range, cfg.gain_range).astype(log_gain.dtype)


def _leaf_update(theta: MetaParams, cfg: NormalizedMLP, rms0: jax.Array, g: jax.Array,
                 m: jax.Array, v: jax.Array, count: jax.Array, multiplier: jax.Array,
                 log_gain: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(update, momenta, v, log gain)`` of one parameter tensor."""
    g32 = g.astype(jnp.float32).reshape(-1)
    betas = jnp.asarray(cfg.decays, jnp.float32)[:, None]
    m = m.reshape(len(cfg.decays), -1)
    if log_gain is not None:
        log_gain = next_log_gain(theta, cfg, log_gain, g32, m[cfg.gain_momentum])
        multiplier = multiplier * jnp.exp(log_gain)
    m = betas * m + (1.0 - betas) * g32[None]
    v = cfg.rms_decay * v.reshape(-1) + (1.0 - cfg.rms_decay) * g32 * g32
    t = (count + 1).astype(jnp.float32)
    m_hat = m / (1.0 - betas ** t)
    v_hat = v / (1.0 - jnp.float32(cfg.rms_decay) ** t)
    inv = 1.0 / (jnp.sqrt(v_hat) + _EPS)
    x = jnp.concatenate([m_hat * inv[None], (g32 * inv)[None]], axis=0)
    scale = jnp.maximum(rms0, jnp.exp(theta["log_floor"]))
    step = multiplier * scale * leaf_direction(theta, x)
    return ((-step).reshape(g.shape).astype(g.dtype), m.reshape((-1,) + g.shape),
            v.reshape(g.shape), log_gain)


def scale_by_normalized_mlp(theta: MetaParams, num_steps: int | None = None,
                            config: NormalizedMLP | None = None
                            ) -> optax.GradientTransformationExtraArgs:
    """The learned optimizer with weights ``theta`` as an optax transformation.

    ``updates`` are the steps to add to the parameters (``optax.apply_updates``); steps are
    relative to each tensor's RMS in the ``params`` given to ``init``. ``num_steps`` is the planned
    length of training, which the learned schedule is a function of; ``None`` turns the schedule
    off. Works on any pytree of float arrays and under ``jit``.
    """
    cfg = config or NormalizedMLP()
    horizon = -1.0 if num_steps is None else float(num_steps)
    if cfg.adaptive_gain and "gain" not in theta:
        raise ValueError("adaptive_gain is on but θ has no 'gain' entry (a θ trained without "
                         "it, such as general-v1..v3): use it with adaptive_gain off")

    def init_fn(params: Params) -> NormalizedMLPState:
        k = len(cfg.decays)
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
        return NormalizedMLPState(
            count=jnp.zeros((), jnp.int32),
            momenta=jax.tree_util.tree_map(lambda p: jnp.zeros((k,) + jnp.shape(p), jnp.float32),
                                           params),
            second_moment=jax.tree_util.tree_map(zeros, params),
            initial_rms=jax.tree_util.tree_map(tensor_rms, params),
            horizon=jnp.asarray(horizon, jnp.float32),
            log_gain=(jax.tree_util.tree_map(lambda p: jnp.zeros((), jnp.float32), params)
                      if cfg.adaptive_gain else None))

    def update_fn(updates: Params, state: NormalizedMLPState, params: Params | None = None,
                  **extra: Any) -> tuple[Params, NormalizedMLPState]:
        progress = jnp.clip(state.count.astype(jnp.float32) / jnp.maximum(state.horizon, 1.0),
                            0.0, 1.0)
        lam = jnp.where(state.horizon > 0, schedule_value(theta, progress), 1.0)
        multiplier = jnp.exp(theta["log_lr"]) * lam
        treedef = jax.tree_util.tree_structure(updates)
        gains = (treedef.flatten_up_to(state.log_gain) if state.log_gain is not None
                 else [None] * treedef.num_leaves)
        flat = [_leaf_update(theta, cfg, r, g, m, v, state.count, multiplier, lg)
                for r, g, m, v, lg in zip(treedef.flatten_up_to(state.initial_rms),
                                          treedef.flatten_up_to(updates),
                                          treedef.flatten_up_to(state.momenta),
                                          treedef.flatten_up_to(state.second_moment), gains)]
        out = jax.tree_util.tree_unflatten(treedef, [f[0] for f in flat])
        new_state = NormalizedMLPState(
            count=state.count + 1,
            momenta=jax.tree_util.tree_unflatten(treedef, [f[1] for f in flat]),
            second_moment=jax.tree_util.tree_unflatten(treedef, [f[2] for f in flat]),
            initial_rms=state.initial_rms, horizon=state.horizon,
            log_gain=(None if state.log_gain is None
                      else jax.tree_util.tree_unflatten(treedef, [f[3] for f in flat])))
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@struct.dataclass
class NormalizedMLPOptState:
    """l2o's optimizer state: parameters, iteration and the optax state."""

    params: Params
    iteration: jax.Array
    inner: NormalizedMLPState


class NormalizedMLPOptimizer(Optimizer):
    """:func:`scale_by_normalized_mlp` in l2o's ``Optimizer`` interface (state holds params)."""

    def __init__(self, config: NormalizedMLP, theta: MetaParams):
        self.config = config
        self.theta = theta
        self.tx = scale_by_normalized_mlp(theta, None, config)

    def init(self, params: Params, *, num_steps: int | jax.Array | None = None,
             key: PRNGKey | None = None) -> NormalizedMLPOptState:
        """Fresh state; ``num_steps`` (possibly traced) is the horizon the schedule spans."""
        inner = self.tx.init(params)
        if num_steps is not None:
            inner = inner.replace(horizon=jnp.asarray(num_steps, jnp.float32))
        return NormalizedMLPOptState(params=params, iteration=zero_iteration(), inner=inner)

    def update(self, state: NormalizedMLPOptState, grads: Params, *,
               loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> NormalizedMLPOptState:
        """One step of the learned optimizer."""
        updates, inner = self.tx.update(grads, state.inner, state.params)
        return NormalizedMLPOptState(params=optax.apply_updates(state.params, updates),
                                     iteration=state.iteration + 1, inner=inner)

    @property
    def name(self) -> str:
        return "normalized_mlp"


@register_optimizer("normalized_mlp")
@dataclasses.dataclass(frozen=True)
class NormalizedMLP(LearnedOptimizer):
    """The normalized-momentum MLP learned optimizer (see the module docstring).

    Args:
      hidden_size: units of the MLP's one hidden layer.
      decays: momentum decays ``β_k``.
      rms_decay: ``β₂`` of the second moment.
      learning_rate: initial ``η`` (relative to the tensor's scale).
      floor: initial ``ρ``, the smallest tensor scale.
      mlp_scale: initial scale of the MLP's read-out (small: the untrained direction is the blend).
      adaptive_gain: give each tensor a log gain ``γ`` that follows the learned alignment rule
        (module docstring). Off in ``general-v1``–``v3``.
      gain_range: ``R``, the largest ``|γ|``.
      gain_rate: initial ``κ`` (θ stores ``κ / GAIN_RATE_SCALE``).
    """

    hidden_size: int = 16
    decays: tuple[float, ...] = (0.5, 0.9, 0.99)
    rms_decay: float = 0.999
    learning_rate: float = 0.1
    floor: float = 0.1
    mlp_scale: float = 0.01
    adaptive_gain: bool = False
    gain_range: float = 3.0
    gain_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "decays", tuple(float(d) for d in self.decays))
        if not self.decays or not all(0.0 <= d < 1.0 for d in self.decays):
            raise ValueError(f"decays must be in [0, 1), got {self.decays}")
        if not 0.0 < self.rms_decay < 1.0:
            raise ValueError(f"rms_decay must be in (0, 1), got {self.rms_decay}")
        for name in ("learning_rate", "floor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be positive, got {self.hidden_size}")
        if not self.gain_range >= 0:
            raise ValueError(f"gain_range must be >= 0, got {self.gain_range}")

    @property
    def gain_momentum(self) -> int:
        """Index of the momentum the gain rule compares the gradient with (β nearest 0.9)."""
        return min(range(len(self.decays)), key=lambda i: abs(self.decays[i] - 0.9))

    @property
    def num_features(self) -> int:
        """``F``: one feature per momentum, plus the gradient."""
        return len(self.decays) + 1

    def init(self, key: PRNGKey) -> MetaParams:
        """θ of the untrained optimizer: Adam's direction (the β nearest 0.9), warm-up/cosine."""
        f, h = self.num_features, self.hidden_size
        k1, k2 = jax.random.split(key)
        theta = {
            "blend": jnp.zeros((f,), jnp.float32).at[self.gain_momentum].set(1.0),
            "mlp": {"w1": jax.random.normal(k1, (f, h), jnp.float32) / math.sqrt(f),
                    "w2": self.mlp_scale * jax.random.normal(k2, (h,), jnp.float32)
                    / math.sqrt(h)},
            "log_lr": jnp.asarray(math.log(self.learning_rate), jnp.float32),
            "log_floor": jnp.asarray(math.log(self.floor), jnp.float32),
            "schedule": initial_schedule(),
        }
        if self.adaptive_gain:
            theta["gain"] = {"rate": jnp.asarray(self.gain_rate / GAIN_RATE_SCALE, jnp.float32),
                             "target": jnp.zeros((), jnp.float32)}
        return theta

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> NormalizedMLPOptimizer:
        """The optimizer with weights ``theta``."""
        return NormalizedMLPOptimizer(self, theta)

    def as_optax(self, theta: MetaParams,
                 num_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
        """The optimizer with weights ``theta`` as an optax transformation."""
        return scale_by_normalized_mlp(theta, num_steps, self)

    @property
    def name(self) -> str:
        return "normalized_mlp"
