"""The influence-balancing problem (Tallec & Ollivier 2017, used by the PES paper as a bias test).

A linear dynamical system with a scalar meta-parameter θ::

    s_{t+1} = A s_t + θ · b,      A = 0.5 · I + 0.5 · (superdiagonal),   s_0 = (1, …, 1) ∈ R^n
    b = (+1 × num_positive, −1 × (n − num_positive)),   loss_t = ½ (s_t[0] − 1)²

``s[0]`` is pushed by θ directly (``b[0] = +1``), but through the superdiagonal each coordinate is
also driven by the next one, so over many steps the negative entries of ``b`` reach ``s[0]`` as
well. In the steady state ``s = (I − A)⁻¹ b θ`` and
``s[0] = 2 θ Σ_k b_k = 2 θ (2·num_positive − n)``; with n = 23 and 10 positive entries
``s[0] = −6 θ`` and the long-horizon loss is minimized at
``θ* = −1/6``. A truncation of length 1 only sees the short-term (positive) influence, so truncated
backprop and truncated ES follow the wrong sign and drift away from θ*; PES accounts for the
whole history and converges to it.

In l2o's terms the dynamics are a :class:`~l2o.optimizers.base.LearnedOptimizer` (θ maps a state
to the next one; the inner "gradient" is ignored) and the loss a :class:`~l2o.tasks.base.Task` whose
parameters are the state ``{"s": s}``. Not registered by name: it is a test problem.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from l2o.optimizers.base import LearnedOptimizer, Optimizer, OptState, zero_iteration
from l2o.tasks.base import SingleTaskFamily, Task
from l2o.types import MetaParams, Params, PRNGKey


@struct.dataclass
class InfluenceTask(Task):
    """The loss ``½ (s[0] − 1)²`` of the state ``{"s": s}``, which starts at all ones."""

    n: int = struct.field(pytree_node=False, default=23)

    def init(self, key: PRNGKey) -> Params:
        return {"s": jnp.ones((self.n,), jnp.float32)}

    def loss(self, params: Params, batch=()) -> jax.Array:
        return 0.5 * (params["s"][0] - 1.0) ** 2

    @property
    def name(self) -> str:
        return f"influence{self.n}"


class InfluenceDynamicsOptimizer(Optimizer):
    """One step ``s ← A s + θ b`` of the influence-balancing system (gradients are ignored)."""

    def __init__(self, theta: MetaParams, n: int, num_positive: int):
        self.theta = theta
        self.sign = jnp.where(jnp.arange(n) < num_positive, 1.0, -1.0).astype(jnp.float32)

    def init(self, params: Params, *, num_steps: int | None = None,
             key: PRNGKey | None = None) -> OptState:
        return OptState(params=params, iteration=zero_iteration())

    def update(self, state: OptState, grads: Params, *, loss: jax.Array | None = None,
               key: PRNGKey | None = None) -> OptState:
        s = state.params["s"]
        a_s = 0.5 * s + 0.5 * jnp.concatenate([s[1:], jnp.zeros((1,), s.dtype)])
        new = a_s + self.theta["theta"] * self.sign
        return OptState(params={"s": new}, iteration=state.iteration + 1)


@dataclasses.dataclass(frozen=True)
class InfluenceDynamics(LearnedOptimizer):
    """The dynamics as a learned optimizer: θ = ``{"theta": scalar}``, initially ``theta0``."""

    n: int = 23
    num_positive: int = 10
    theta0: float = 0.5

    def init(self, key: PRNGKey) -> MetaParams:
        return {"theta": jnp.asarray(self.theta0, jnp.float32)}

    def opt_fn(self, theta: MetaParams, is_training: bool = False) -> InfluenceDynamicsOptimizer:
        return InfluenceDynamicsOptimizer(theta, self.n, self.num_positive)

    def optimum(self) -> float:
        """The steady-state minimizer ``θ* = 1 / (2 (2·num_positive − n))`` (−1/6 by default)."""
        return 1.0 / (2.0 * (2 * self.num_positive - self.n))


def influence_family(n: int = 23) -> SingleTaskFamily:
    """The family holding the single influence-balancing task of dimension ``n``."""
    return SingleTaskFamily(base=InfluenceTask(n=n))
