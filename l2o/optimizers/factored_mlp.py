"""A factored (Adafactor-style) per-parameter MLP learned optimizer, for large models.

The same recipe as :mod:`l2o.optimizers.mlp_lopt` (features → shared MLP → direction and
log-magnitude, ``step = d · exp(a·m) · b``) with less state and less compute per parameter:

* the second moment of the gradient is *factored* for matrices (Shazeer & Stern 2018): a tensor
  of shape ``[..., n]`` with at least two dimensions of size > 1 is seen as ``rows × n`` and keeps
  EMAs of the row means ``r`` and column means ``c`` of ``g²``; its second moment is rebuilt as
  ``v ≈ r cᵀ / mean(r)``. Vectors and scalars keep a full EMA;
* fewer momenta (two decays by default, 0.9 and 0.99);
* a much smaller MLP (one hidden layer of 16 units by default).

Features per coordinate (``F = K + 3``), as in the MLP optimizer but with the factored ``v̂``:
``p / rms_T(p)``, ``√v̂ / rms_T(√v̂)``, ``m̂_k / √(v̂ + ε)`` and ``g / √(v̂ + ε)``; the step
count enters the first layer's bias through ``tanh(t / τ)``. A learned skip from the features to
the direction starts at the ``m̂ / √v̂`` feature of the 0.9 momentum (Adam-like first steps).

State: the momenta as a flat ``[K, P]`` slab (``4·K`` bytes per parameter, 8 by default) plus
``rows + cols`` floats per factored tensor (a negligible fraction for large matrices).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, zero_iteration
from l2o.optimizers.mlp_lopt import (
    DEFAULT_TIMESCALES,
    PerParameterMLPSettings,
    SlabLayout,
    apply_steps,
    init_mlp,
    mlp_step,
    scale_free_features,
    step_embedding,
)
from l2o.optimizers.registry import register_optimizer
from l2o.types import MetaParams, Params, PRNGKey


def factored_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(rows, cols)`` a tensor is factored as, or None when it keeps a full second moment.

    Tensors with at least two dimensions of size > 1 are factored as ``prod(shape[:-1]) ×
    shape[-1]`` (when the last dimension is 1, the last dimension > 1 is used as the columns).
    """
    dims = [i for i, s in enumerate(shape) if s > 1]
    if len(dims) < 2:
        return None
    cols = shape[dims[-1]]
    return int(math.prod(shape)) // cols, int(cols)


@struct.dataclass
class FactoredMLPState:
    """Parameters, iteration, momenta ``[K, P]`` and per-tensor second-moment statistics.

    ``second[i]`` is ``(row_means [rows], col_means [cols])`` for a factored tensor ``i`` and
    ``(full [size],)`` otherwise.
    """

    params: Params
    iteration: jax.Array
    momenta: jax.Array
    second: tuple[tuple[jax.Array, ...], ...]


class FactoredMLPOptimizer(Optimizer):
    """The factored MLP optimizer with weights θ (see :class:`FactoredMLPLOpt`)."""

    def __init__(self, config: FactoredMLPLOpt, theta: MetaParams):
        self.config = config
        self.theta = theta

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> FactoredMLPState:
        """Zero momenta (flat) and zero second-moment statistics per tensor."""
        lay = SlabLayout.of(params)
        second = []
        for shape, size in zip(lay.shapes, lay.sizes):
            f = factored_shape(shape)
            if f is None:
                second.append((jnp.zeros((size,), jnp.float32),))
            else:
                second.append((jnp.zeros((f[0],), jnp.float32), jnp.zeros((f[1],), jnp.float32)))
        return FactoredMLPState(
            params=params, iteration=zero_iteration(),
            momenta=jnp.zeros((len(self.config.decays), lay.total), jnp.float32),
            second=tuple(second))

    def _second_moments(self, lay: SlabLayout, grads: Params, second, t: jax.Array):
        """New statistics and the bias-corrected second moment ``v̂`` as a flat ``[P]`` slab."""
        b2 = jnp.float32(self.config.rms_decay)
        corr = 1.0 - b2 ** t
        new, parts = [], []
        for g, stats, shape in zip(lay.treedef.flatten_up_to(grads), second, lay.shapes):
            g2 = jnp.square(g.astype(jnp.float32))
            f = factored_shape(shape)
            if f is None:
                (full,) = stats
                full = b2 * full + (1.0 - b2) * jnp.ravel(g2)
                new.append((full,))
                parts.append(full / corr)
            else:
                g2 = g2.reshape(f)
                row, col = stats
                row = b2 * row + (1.0 - b2) * jnp.mean(g2, axis=1)
                col = b2 * col + (1.0 - b2) * jnp.mean(g2, axis=0)
                new.append((row, col))
                v = row[:, None] * col[None, :] / jnp.maximum(jnp.mean(row), 1e-20)
                parts.append(jnp.ravel(v) / corr)
        v_hat = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        return tuple(new), v_hat

    def update(self, state: FactoredMLPState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> FactoredMLPState:
        """One step: update the statistics, build the features, run the MLP, step the params."""
        cfg = self.config
        lay = SlabLayout.of(state.params)
        g = lay.flatten(grads)
        t = (state.iteration + 1).astype(jnp.float32)
        decays = jnp.asarray(cfg.decays, jnp.float32)[:, None]
        momenta = decays * state.momenta + (1.0 - decays) * g[None]
        second, v_hat = self._second_moments(lay, grads, state.second, t)
        x, _, _ = scale_free_features(lay, state.params, g, momenta, v_hat, t, cfg.decays)
        emb = step_embedding(state.iteration, cfg.timescales)

        def leaf_step(xi: jax.Array, bias: jax.Array | None) -> jax.Array:
            return mlp_step(self.theta["mlp"], self.theta["skip"], xi, emb, cfg.exp_mult,
                            cfg.step_mult)

        second = jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), second, state.second)
        return FactoredMLPState(params=apply_steps(lay, state.params, x, leaf_step),
                                iteration=state.iteration + 1,
                                momenta=momenta.astype(state.momenta.dtype), second=second)

    @property
    def name(self) -> str:
        return self.config.name


@register_optimizer("factored_mlp")
@dataclasses.dataclass(frozen=True)
class FactoredMLPLOpt(PerParameterMLPSettings, LearnedOptimizer):
    """Adafactor-style per-parameter MLP learned optimizer (θ = MLP weights and skip).

    Args:
      hidden_sizes: units of the hidden ReLU layers (one layer of 16 by default).
      decays: momentum decays.
      rms_decay: decay of the (factored) EMA of ``g²``.
      step_mult, exp_mult: ``b`` and ``a`` of ``step = d · exp(a·m) · b``.
      timescales: of the step-count embedding.
      out_scale: initial scale of the MLP read-out relative to the usual scale.
    """

    hidden_sizes: tuple[int, ...] = (16,)
    decays: tuple[float, ...] = (0.9, 0.99)
    rms_decay: float = 0.999
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    timescales: tuple[float, ...] = DEFAULT_TIMESCALES
    out_scale: float = 1e-2

    def init(self, key: PRNGKey) -> MetaParams:
        """θ = ``{"mlp": weights, "skip": [F]}`` (skip at the 0.9 momentum's ``m̂ / √v̂``)."""
        k = min(range(len(self.decays)), key=lambda i: abs(self.decays[i] - 0.9))
        skip = jnp.zeros((self.num_features,), jnp.float32).at[2 + k].set(1.0)
        return {"mlp": init_mlp(key, self.num_features, self.hidden_sizes, len(self.timescales),
                                out_scale=self.out_scale),
                "skip": skip}

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> FactoredMLPOptimizer:
        """The factored MLP optimizer with weights ``theta``."""
        return FactoredMLPOptimizer(self, theta)

    @property
    def name(self) -> str:
        return "factored_mlp"
