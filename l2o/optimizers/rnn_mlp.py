"""RNN-MLP: a per-tensor LSTM that conditions the per-parameter MLP optimizer.

The per-parameter part is :class:`~l2o.optimizers.mlp_lopt.MLPLOpt` (same features, momenta and
``step = d · exp(a·m) · b``). On top of it, every parameter *tensor* runs one step of a small LSTM
per inner step, with weights shared by all tensors. Its input summarizes the tensor:

* ``½·log`` of the mean square of the tensor's parameters, of the mean of its gradient second
  moment ``v̂``, and of the mean squares of its normalized direction features, scaled by ``0.1``
  and clipped to ``[-5, 5]`` (the first two are computed by the feature construction anyway);
* the step embedding ``tanh(t / τ)``.

Its hidden state ``h`` (``[num_tensors, units]``) conditions the MLP in two ways:

* ``h @ W_c`` (``[num_tensors, h₀]``) is added to the first hidden layer's pre-activation of every
  coordinate of that tensor;
* ``exp(h @ w_s)`` multiplies that tensor's step (a learned per-tensor step-size schedule).

Both read-outs start at zero, so an untrained RNN-MLP takes exactly the steps of the untrained
MLP optimizer with the same MLP weights.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from l2o.optimizers.mlp_lopt import (
    MLPLOpt,
    MLPLOptOptimizer,
    SlabLayout,
    apply_steps,
    init_mlp,
    step_embedding,
)
from l2o.optimizers.registry import register_optimizer
from l2o.types import MetaParams, Params, PRNGKey


@struct.dataclass
class RNNMLPState:
    """The MLP optimizer's state plus the per-tensor LSTM state ``h``, ``c``: ``[L, units]``."""

    params: Params
    iteration: jax.Array
    momenta: jax.Array
    rms: jax.Array
    lstm_h: jax.Array
    lstm_c: jax.Array


def tensor_summary(x: jax.Array, p_ms: jax.Array, v_mean: jax.Array, emb: jax.Array,
                   layout: SlabLayout) -> jax.Array:
    """The LSTM input ``[L, F + T]``: for each tensor, ``0.1 · ½·log`` (clipped to ±5) of the mean
    square of its parameters, the mean of ``v̂`` and the mean squares of the normalized direction
    features ``x[2:]``, then the step embedding ``[T]``."""
    ms = jnp.concatenate([p_ms[None], v_mean[None], layout.tensor_mean(x[2:] * x[2:])], axis=0)
    logs = jnp.clip(0.05 * jnp.log(ms + 1e-20), -5.0, 5.0).T
    return jnp.concatenate([logs, jnp.broadcast_to(emb, (logs.shape[0], emb.shape[0]))], axis=1)


def lstm_cell(w: dict, x: jax.Array, h: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One LSTM step over a batch of tensors: ``x`` ``[L, in]``, ``h``/``c`` ``[L, units]``.

    ``w["w"]``: ``[in + units, 4·units]`` (gates i, f, g, o), ``w["b"]``: ``[4·units]``.
    """
    units = h.shape[-1]
    z = jnp.concatenate([x, h], axis=-1) @ w["w"] + w["b"]
    i, f, g, o = (z[:, j * units:(j + 1) * units] for j in range(4))
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


class RNNMLPOptimizer(MLPLOptOptimizer):
    """The RNN-MLP optimizer with weights θ (see :class:`RNNMLPLOpt`)."""

    config: RNNMLPLOpt

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> RNNMLPState:
        """Zero moments (flat) and zero LSTM state for every tensor."""
        base = super().init(params, num_steps=num_steps, key=key)
        lay = SlabLayout.of(params)
        zeros = jnp.zeros((lay.num_tensors, self.config.lstm_units), jnp.float32)
        return RNNMLPState(params=base.params, iteration=base.iteration, momenta=base.momenta,
                           rms=base.rms, lstm_h=zeros, lstm_c=zeros)

    def update(self, state: RNNMLPState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> RNNMLPState:
        """One step: moments, features, the per-tensor LSTM, then the conditioned MLP."""
        lay = SlabLayout.of(state.params)
        g = lay.flatten(grads)
        momenta, rms = self._moments(state, g)
        x, p_ms, v_mean = self.features(state, g, momenta, rms)
        emb = step_embedding(state.iteration, self.config.timescales)
        rnn = self.theta["rnn"]
        summary = tensor_summary(x, p_ms, v_mean, emb, lay)
        h, c = lstm_cell(rnn["lstm"], summary, state.lstm_h, state.lstm_c)
        cond = h @ rnn["cond"]  # [L, h0]: added to each tensor's first-layer bias
        scale = jnp.exp(h @ rnn["log_scale"])  # [L]: multiplies each tensor's step
        params = apply_steps(lay, state.params, x, lambda xi, b: self.leaf_step(xi, emb, b),
                             leaf_bias=cond, leaf_scale=scale)
        return RNNMLPState(params=params,
                           iteration=state.iteration + 1,
                           momenta=momenta.astype(state.momenta.dtype),
                           rms=rms.astype(state.rms.dtype),
                           lstm_h=h.astype(state.lstm_h.dtype),
                           lstm_c=c.astype(state.lstm_c.dtype))


@register_optimizer("rnn_mlp")
@dataclasses.dataclass(frozen=True)
class RNNMLPLOpt(MLPLOpt):
    """Per-parameter MLP optimizer conditioned by a per-tensor LSTM.

    Args (besides those of :class:`~l2o.optimizers.mlp_lopt.MLPLOpt`):
      lstm_units: hidden units of the per-tensor LSTM.
      forget_bias: initial bias of its forget gate.
    """

    lstm_units: int = 32
    forget_bias: float = 1.0

    def init(self, key: PRNGKey) -> MetaParams:
        """θ = ``{"mlp", "skip", "rnn": {"lstm", "cond", "log_scale"}}``; read-outs start at 0."""
        k_mlp, k_lstm = jax.random.split(key)
        u = int(self.lstm_units)
        fan_in = self.num_features + len(self.timescales)
        w = jax.random.normal(k_lstm, (fan_in + u, 4 * u), jnp.float32) / math.sqrt(fan_in + u)
        b = jnp.zeros((4 * u,), jnp.float32).at[u:2 * u].set(self.forget_bias)
        return {
            "mlp": init_mlp(k_mlp, self.num_features, self.hidden_sizes, len(self.timescales),
                            out_scale=self.out_scale),
            "skip": self.skip_init(),
            "rnn": {"lstm": {"w": w, "b": b},
                    "cond": jnp.zeros((u, self.hidden_sizes[0]), jnp.float32),
                    "log_scale": jnp.zeros((u,), jnp.float32)},
        }

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> RNNMLPOptimizer:
        """The RNN-MLP optimizer with weights ``theta``."""
        return RNNMLPOptimizer(self, theta)

    @property
    def name(self) -> str:
        return "rnn_mlp"
