"""The hierarchical RNN optimizer of "Learned Optimizers that Scale and Generalize"
(Wichrowska et al. 2017), re-expressed in JAX (our own code).

Three levels of GRU cells, each with weights shared across its level:

- **per-parameter** (``param_hidden`` = 10 units): one hidden state per coordinate, stored as a
  flat units-major slab ``[10, P]``;
- **per-tensor** (``tensor_hidden`` = 20): one state per parameter tensor (leaf); its input is the
  mean over the tensor's coordinates of the new per-parameter states, concatenated with the
  global state;
- **global** (``global_hidden`` = 20): one state; its input is the mean of the tensor states.

Information flows up within a step and back down at the next step: the tensor state, through a
learned projection, is added to the gate pre-activations of its coordinates' GRU (a per-tensor
bias), and the global state is part of every tensor GRU's input.

Inputs of one coordinate (``2K + 1`` rows of the input slab for ``K`` timescales ``β_k``, by
default 0.5, 0.9, 0.99, 0.999)::

    m_k ← β_k m_k + (1 − β_k) g          v_k ← β_k v_k + (1 − β_k) g²     (bias-corrected: m̂, v̂)
    n_k = m̂_k / √(v̂_k + ε)                                  momentum at timescale k, scale-free
    r_k = ½ log(v̂_k + ε) − mean_j ½ log(v̂_j + ε)            relative log gradient magnitude
    ℓ   = log η − log η₀                                     the coordinate's log learning rate

Outputs of one coordinate, linear read-outs of its new hidden state ``h``::

    w = W_d h + b_d  (K numbers)     direction  d = Σ_k w_k n_k    (a learned mixture of momenta)
    log η ← clip(log η + s · (w_η · h + b_η))                      (s = ``lr_change_scale``)
    params ← params − η · d

``b_d`` starts as the indicator of the 0.9 timescale and ``W_d``, ``w_η`` start small, so the
untrained optimizer is close to RMSProp-normalized momentum with learning rate η₀ = 1e-3.
Attention (the paper's optional look-ahead gradient evaluation) is not implemented.

Cost. The per-parameter GRU is two ``[30, ·] @ [·, P]`` matmuls (``2K + 1 = 9`` inputs and 10
recurrent units) plus elementwise work over ``[K, P]`` moment slabs; the per-tensor and global
cells act on ``L`` columns and one column. L2L's coordinatewise LSTM, by comparison, runs two
20-unit LSTM layers (``[80, 22]`` and ``[80, 40]`` matmuls) per coordinate. Measured with
``benchmarks/hrnn_step_cost.py`` (2 shared CPU cores): a whole inner step costs 0.2–0.4× the
LSTM's and 2.7–12× Adam's on the 784-20-10 / 784-128-128-10 MLPs. Sums over the ``K`` rows are
written as explicit adds (:func:`_row_sum`): a reduce over the short leading axis measured ~2×
slower. Optimizer state: ``2K + 1 + 10`` floats per parameter.

``hierarchy=False`` removes the per-tensor and global cells: the coordinatewise RNN
(:mod:`l2o.optimizers.coordinatewise_rnn`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, zero_iteration
from l2o.optimizers.mlp_lopt import SlabLayout
from l2o.optimizers.registry import register_optimizer
from l2o.types import MetaParams, Params, PRNGKey

_EPS = 1e-12  # inside the square root / log of the second moments


@struct.dataclass
class HRNNState:
    """Parameters, iteration and the optimizer's per-coordinate and per-tensor state.

    ``momenta`` and ``second`` are ``[K, P]`` (one row per timescale), ``log_lr`` is ``[P]``,
    ``h`` the per-parameter GRU state ``[param_hidden, P]``; ``tensor_h`` is
    ``[tensor_hidden, L]`` and ``global_h`` ``[global_hidden]`` (both of size 0 without the
    hierarchy).
    """

    params: Params
    iteration: jax.Array
    momenta: jax.Array
    second: jax.Array
    log_lr: jax.Array
    h: jax.Array
    tensor_h: jax.Array
    global_h: jax.Array


def init_gru(key: PRNGKey, num_inputs: int, units: int) -> dict:
    """Weights of a GRU cell: ``wx`` ``[in, 3·units]``, ``wh`` ``[units, 3·units]``, ``b``.

    Gate columns are ordered update ``z``, reset ``r``, candidate ``n``.
    """
    kx, kh = jax.random.split(key)
    return {
        "wx": jax.random.normal(kx, (num_inputs, 3 * units), jnp.float32)
        / math.sqrt(max(num_inputs, 1)),
        "wh": jax.random.normal(kh, (units, 3 * units), jnp.float32) / math.sqrt(units),
        "b": jnp.zeros((3 * units,), jnp.float32),
    }


def gru_cell(w: dict, x: jax.Array, h: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """One GRU step on units-major columns: ``x`` ``[in, N]``, ``h`` ``[units, N]`` → new ``h``.

    ``bias`` (``[3·units, N]`` or broadcastable) is added to the input pre-activations (used to
    feed the level above down into this one).
    """
    u = h.shape[0]
    gx = w["wx"].T @ x + w["b"][:, None]
    if bias is not None:
        gx = gx + bias
    gh = w["wh"].T @ h
    z = jax.nn.sigmoid(gx[:u] + gh[:u])
    r = jax.nn.sigmoid(gx[u:2 * u] + gh[u:2 * u])
    n = jnp.tanh(gx[2 * u:] + r * gh[2 * u:])
    return (1.0 - z) * n + z * h


def _row_sum(x: jax.Array) -> jax.Array:
    """Sum over the few rows of ``x`` ``[K, P]`` as explicit adds (fuses better than a reduce)."""
    out = x[0]
    for k in range(1, x.shape[0]):
        out = out + x[k]
    return out


class HRNNOptimizer(Optimizer):
    """The hierarchical RNN optimizer with weights θ (see :class:`HierarchicalRNN`)."""

    def __init__(self, config: HierarchicalRNN, theta: MetaParams):
        self.config = config
        self.theta = theta

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> HRNNState:
        """Zero moments and hidden states; every log learning rate at ``log(init_lr)``."""
        cfg = self.config
        lay = SlabLayout.of(params)
        k, n = len(cfg.decays), lay.total
        th = cfg.tensor_hidden if cfg.hierarchy else 0
        gh = cfg.global_hidden if cfg.hierarchy else 0
        return HRNNState(
            params=params, iteration=zero_iteration(),
            momenta=jnp.zeros((k, n), jnp.float32), second=jnp.zeros((k, n), jnp.float32),
            log_lr=jnp.full((n,), math.log(cfg.init_lr), jnp.float32),
            h=jnp.zeros((cfg.param_hidden, n), jnp.float32),
            tensor_h=jnp.zeros((th, lay.num_tensors), jnp.float32),
            global_h=jnp.zeros((gh,), jnp.float32))

    def update(self, state: HRNNState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> HRNNState:
        """One step of all three levels (see the module docstring)."""
        cfg, th = self.config, self.theta
        lay = SlabLayout.of(state.params)
        g = lay.flatten(grads)
        t = (state.iteration + 1).astype(jnp.float32)
        beta = jnp.asarray(cfg.decays, jnp.float32)[:, None]
        momenta = beta * state.momenta + (1.0 - beta) * g[None]
        second = beta * state.second + (1.0 - beta) * (g * g)[None]
        corr = 1.0 / (1.0 - beta ** t)
        v_hat = second * corr + _EPS
        norm_m = momenta * corr * jax.lax.rsqrt(v_hat)
        log_rms = 0.5 * jnp.log(v_hat)
        rel = log_rms - _row_sum(log_rms)[None] / len(cfg.decays)
        lr_in = state.log_lr - math.log(cfg.init_lr)
        x = jnp.concatenate([norm_m, rel, lr_in[None]], axis=0)  # [2K + 1, P]

        bias = None
        if cfg.hierarchy:
            bias = lay.expand(th["down"].T @ state.tensor_h)  # [3·param_hidden, P]
        h = gru_cell(th["param"], x, state.h, bias)

        mix = th["dir_w"].T @ h + th["dir_b"][:, None]  # [K, P]
        direction = _row_sum(mix * norm_m)
        d_lr = th["lr_w"] @ h + th["lr_b"]
        log_lr = jnp.clip(state.log_lr + cfg.lr_change_scale * d_lr,
                          math.log(cfg.min_lr), math.log(cfg.max_lr))
        params = lay.apply_step(state.params, jnp.exp(log_lr) * direction)

        tensor_h, global_h = state.tensor_h, state.global_h
        if cfg.hierarchy:
            h_mean = lay.tensor_mean(h)  # [param_hidden, L]
            glob = jnp.broadcast_to(global_h[:, None], (global_h.shape[0], lay.num_tensors))
            tensor_h = gru_cell(th["tensor"], jnp.concatenate([h_mean, glob], axis=0), tensor_h)
            g_in = jnp.mean(tensor_h, axis=1, keepdims=True)
            global_h = gru_cell(th["global"], g_in, global_h[:, None])[:, 0]
        return HRNNState(params=params, iteration=state.iteration + 1, momenta=momenta,
                         second=second, log_lr=log_lr, h=h.astype(state.h.dtype),
                         tensor_h=tensor_h.astype(state.tensor_h.dtype),
                         global_h=global_h.astype(state.global_h.dtype))

    @property
    def name(self) -> str:
        return self.config.name


@register_optimizer("hierarchical_rnn")
@dataclasses.dataclass(frozen=True)
class HierarchicalRNN(LearnedOptimizer):
    """Wichrowska et al.'s hierarchical RNN optimizer (θ = the weights of its GRU cells).

    Args:
      param_hidden, tensor_hidden, global_hidden: GRU sizes of the three levels (10, 20, 20).
      decays: momentum / second-moment timescales ``β_k``.
      init_lr: initial per-coordinate learning rate η₀.
      lr_change_scale: multiplies the network's log-learning-rate change each step.
      min_lr, max_lr: bounds the learning rates are clipped to.
      hierarchy: keep the per-tensor and global cells (False: the coordinatewise RNN).
      out_scale: scale of the initial read-out weights (small: start near the default step).
    """

    param_hidden: int = 10
    tensor_hidden: int = 20
    global_hidden: int = 20
    decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    init_lr: float = 1e-3
    lr_change_scale: float = 0.01
    min_lr: float = 1e-7
    max_lr: float = 1.0
    hierarchy: bool = True
    out_scale: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "decays", tuple(float(d) for d in self.decays))
        if not self.decays or any(not 0.0 <= d < 1.0 for d in self.decays):
            raise ValueError(f"decays must be in [0, 1), got {self.decays}")
        if not 0 < self.min_lr <= self.init_lr <= self.max_lr:
            raise ValueError("need 0 < min_lr <= init_lr <= max_lr")

    @property
    def num_inputs(self) -> int:
        """Rows of the per-coordinate input slab: ``2K + 1``."""
        return 2 * len(self.decays) + 1

    def init(self, key: PRNGKey) -> MetaParams:
        """θ: the GRU cells, the read-outs and (with the hierarchy) the upper levels."""
        ks = jax.random.split(key, 7)
        k, u = len(self.decays), self.param_hidden
        default = min(range(k), key=lambda i: abs(self.decays[i] - 0.9))
        theta = {
            "param": init_gru(ks[0], self.num_inputs, u),
            "dir_w": self.out_scale * jax.random.normal(ks[1], (u, k), jnp.float32),
            "dir_b": jnp.zeros((k,), jnp.float32).at[default].set(1.0),
            "lr_w": self.out_scale * jax.random.normal(ks[2], (u,), jnp.float32),
            "lr_b": jnp.zeros((), jnp.float32),
        }
        if self.hierarchy:
            t, gl = self.tensor_hidden, self.global_hidden
            theta["tensor"] = init_gru(ks[3], u + gl, t)
            theta["global"] = init_gru(ks[4], t, gl)
            theta["down"] = jax.random.normal(ks[5], (t, 3 * u), jnp.float32) / math.sqrt(t)
        return theta

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> HRNNOptimizer:
        """The optimizer with weights ``theta``."""
        return HRNNOptimizer(self, theta)

    @property
    def name(self) -> str:
        return "hierarchical_rnn" if self.hierarchy else "coordinatewise_rnn"
