"""The meta-training problem set of the hierarchical RNN paper (Wichrowska et al. 2017), in JAX.

A mix of small problems with known structure: ill-conditioned quadratics, 2-D bowls, Rosenbrock,
Beale, 2-class logistic regression on random data and a tiny MLP on random data; each optionally
with gradient noise, rescaled (the parameters are multiplied by a fixed factor inside the loss),
or summed with a second problem.

One static shape. Estimators ``vmap`` over task configs, so every problem of a family must have
parameters of the same shape. Here the parameters are always ``{"x": [32]}`` and every config
holds the constants of *every* problem type (one fixed-size pytree); a problem uses a prefix of
its half of ``x`` (``x[:16]``; a summed problem's second term uses ``x[16:]``) and ignores the
rest, whose gradient is exactly zero. The loss evaluates the problem type through ``lax.switch``
on an index stored in the config. The trade-off: under ``vmap`` the switch becomes a select, so
every type's loss and gradient is computed for every problem (cheap at this size: tens of floats
each), configs carry unused constants (≈ 1.8k floats per problem), and the optimizer sees up to
32 coordinates, some with zero gradient, which also enter its per-tensor statistics. In exchange
the whole mixed set runs in one compiled program with one batch of vmapped problems.

Gradient noise. ``loss(x, batch) = f(s·x) + σ · ⟨ε, x⟩`` with ``ε ~ N(0, I)`` drawn per batch
(masked to the used coordinates), so gradients are noisy and unbiased while the expected loss is
the noiseless one. Evaluation batches carry ``ε = 0``; :meth:`ProblemSetTask.clean_loss` is the
noiseless loss.

Problem types (index: name, coordinates used):

==  ===============  ==  ======================================================================
0   quadratic        10  ``½‖A (x − c)‖²``, ``A = R · diag(s)``, ``s`` log-uniform in [0.01, 1]
1   bowl             2   ``½ Σ λ_i (x_i − c_i)²``, ``λ`` log-uniform in [0.1, 10]
2   rosenbrock       2   ``((1 − x₀)² + 100 (x₁ − x₀²)²) / 100`` on [-5, 5]²
3   beale            2   Beale's function / 10 on its domain [-4.5, 4.5]² (minimum 0 at (3, ½))
4   logistic         9   mean softplus loss of a linear classifier (8 weights + bias), 32 points
5   mlp              16  3-3-1 tanh MLP, 2 classes, on the first 3 features of the same points
==  ===============  ==  ======================================================================

(The losses of Rosenbrock and Beale are divided by constants so that typical initial losses of
all types are of order 1; inputs outside their domain are clipped.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from l2o.tasks.base import Task, TaskFamily
from l2o.types import Batch, Params, PRNGKey

DIM = 32  #: length of the parameter vector
HALF = DIM // 2  #: coordinates available to one term of a sum
QUAD_DIM = 10
NUM_POINTS = 32
NUM_FEATURES = 8
KINDS: tuple[str, ...] = ("quadratic", "bowl", "rosenbrock", "beale", "logistic", "mlp")
USED: tuple[int, ...] = (QUAD_DIM, 2, 2, 2, NUM_FEATURES + 1, 16)


@struct.dataclass
class ProblemConsts:
    """The random constants of one term, for every problem type (only one is used)."""

    kind: jax.Array  # int32 index into KINDS
    a: jax.Array  # [QUAD_DIM, QUAD_DIM] quadratic matrix
    center: jax.Array  # [HALF] minimizer of the quadratic (first 10) and bowl (first 2)
    lam: jax.Array  # [2] bowl curvatures
    features: jax.Array  # [NUM_POINTS, NUM_FEATURES]
    labels: jax.Array  # [NUM_POINTS] in {0, 1}: linear teacher for logistic, nonlinear for mlp
    init_scale: jax.Array  # std of the initial coordinates


@struct.dataclass
class ProblemSetConfig:
    """One problem: term ``first``, optional term ``second`` (``use_second``), scale, noise."""

    first: ProblemConsts
    second: ProblemConsts
    use_second: jax.Array  # bool
    scale: jax.Array  # the loss is f(scale · x)
    noise: jax.Array  # σ of the gradient noise


def _softplus_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.softplus(-(2.0 * labels - 1.0) * logits))


def _quadratic(c: ProblemConsts, z: jax.Array) -> jax.Array:
    r = c.a @ (z[:QUAD_DIM] - c.center[:QUAD_DIM])
    return 0.5 * jnp.sum(r * r)


def _bowl(c: ProblemConsts, z: jax.Array) -> jax.Array:
    d = z[:2] - c.center[:2]
    return 0.5 * jnp.sum(c.lam * d * d)


def _rosenbrock(c: ProblemConsts, z: jax.Array) -> jax.Array:
    x, y = jnp.clip(z[0], -5.0, 5.0), jnp.clip(z[1], -5.0, 5.0)
    return ((1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2) / 100.0


def _beale(c: ProblemConsts, z: jax.Array) -> jax.Array:
    x, y = jnp.clip(z[0], -4.5, 4.5), jnp.clip(z[1], -4.5, 4.5)
    return ((1.5 - x + x * y) ** 2 + (2.25 - x + x * y * y) ** 2
            + (2.625 - x + x * y ** 3) ** 2) / 10.0


def _logistic(c: ProblemConsts, z: jax.Array) -> jax.Array:
    logits = c.features @ z[:NUM_FEATURES] + z[NUM_FEATURES]
    return _softplus_margin(logits, c.labels)


def _mlp(c: ProblemConsts, z: jax.Array) -> jax.Array:
    w1, b1 = z[:9].reshape(3, 3), z[9:12]
    w2, b2 = z[12:15], z[15]
    hidden = jnp.tanh(c.features[:, :3] @ w1 + b1)
    return _softplus_margin(hidden @ w2 + b2, c.labels)


_LOSSES = (_quadratic, _bowl, _rosenbrock, _beale, _logistic, _mlp)


def term_loss(c: ProblemConsts, z: jax.Array) -> jax.Array:
    """The noiseless loss of one term at ``z`` (``[HALF]``), by ``lax.switch`` on ``c.kind``."""
    return jax.lax.switch(c.kind, [lambda cc, zz, f=f: f(cc, zz) for f in _LOSSES], c, z)


def used_mask(c: ProblemConsts) -> jax.Array:
    """``[HALF]`` float mask of the coordinates a term uses."""
    return (jnp.arange(HALF) < jnp.asarray(USED, jnp.int32)[c.kind]).astype(jnp.float32)


@struct.dataclass
class ProblemSetTask(Task):
    """One problem of the set; parameters ``{"x": [32]}``."""

    cfg: ProblemSetConfig

    def _mask(self) -> jax.Array:
        second = used_mask(self.cfg.second) * self.cfg.use_second.astype(jnp.float32)
        return jnp.concatenate([used_mask(self.cfg.first), second])

    def init(self, key: PRNGKey) -> Params:
        """Used coordinates ~ N(0, init_scale²) / scale; unused ones 0."""
        k1, k2 = jax.random.split(key)
        std = jnp.concatenate([jnp.full((HALF,), self.cfg.first.init_scale),
                               jnp.full((HALF,), self.cfg.second.init_scale)])
        z = jax.random.normal(k1, (DIM,)) * std * self._mask()
        return {"x": z / self.cfg.scale}

    def sample_batch(self, key: PRNGKey) -> Batch:
        """The gradient-noise direction ``ε ~ N(0, I)`` ``[32]``."""
        return {"eps": jax.random.normal(key, (DIM,))}

    def sample_eval_batch(self, key: PRNGKey) -> Batch:
        """``ε = 0``: evaluation sees the noiseless loss."""
        return {"eps": jnp.zeros((DIM,))}

    def clean_loss(self, params: Params) -> jax.Array:
        """The loss without gradient noise."""
        z = self.cfg.scale * params["x"]
        out = term_loss(self.cfg.first, z[:HALF])
        return out + jnp.where(self.cfg.use_second, term_loss(self.cfg.second, z[HALF:]), 0.0)

    def loss(self, params: Params, batch: Batch) -> jax.Array:
        """``clean_loss + σ · ⟨ε ⊙ mask, x⟩``."""
        noise = self.cfg.noise * jnp.sum(batch["eps"] * self._mask() * params["x"])
        return self.clean_loss(params) + noise

    @property
    def name(self) -> str:
        return "problem_set"


def _log_uniform(key: PRNGKey, shape: tuple[int, ...], low: float, high: float) -> jax.Array:
    return jnp.exp(jax.random.uniform(key, shape, minval=math.log(low), maxval=math.log(high)))


@struct.dataclass
class ProblemSetFamily(TaskFamily):
    """Random problems of the set (see the module docstring).

    ``kinds`` restricts the problem types; ``noise_prob``, ``rescale_prob`` and ``sum_prob`` are
    the probabilities that a problem has gradient noise (σ log-uniform in ``noise_range``), a
    rescaling factor (log-uniform in [0.1, 10]) and a second term.
    """

    kinds: tuple[str, ...] = struct.field(pytree_node=False, default=KINDS)
    noise_prob: float = struct.field(pytree_node=False, default=0.5)
    noise_range: tuple[float, float] = struct.field(pytree_node=False, default=(0.01, 1.0))
    rescale_prob: float = struct.field(pytree_node=False, default=0.25)
    sum_prob: float = struct.field(pytree_node=False, default=0.25)

    def _consts(self, key: PRNGKey) -> ProblemConsts:
        ks = jax.random.split(key, 8)
        allowed = jnp.asarray([KINDS.index(k) for k in self.kinds], jnp.int32)
        kind = allowed[jax.random.randint(ks[0], (), 0, len(self.kinds))]
        rot = jax.random.normal(ks[1], (QUAD_DIM, QUAD_DIM)) / math.sqrt(QUAD_DIM)
        a = rot * _log_uniform(ks[2], (QUAD_DIM,), 0.01, 1.0)[None, :]
        feats = jax.random.normal(ks[3], (NUM_POINTS, NUM_FEATURES))
        teacher = jax.random.normal(ks[4], (NUM_FEATURES,))
        margin = feats @ teacher + 0.5 * jax.random.normal(ks[5], (NUM_POINTS,))
        linear = (margin > 0).astype(jnp.float32)
        nonlinear = (feats[:, 0] * feats[:, 1] > 0).astype(jnp.float32)
        init_scale = jnp.asarray([1.0, 1.0, 1.0, 1.0, 1.0, 0.5], jnp.float32)[kind]
        return ProblemConsts(
            kind=kind, a=a, center=jax.random.normal(ks[6], (HALF,)),
            lam=_log_uniform(ks[7], (2,), 0.1, 10.0), features=feats,
            labels=jnp.where(kind == KINDS.index("mlp"), nonlinear, linear),
            init_scale=init_scale)

    def sample(self, key: PRNGKey) -> ProblemSetConfig:
        """A problem: its terms' constants, whether it is a sum, its scale and noise."""
        ks = jax.random.split(key, 8)
        use_second = jax.random.uniform(ks[2]) < self.sum_prob
        scale = jnp.where(jax.random.uniform(ks[3]) < self.rescale_prob,
                          _log_uniform(ks[4], (), 0.1, 10.0), 1.0)
        lo, hi = self.noise_range
        noise = jnp.where(jax.random.uniform(ks[5]) < self.noise_prob,
                          _log_uniform(ks[6], (), lo, hi), 0.0)
        return ProblemSetConfig(first=self._consts(ks[0]), second=self._consts(ks[1]),
                                use_second=use_second, scale=scale, noise=noise)

    def task(self, cfg: ProblemSetConfig) -> ProblemSetTask:
        return ProblemSetTask(cfg=cfg)

    @property
    def name(self) -> str:
        return "problem_set"
