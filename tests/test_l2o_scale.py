"""L2O-Scale's enhancements: curvature penalties (l2o.estimators.curvature) and imitation of
Adam."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from helpers import assert_tree_equal

from l2o.estimators import Imitation, TruncatedBackprop, TruncatedStep, imitation_loss
from l2o.estimators.curvature import (
    curvature_penalty,
    hutchinson_trace,
    hvp,
    spectrum_second_moment,
    top_eigenvalue,
)
from l2o.io.config import (
    ConfigError,
    config_from_dict,
    estimator_config,
    optimizer_config,
)
from l2o.optimizers.baselines import adam
from l2o.tasks.quadratic import QuadraticConfig, QuadraticFamily, QuadraticTask
from l2o.training.build import estimator_from_config, learned_optimizer_from_config

# ------------------------------------------------------------------------------------------------
# Curvature: explicit Hessians (jax.hessian) and numpy/jnp.linalg as the references

DIM = 6


def _spd(seed: int, n: int = DIM) -> np.ndarray:
    m = np.random.default_rng(seed).normal(size=(n, n))
    return m @ m.T / n + 0.5 * np.eye(n)


def _split(x):
    """A flat vector as a two-leaf pytree (checks that the estimators handle pytrees)."""
    return {"a": x[:2], "b": x[2:].reshape(2, 2)}


def _flat(p):
    return jnp.concatenate([p["a"], p["b"].reshape(-1)])


A = jnp.asarray(_spd(0))
B = jnp.asarray(np.random.default_rng(1).normal(size=DIM))


def quad(p):
    x = _flat(p)
    return 0.5 * x @ A @ x + B @ x


def nonquad(p):
    """Not quadratic, convex: its Hessian A + diag(1.2 x² + sech²(x)) depends on the point."""
    x = _flat(p)
    return 0.5 * x @ A @ x + 0.1 * jnp.sum(x ** 4) + jnp.sum(jnp.log(jnp.cosh(x)))


def separable(p):
    """A diagonal Hessian: Hutchinson's probe is then exact for every draw."""
    x = _flat(p)
    return jnp.sum(jnp.sin(x) + 0.3 * x ** 4)


X0 = _split(jnp.asarray(np.random.default_rng(2).normal(size=DIM), jnp.float32))


def explicit_hessian(f, p):
    return jax.hessian(lambda x: f(_split(x)))(_flat(p))


def _probe_tolerance(h: np.ndarray, n: int) -> float:
    """4σ of the mean of n Rademacher probes vᵀHv: one probe's variance is 2·Σ_{i≠j} H_ij²."""
    off = h - np.diag(np.diag(h))
    return 4.0 * np.sqrt(2.0 * np.sum(off ** 2) / n) + 1e-4 * np.abs(np.trace(h))


@pytest.mark.parametrize("f", [quad, nonquad], ids=["quadratic", "nonquadratic"])
def test_hvp_matches_explicit_hessian(f):
    h = explicit_hessian(f, X0)
    v = _split(jnp.arange(1.0, DIM + 1))
    np.testing.assert_allclose(_flat(hvp(f, X0, v)), h @ _flat(v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("f", [quad, nonquad], ids=["quadratic", "nonquadratic"])
def test_trace_top_and_spectrum_match_eigvalsh(f):
    h = np.asarray(explicit_hessian(f, X0), np.float64)
    eig = np.linalg.eigvalsh(h)
    assert np.allclose(eig, np.asarray(jnp.linalg.eigvalsh(jnp.asarray(h))), rtol=1e-5)
    n = 2000
    key = jax.random.PRNGKey(0)
    est = jax.jit(hutchinson_trace, static_argnums=(0, 3))(f, X0, key, n)
    assert abs(float(est) - eig.sum()) < _probe_tolerance(h, n)
    # Σλ² = tr(H²): same probe variance formula with H² in place of H
    sm = jax.jit(spectrum_second_moment, static_argnums=(0, 3))(f, X0, key, n)
    assert abs(float(sm) - np.sum(eig ** 2)) < _probe_tolerance(h @ h, n)
    top = jax.jit(top_eigenvalue, static_argnums=(0, 3))(f, X0, key, 200)
    np.testing.assert_allclose(float(top), eig[-1], rtol=1e-4)


def test_estimates_are_exact_on_a_diagonal_hessian_and_differentiable():
    """Diagonal H: every probe gives tr H and Σ H_ii² exactly, so the gradients are exact too."""
    key = jax.random.PRNGKey(3)
    h = explicit_hessian(separable, X0)
    assert np.allclose(h, np.diag(np.diag(h)), atol=1e-6)
    np.testing.assert_allclose(hutchinson_trace(separable, X0, key, 3), jnp.trace(h), rtol=1e-5)
    np.testing.assert_allclose(spectrum_second_moment(separable, X0, key, 3),
                               jnp.sum(jnp.diag(h) ** 2), rtol=1e-5)

    exact_tr = lambda p: jnp.trace(explicit_hessian(separable, p))
    exact_sm = lambda p: jnp.sum(explicit_hessian(separable, p) ** 2)
    for est, exact in [(lambda p: hutchinson_trace(separable, p, key, 2), exact_tr),
                       (lambda p: spectrum_second_moment(separable, p, key, 2), exact_sm)]:
        g = _flat(jax.grad(est)(X0))
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, _flat(jax.grad(exact)(X0)), rtol=1e-4, atol=1e-4)


def test_top_eigenvalue_gradient_is_the_eigenvalue_derivative():
    """∂λ_max/∂x from power iteration equals that of eigvalsh of the explicit Hessian."""
    key = jax.random.PRNGKey(4)
    g = jax.grad(lambda p: top_eigenvalue(nonquad, p, key, 200))(X0)
    ref = jax.grad(lambda p: jnp.linalg.eigvalsh(explicit_hessian(nonquad, p))[-1])(X0)
    assert np.all(np.isfinite(_flat(g)))
    np.testing.assert_allclose(_flat(g), _flat(ref), rtol=1e-3, atol=1e-4)


def test_curvature_penalty_names_and_errors():
    key = jax.random.PRNGKey(0)
    assert float(curvature_penalty("hessian-trace", separable, X0, key)) == pytest.approx(
        float(jnp.trace(explicit_hessian(separable, X0))), rel=1e-5)
    with pytest.raises(ValueError, match="unknown curvature penalty 'hessian-foo'"):
        curvature_penalty("hessian-foo", quad, X0, key)
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson_trace(quad, X0, key, 0)


# ------------------------------------------------------------------------------------------------
# Imitation


def test_imitation_loss_values():
    a = {"w": jnp.array([[1.0, -2.0], [0.5, 0.0]]), "b": jnp.array([3.0])}
    assert float(imitation_loss(a, a)) == 0.0
    b = {"w": jnp.array([[0.0, -2.0], [0.5, 2.0]]), "b": jnp.array([1.0])}
    # hand-computed: 0.5 · (1² + 0 + 0 + 2² + 2²) = 4.5
    assert float(imitation_loss(a, b)) == pytest.approx(4.5)
    assert float(imitation_loss(b, a)) == pytest.approx(4.5)


@struct.dataclass
class QuarticTask(QuadraticTask):
    """``‖r‖² + ½Σr⁴`` with ``r = Wx − y``: its Hessian ``Wᵀdiag(2 + 6r²)W`` depends on ``x``.

    On the plain quadratics the Hessian is constant, so a curvature penalty would not depend on θ
    at all; the regularizer's tests use this family instead.
    """

    def loss(self, params, batch=()):
        r = self.w @ params["x"] - self.y
        return jnp.sum(r * r) + 0.5 * jnp.sum(r ** 4)


@struct.dataclass
class QuarticFamily(QuadraticFamily):
    """Quadratics with a quartic term (``W`` scaled by 1/√d to keep the quartic tame)."""

    def sample(self, key):
        cfg = super().sample(key)
        return QuadraticConfig(w=cfg.w / np.sqrt(self.dim), y=cfg.y)

    def task(self, cfg):
        return QuarticTask(w=cfg.w, y=cfg.y)


def _est(lopt, dim=4, family=QuadraticFamily, **kw):
    base = {"num_tasks": 4, "unroll_length": 5, "num_steps": 20}
    base.update(kw)
    return estimator_from_config(estimator_config(**base), family(dim=dim), lopt)


def test_adam_imitating_adam_has_zero_imitation_loss():
    """A learned optimizer that is exactly Adam(0.01) imitates Adam(0.01) perfectly."""
    lopt = adam(learning_rate=0.01)
    est = _est(lopt, mt_ratio=1.0, mt_k=1)
    theta = lopt.init(jax.random.PRNGKey(0))
    ws = est.init_worker_state(theta, jax.random.PRNGKey(1))
    loss, (_, metrics) = est.meta_loss(theta, ws, jax.random.PRNGKey(2))
    assert float(metrics["imitation_fraction"]) == 1.0
    assert abs(float(loss)) < 1e-10
    assert float(metrics["inner_loss"]) > 1e-2  # the ordinary meta-loss would not be ~0


def test_imitation_follows_the_teacher_trajectory_and_its_loss():
    """While imitating, the parameters are Adam(0.01)'s iterates (a plain optax loop), and the
    meta-loss is the mean of 0.5‖Δ_adam − Δ_learned‖² recomputed from the learned optimizer."""
    lopt = learned_optimizer_from_config(optimizer_config(name="lstm"))
    est = _est(lopt, num_tasks=2, unroll_length=4, mt_ratio=1.0, mt_k=1)
    theta = lopt.init(jax.random.PRNGKey(0))
    ws = est.init_worker_state(theta, jax.random.PRNGKey(1))
    step_meta = jax.jit(est.meta_loss)
    loss, (new_ws, metrics) = step_meta(theta, ws, jax.random.PRNGKey(2))
    ts = est.truncated_step
    tx = optax.adam(0.01)

    @jax.jit
    def reference(cfg, ostate):
        """Adam's iterates by hand, and the learned step taken from each of them."""
        task = ts.family.task(cfg)
        opt = lopt.opt_fn(theta)
        params = ostate.params
        tstate = tx.init(params)
        terms = []
        for _ in range(est.unroll_length):
            loss, g = jax.value_and_grad(task.loss)(params)
            step, tstate = tx.update(g, tstate, params)
            ostate = opt.update(ostate, g, loss=loss)
            diff = jax.tree_util.tree_map(lambda n, p, s: n - p - s, ostate.params, params, step)
            terms.append(0.5 * sum(jnp.sum(d ** 2) for d in jax.tree_util.tree_leaves(diff)))
            params = optax.apply_updates(params, step)
            ostate = ostate.replace(params=params)
        return params, jnp.mean(jnp.stack(terms))

    ref_losses = []
    for i in range(est.num_tasks):
        pick = lambda t, i=i: jax.tree_util.tree_map(lambda x: x[i], t)
        params, ref = reference(pick(ws.task_cfg), pick(ws.opt_state))
        np.testing.assert_allclose(new_ws.opt_state.params["x"][i], params["x"], rtol=1e-5,
                                   atol=1e-6)
        ref_losses.append(float(ref))
    np.testing.assert_allclose(float(loss), np.mean(ref_losses), rtol=1e-4)
    assert float(metrics["imitation_fraction"]) == 1.0
    # mt_k = 1: the next truncation is back to the ordinary meta-loss
    _, (_, m2) = step_meta(theta, new_ws, jax.random.PRNGKey(3))
    assert float(m2["imitation_fraction"]) == 0.0


def test_imitation_episode_draws_follow_mt_ratio():
    lopt = learned_optimizer_from_config(optimizer_config(name="lstm"))
    est = _est(lopt, num_tasks=400, mt_ratio=0.3)
    ws = est.init_worker_state(lopt.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    frac = float(np.mean(np.asarray(ws.imitation.active)))
    assert abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 400)


# ------------------------------------------------------------------------------------------------
# Off by default: the estimator is the previous one


def test_defaults_leave_the_estimate_unchanged():
    lopt = learned_optimizer_from_config(optimizer_config(name="lstm"))
    fam = QuadraticFamily(dim=4)
    built = estimator_from_config(estimator_config(num_tasks=3, unroll_length=4, num_steps=8),
                                  fam, lopt)
    plain = TruncatedBackprop(truncated_step=TruncatedStep(family=fam, learned_opt=lopt,
                                                           num_steps=8),
                              num_tasks=3, unroll_length=4)
    assert built == plain and built.truncated_step.imitation is None
    theta = lopt.init(jax.random.PRNGKey(0))
    for est_a, est_b in [(built, plain)]:
        wa = est_a.init_worker_state(theta, jax.random.PRNGKey(1))
        wb = est_b.init_worker_state(theta, jax.random.PRNGKey(1))
        assert wa.imitation is None
        for k in range(3):
            ga, wa, ma = est_a.compute_gradient_estimate(theta, wa, jax.random.PRNGKey(k))
            gb, wb, mb = est_b.compute_gradient_estimate(theta, wb, jax.random.PRNGKey(k))
            assert_tree_equal((ga, wa, ma), (gb, wb, mb))
            assert set(ma) == set(mb) and "curvature" not in ma


def test_curvature_penalty_meta_gradient_matches_finite_differences():
    """With second derivatives, ∂/∂θ of the curvature penalty at the truncation's final iterates
    (third derivatives of the inner loss, through the learned optimizer's steps) is exact; and it
    is not zero on a loss whose Hessian moves with the parameters."""
    lopt = learned_optimizer_from_config(optimizer_config(name="learned_adam"))
    est = _est(lopt, dim=3, family=QuarticFamily, num_tasks=2, unroll_length=3, num_steps=10,
               second_derivatives=True, reg_option="hessian-esd", reg_alpha=0.5)
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), t)
        theta = to64(lopt.init(jax.random.PRNGKey(0)))
        states = to64(est.init_worker_state(theta, jax.random.PRNGKey(1)))
        key = jax.random.PRNGKey(2)
        curvature = jax.jit(lambda th: est.meta_loss(th, states, key)[1][1]["curvature"])
        grad = jax.jit(jax.grad(curvature))(theta)
        leaves, treedef = jax.tree_util.tree_flatten(theta)
        rng = np.random.default_rng(0)
        direction = treedef.unflatten([jnp.asarray(rng.normal(size=x.shape)) for x in leaves])
        eps = 1e-5
        shift = lambda s: jax.tree_util.tree_map(lambda t, d: t + s * eps * d, theta, direction)
        fd = (curvature(shift(1.0)) - curvature(shift(-1.0))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grad),
                                                       jax.tree_util.tree_leaves(direction)))
        assert float(curvature(theta)) > 0 and abs(float(fd)) > 1e-3
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Short meta-trainings lower the (regularized / imitation) meta-loss


@pytest.mark.parametrize("opts", [
    pytest.param({"reg_option": "hessian-trace", "reg_alpha": 1e-2}, marks=pytest.mark.slow),
    pytest.param({"reg_option": "hessian-top", "reg_alpha": 1e-2}, marks=pytest.mark.slow),
    {"reg_option": "hessian-esd", "reg_alpha": 1e-3},
    {"mt_ratio": 0.5, "mt_k": 1},
], ids=["trace", "top", "esd", "imitation"])
def test_short_meta_training_lowers_the_meta_loss(opts):
    """40 Adam meta-steps of the LSTM lower the meta-loss that is optimized (with its penalty or
    imitation terms), scored on a fixed held-out truncation of fresh problems: quadratics for
    imitation, quadratics with a quartic term for the penalties (there the penalty depends on θ)."""
    lopt = learned_optimizer_from_config(optimizer_config(name="lstm"))
    family = QuarticFamily if "reg_option" in opts else QuadraticFamily
    est = _est(lopt, family=family, num_tasks=4, unroll_length=5, num_steps=20, **opts)
    theta = lopt.init(jax.random.PRNGKey(0))
    held_ws = est.init_worker_state(theta, jax.random.PRNGKey(99))
    held_key = jax.random.PRNGKey(98)
    # the estimator's own jitted step also scores θ (its meta_loss metric): one compilation
    score = lambda th: float(est.compute_gradient_estimate(th, held_ws, held_key)[2]["meta_loss"])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    ostate = tx.init(theta)
    before = score(theta)
    ws = est.init_worker_state(theta, jax.random.PRNGKey(1))
    for i in range(40):
        g, ws, m = est.compute_gradient_estimate(theta, ws, jax.random.PRNGKey(100 + i))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g))
        upd, ostate = tx.update(g, ostate, theta)
        theta = optax.apply_updates(theta, upd)
    if "reg_option" in opts:
        assert float(m["curvature"]) > 0
    else:
        assert "imitation_fraction" in m
    after = score(theta)
    assert after < 0.9 * before, (before, after)


# ------------------------------------------------------------------------------------------------
# Config


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"estimator\.mt_ratio"):
        config_from_dict({"estimator": {"mt_ratio": 1.5}})
    with pytest.raises(ConfigError, match=r"estimator\.reg_option"):
        config_from_dict({"estimator": {"reg_option": "hessian"}})
    with pytest.raises(ConfigError, match=r"estimator\.reg_alpha"):
        config_from_dict({"estimator": {"reg_alpha": -1.0}})
    with pytest.raises(ConfigError, match=r"estimator\.mt_k"):
        config_from_dict({"estimator": {"mt_k": 0}})
    cfg = config_from_dict({"estimator": {"reg_option": "hessian-esd", "mt_ratio": 0.1}})
    assert cfg.estimator.reg_alpha == 1e-4 and cfg.estimator.mt_teacher_lr == 0.01
    lopt = learned_optimizer_from_config(optimizer_config(name="lstm"))
    fam = QuadraticFamily(dim=4)
    with pytest.raises(ConfigError, match=r"estimator\.reg_option.*tbptt"):
        config_from_dict({"estimator": {"name": "pes", "reg_option": "hessian-trace"}})
    with pytest.raises(ConfigError, match=r"estimator\.mt_ratio.*tbptt"):
        config_from_dict({"estimator": {"name": "es", "mt_ratio": 0.2}})
    # structural: only the tbptt config has the fields, so no other estimator can be given them
    from l2o.estimators.registry import ESTIMATORS

    for name in ESTIMATORS:
        fields = ESTIMATORS.config_class(name).model_fields
        assert ("reg_option" in fields) == ("mt_ratio" in fields) == (name == "tbptt")
    # mt_k counts truncations: the imitation lasts mt_k × unroll_length inner steps
    est = estimator_from_config(estimator_config(unroll_length=7, mt_ratio=0.1, mt_k=3,
                                                mt_teacher_lr=0.02), fam, lopt)
    assert est.truncated_step.imitation == Imitation(ratio=0.1, steps=21, teacher_lr=0.02)
    off = estimator_from_config(estimator_config(mt_ratio=0.0), fam, lopt)
    assert off.truncated_step.imitation is None
    mixed = learned_optimizer_from_config(optimizer_config(name="mixed"))
    with pytest.raises(ValueError, match="mixed"):
        estimator_from_config(estimator_config(mt_ratio=0.2), fam, mixed)
