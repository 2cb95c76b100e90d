"""The fixed-λ and learned-λ optimizers: a blend of L2L's LSTM step and Adam's step.

Definition (the one l2o uses; the source README names these optimizers without defining them).
For every parameter coordinate ``i`` at step ``t``::

    Δ_lstm[i]  = output_scale · lstm(log_and_sign(g[i]), h[i])      (L2L's learned step)
    Δ_adam[i]  = −lr · m̂[i] / (√v̂[i] + ε)                          (Adam's *update*, as optax.adam)
    params[i] ← params[i] + λ[i] · Δ_lstm[i] + (1 − λ[i]) · Δ_adam[i]

``m̂`` and ``v̂`` are Adam's bias-corrected moment estimates with Adam's own hyperparameters
(``learning_rate``, ``b1``, ``b2``, ``eps``; fixed, not meta-learned), computed exactly as
``optax.adam`` does: λ = 0 takes exactly ``optax.adam``'s steps, λ = 1 exactly the LSTM
optimizer's steps (:class:`~l2o.optimizers.lstm.LSTMLearnedOptimizer` with the same θ).

* **fixed λ** (:class:`FixedLambdaLOpt`, registry ``fixed_lambda``): λ is one constructor
  hyperparameter ``lam`` shared by all coordinates; θ is the LSTM's θ.
* **learned λ** (:class:`LearnedLambdaLOpt`, registry ``learned_lambda``): λ is produced per
  coordinate by the same LSTM network through a second linear read-out head on its last layer's
  hidden state: ``λ[i] = sigmoid(w_λ · h_last[i] + b_λ)``. The head is stored in each net of θ as
  ``θ[net]["lambda"] = {"w": [units], "b": scalar}``, next to the step head ``θ[net]["out"]``; it
  starts at ``w_λ = 0``, ``b_λ = logit(initial_lambda)``, so every coordinate starts at
  ``λ = initial_lambda``.

This module wraps the LSTM optimizer rather than changing it: it reuses its routing
(``net_assignments``) and its per-net step function, and adds Adam's moments to the state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, zero_iteration
from l2o.optimizers.lstm import (
    LSTMLearnedOptimizer,
    LSTMNetState,
    LSTMOptimizer,
    Selector,
    _lstm_step,
)
from l2o.optimizers.registry import register_optimizer
from l2o.types import MetaParams, Params, PRNGKey


@struct.dataclass
class LambdaBlendState:
    """Parameters, step counter, the LSTM state of each net and optax's Adam state."""

    params: Params
    iteration: jax.Array
    rnn: dict[str, LSTMNetState]
    adam: optax.OptState


class LambdaBlendOptimizer(Optimizer):
    """The optimizer built by :meth:`LambdaBlendLOpt.opt_fn` (see the module docstring)."""

    def __init__(self, config: LambdaBlendLOpt, theta: MetaParams):
        self.config = config
        self.theta = theta
        self.lstm = LSTMOptimizer(config.lstm_config, theta)
        self.adam_tx = optax.adam(config.learning_rate, b1=config.b1, b2=config.b2,
                                  eps=config.eps)

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> LambdaBlendState:
        """Zero LSTM state for every coordinate and a fresh Adam state."""
        lstm_state = self.lstm.init(params, num_steps=num_steps, key=key)
        return LambdaBlendState(params=params, iteration=zero_iteration(), rnn=lstm_state.rnn,
                                adam=self.adam_tx.init(params))

    def _lambda(self, net: dict, h_last: jax.Array) -> jax.Array | float:
        """λ for the coordinates of one net: the fixed value, or the λ head on ``h_last``."""
        if not self.config.learned:
            return self.config.lam
        head = net["lambda"]
        return jax.nn.sigmoid(jnp.sum(h_last * head["w"][:, None], axis=0) + head["b"])

    def blend(self, state: LambdaBlendState, grads: Params) -> tuple[Params, Params, Any,
                                                                     dict[str, LSTMNetState]]:
        """``(blended step, λ per coordinate, new Adam state, new LSTM states)``.

        The steps and λ have the tree structure of the parameters (λ is a Python float per leaf
        for fixed λ).
        """
        cfg = self.config.lstm_config
        lay = self.lstm.layout(state.params)
        g_leaves = lay.treedef.flatten_up_to(grads)
        adam_updates, adam_state = self.adam_tx.update(grads, state.adam, state.params)
        a_leaves = lay.treedef.flatten_up_to(adam_updates)
        steps: list[Any] = [None] * len(g_leaves)
        lams: list[Any] = [None] * len(g_leaves)
        rnn = {}
        for name, idx in lay.net_leaves.items():
            g = LSTMOptimizer._flat(g_leaves, idx)
            learned, rnn[name] = _lstm_step(self.theta[name], state.rnn[name], g, cfg)
            lam = self._lambda(self.theta[name], rnn[name].h[-1])
            off = 0
            for i in idx:
                n = int(math.prod(jnp.shape(g_leaves[i])))
                shape = jnp.shape(g_leaves[i])
                l_i = learned[off:off + n].reshape(shape)
                lam_i = lam if isinstance(lam, float) else lam[off:off + n].reshape(shape)
                steps[i] = lam_i * l_i + (1.0 - lam_i) * a_leaves[i].astype(l_i.dtype)
                lams[i] = lam_i
                off += n
        unflat = lambda xs: jax.tree_util.tree_unflatten(lay.treedef, xs)
        return unflat(steps), unflat(lams), adam_state, rnn

    def update(self, state: LambdaBlendState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> LambdaBlendState:
        """``params + λ·Δ_lstm + (1 − λ)·Δ_adam`` per coordinate."""
        steps, _, adam_state, rnn = self.blend(state, grads)
        params = jax.tree_util.tree_map(lambda p, s: p + s.astype(p.dtype), state.params, steps)
        return LambdaBlendState(params=params, iteration=state.iteration + 1, rnn=rnn,
                                adam=adam_state)

    @property
    def name(self) -> str:
        return self.config.name


@dataclasses.dataclass(frozen=True)
class LambdaBlendLOpt(LearnedOptimizer):
    """Common settings of the λ optimizers (use :class:`FixedLambdaLOpt` or
    :class:`LearnedLambdaLOpt`).

    Args:
      layers, preprocess_k, output_scale, net_assignments, forget_bias: the LSTM's settings
        (see :class:`~l2o.optimizers.lstm.LSTMLearnedOptimizer`).
      learning_rate, b1, b2, eps: Adam's hyperparameters for ``Δ_adam``.
    """

    layers: tuple[int, ...] = (20, 20)
    preprocess_k: float = 5.0
    output_scale: float = 0.01
    net_assignments: tuple[tuple[str, Selector], ...] | None = None
    forget_bias: float = 1.0
    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    #: whether λ comes from the network (class constant of the subclasses)
    learned = False

    @property
    def lstm_config(self) -> LSTMLearnedOptimizer:
        """The LSTM optimizer whose step is blended (same θ layout for its heads)."""
        return LSTMLearnedOptimizer(layers=self.layers, preprocess_k=self.preprocess_k,
                                    output_scale=self.output_scale,
                                    net_assignments=self.net_assignments,
                                    forget_bias=self.forget_bias)

    def init(self, key: PRNGKey) -> MetaParams:
        """The LSTM's θ (``{net: weights}``)."""
        return self.lstm_config.init(key)

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> LambdaBlendOptimizer:
        """The blended optimizer with weights ``theta``."""
        return LambdaBlendOptimizer(self, theta)


@register_optimizer("fixed_lambda")
@dataclasses.dataclass(frozen=True)
class FixedLambdaLOpt(LambdaBlendLOpt):
    """``λ·Δ_lstm + (1 − λ)·Δ_adam`` with one fixed ``lam`` (0 ≤ λ ≤ 1) for every coordinate."""

    lam: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "lam", float(self.lam))
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")

    @property
    def name(self) -> str:
        return "fixed_lambda"


@register_optimizer("learned_lambda")
@dataclasses.dataclass(frozen=True)
class LearnedLambdaLOpt(LambdaBlendLOpt):
    """``λ·Δ_lstm + (1 − λ)·Δ_adam`` with λ per coordinate from a sigmoid head of the LSTM."""

    initial_lambda: float = 0.5
    learned = True

    def __post_init__(self):
        if not 0.0 < self.initial_lambda < 1.0:
            raise ValueError(f"initial_lambda must be in (0, 1), got {self.initial_lambda}")

    def init(self, key: PRNGKey) -> MetaParams:
        """The LSTM's θ with a λ head ``{"w": zeros[units], "b": logit(initial_lambda)}`` added
        to each net."""
        theta = self.lstm_config.init(key)
        p = self.initial_lambda
        head = lambda: {"w": jnp.zeros((self.layers[-1],), jnp.float32),
                        "b": jnp.asarray(math.log(p) - math.log1p(-p), jnp.float32)}
        return {name: {**net, "lambda": head()} for name, net in theta.items()}

    @property
    def name(self) -> str:
        return "learned_lambda"
