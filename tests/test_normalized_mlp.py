"""The normalized-momentum MLP optimizer: zero in gives zero out, scale invariance, optax use,
and its adaptive per-tensor gain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_tree_allclose, minimize, squared_distance_to

from l2o.estimators.schedules import LogUniformHorizon
from l2o.estimators.truncated_step import TruncatedStep
from l2o.optimizers.normalized_mlp import (
    GAIN_RATE_SCALE,
    NormalizedMLP,
    gain_alignment,
    initial_schedule,
    schedule_value,
)
from l2o.optimizers.registry import make_learned_optimizer
from l2o.tasks.quadratic import QuadraticFamily


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"w": jax.random.normal(k[0], (5, 3)), "b": jnp.zeros((3,)),
            "deep": {"s": jnp.asarray(0.7), "t": jax.random.normal(k[1], (2, 2, 2))}}


def _perturbed_theta(seed: int = 1):
    lopt = NormalizedMLP()
    theta = lopt.init(jax.random.PRNGKey(0))
    leaves, tdef = jax.tree_util.tree_flatten(theta)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, jnp.shape(x)) for x, k in zip(leaves, keys)]
    return lopt, jax.tree_util.tree_unflatten(tdef, leaves)


def _run(tx, params, grads_fn, steps):
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for t in range(steps):
        updates, state = update(grads_fn(t, params), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return params, out


@pytest.mark.parametrize("perturbed", [False, True])
def test_zero_gradient_from_the_start_gives_zero_updates(perturbed):
    lopt, theta = _perturbed_theta() if perturbed else (NormalizedMLP(), None)
    theta = theta if perturbed else lopt.init(jax.random.PRNGKey(0))
    params = _params()
    zero = lambda t, p: jax.tree_util.tree_map(jnp.zeros_like, p)
    final, updates = _run(lopt.as_optax(theta, num_steps=20), params, zero, 20)
    for u in updates:
        assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(u))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, final, params))


def test_updates_decay_once_gradients_vanish():
    lopt, theta = _perturbed_theta()
    g0 = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.5, _params())
    grads = lambda t, p: g0 if t < 10 else jax.tree_util.tree_map(jnp.zeros_like, p)
    _, updates = _run(lopt.as_optax(theta), _params(), grads, 1000)
    size = np.asarray([float(optax.tree.norm(u)) for u in updates])
    assert size[9] > 0
    assert size[-1] < 1e-3 * size[9]  # the momenta decay, and the step with them
    assert np.all(np.diff(size[100:]) <= 1e-7)  # and keeps shrinking


def test_gradient_scale_does_not_change_the_step():
    lopt, theta = _perturbed_theta()
    key = jax.random.PRNGKey(3)
    keys = [jax.random.fold_in(key, t) for t in range(5)]
    noise = [jax.tree_util.tree_map(lambda p, k=k: jax.random.normal(k, jnp.shape(p)), _params())
             for k in keys]
    tx = lopt.as_optax(theta, num_steps=5)
    _, a = _run(tx, _params(), lambda t, p: noise[t], 5)
    _, b = _run(tx, _params(), lambda t, p: jax.tree_util.tree_map(lambda g: 1e3 * g, noise[t]),
                5)
    for ua, ub in zip(a, b):
        assert_tree_allclose(ua, ub, rtol=2e-3, atol=1e-7)


def test_composes_with_optax_chain_under_jit_and_minimizes():
    lopt = NormalizedMLP()
    theta = lopt.init(jax.random.PRNGKey(0))
    target = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.asarray(-2.0)}
    loss = squared_distance_to(target)
    tx = optax.chain(optax.clip_by_global_norm(1.0), lopt.as_optax(theta, num_steps=300))
    params = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 0.5, target)
    start = float(loss(params))
    params = minimize(tx, loss, params, 300)
    assert float(loss(params)) < 0.05 * start


def test_steps_are_relative_to_each_tensors_initial_scale():
    lopt = NormalizedMLP()
    theta = lopt.init(jax.random.PRNGKey(0))
    small = {"w": 0.5 * jnp.ones((4, 4))}
    big = {"w": 50.0 * jnp.ones((4, 4))}
    g = {"w": jnp.ones((4, 4))}
    tx = lopt.as_optax(theta)
    u_small, _ = tx.update(g, tx.init(small))  # params are optional
    u_big, _ = tx.update(g, tx.init(big), big)
    np.testing.assert_allclose(u_big["w"], 100.0 * u_small["w"], rtol=1e-5)
    zero = {"w": jnp.zeros((4, 4))}  # a zero-initialized tensor steps at the floor's scale
    u_zero, _ = tx.update(g, tx.init(zero))
    np.testing.assert_allclose(u_zero["w"], u_small["w"] * float(jnp.exp(theta["log_floor"])) / 0.5,
                               rtol=1e-5)


def test_schedule_starts_as_warmup_then_cosine_and_turns_off_without_horizon():
    theta = NormalizedMLP().init(jax.random.PRNGKey(0))
    np.testing.assert_allclose(theta["schedule"], initial_schedule())
    lam = [float(schedule_value(theta, jnp.asarray(s))) for s in (0.0, 0.05, 0.5, 1.0)]
    assert lam[0] < lam[1] and lam[1] > lam[2] > lam[3]
    # no horizon: the first step's size equals that of a run whose schedule is at λ = 1
    g = jax.tree_util.tree_map(jnp.ones_like, _params())
    lopt = NormalizedMLP()
    no_h = lopt.as_optax(theta, None)
    u, _ = no_h.update(g, no_h.init(_params()), _params())
    with_h = lopt.as_optax(theta, 1000)
    v, _ = with_h.update(g, with_h.init(_params()), _params())
    ratio = float(optax.tree.norm(u)) / float(optax.tree.norm(v))
    np.testing.assert_allclose(ratio, 1.0 / float(schedule_value(theta, jnp.asarray(0.0))),
                               rtol=1e-4)


def test_learned_optimizer_interface_matches_the_optax_transform():
    lopt, theta = _perturbed_theta()
    opt = lopt.opt_fn(theta)
    params = _params()
    g = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.3), params)
    state = opt.update(opt.init(params, num_steps=50), g)
    tx = lopt.as_optax(theta, num_steps=50)
    u, _ = tx.update(g, tx.init(params), params)
    assert_tree_allclose(opt.params(state), optax.apply_updates(params, u), rtol=1e-6)


def test_truncated_step_tells_the_optimizer_the_drawn_horizon():
    lopt = make_learned_optimizer("normalized_mlp")
    ts = TruncatedStep(family=QuadraticFamily(dim=4), learned_opt=lopt, num_steps=100,
                       horizon_schedule=LogUniformHorizon(10, 100))
    theta = lopt.init(jax.random.PRNGKey(0))
    states = ts.init_states(theta, jax.random.PRNGKey(1), 6)
    np.testing.assert_array_equal(states.opt_state.inner.horizon,
                                  states.horizon.astype(jnp.float32))
    assert len(set(np.asarray(states.horizon).tolist())) > 1


@pytest.mark.parametrize("kwargs, field", [({"decays": ()}, "decays"),
                                           ({"rms_decay": 1.0}, "rms_decay"),
                                           ({"learning_rate": 0.0}, "learning_rate"),
                                           ({"hidden_size": 0}, "hidden_size"),
                                           ({"gain_range": -1.0}, "gain_range")])
def test_bad_settings_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NormalizedMLP(**kwargs)


def _with_gain(theta, rate, target):
    """``theta`` of the optimizer without the gain, plus the gain rule's θ (κ = ``rate``)."""
    return {**theta, "gain": {"rate": jnp.asarray(rate / GAIN_RATE_SCALE, jnp.float32),
                              "target": jnp.asarray(target, jnp.float32)}}


def _quadratic_grads(t, p):
    return jax.grad(squared_distance_to(jax.tree_util.tree_map(jnp.ones_like, p)))(p)


def test_adaptive_gain_at_rate_zero_is_the_optimizer_without_it():
    plain, theta = _perturbed_theta()
    gained = NormalizedMLP(adaptive_gain=True)
    assert "gain" not in theta and set(gained.init(jax.random.PRNGKey(0))) == set(theta) | {"gain"}
    _, want = _run(plain.as_optax(theta, num_steps=30), _params(), _quadratic_grads, 30)
    _, got = _run(gained.as_optax(_with_gain(theta, 0.0, 0.3), num_steps=30), _params(),
                  _quadratic_grads, 30)
    for a, b in zip(got, want, strict=True):
        assert_tree_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("target", "factor"), [(-1.0, np.exp(3.0)), (1.0, np.exp(-3.0))])
def test_adaptive_gain_is_clipped_to_its_range(target, factor):
    """A huge κ saturates γ at ±R in the first step (the momentum is still zero, so the alignment
    is 0 and γ moves by −κ·c*): every tensor's first update is e^±3 times the plain one."""
    plain, theta = _perturbed_theta()
    gained = NormalizedMLP(adaptive_gain=True, gain_range=3.0)
    params = _params()
    grads = _quadratic_grads(0, params)
    want, _ = plain.as_optax(theta, num_steps=30).update(grads, plain.as_optax(
        theta, num_steps=30).init(params), params)
    tx = gained.as_optax(_with_gain(theta, 1e4, target), num_steps=30)
    got, state = tx.update(grads, tx.init(params), params)
    assert_tree_allclose(got, jax.tree_util.tree_map(lambda u: factor * u, want), rtol=1e-5)
    for g in jax.tree_util.tree_leaves(state.log_gain):
        assert float(g) == pytest.approx(3.0 * np.sign(-target))


def test_adaptive_gain_grows_while_gradients_agree_and_shrinks_when_they_flip():
    assert float(gain_alignment(jnp.ones(4), 2.0 * jnp.ones(4))) == pytest.approx(1.0)
    assert float(gain_alignment(jnp.ones(4), jnp.zeros(4))) == 0.0
    lopt = NormalizedMLP(adaptive_gain=True)
    theta = _with_gain(lopt.init(jax.random.PRNGKey(0)), 0.05, 0.0)
    params = {"w": jnp.zeros((3,))}
    steady = lambda t, p: {"w": jnp.ones((3,))}
    flipping = lambda t, p: {"w": (-1.0) ** t * jnp.ones((3,))}
    for grads, sign in ((steady, 1.0), (flipping, -1.0)):
        tx = lopt.as_optax(theta)
        state = tx.init(params)
        for t in range(20):
            _, state = tx.update(grads(t, params), state, params)
        assert sign * float(state.log_gain["w"]) > 0.5  # 19 steps of ±0.05 after the first


def test_adaptive_gain_keeps_zero_in_zero_out():
    lopt = NormalizedMLP(adaptive_gain=True)
    theta = _with_gain(lopt.init(jax.random.PRNGKey(0)), 1e3, -1.0)  # the largest gain
    zero = lambda t, p: jax.tree_util.tree_map(jnp.zeros_like, p)
    params = _params()
    final, updates = _run(lopt.as_optax(theta, num_steps=20), params, zero, 20)
    for u in updates:
        assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(u))


def test_adaptive_gain_refuses_a_theta_trained_without_it():
    plain = NormalizedMLP()
    with pytest.raises(ValueError, match="no 'gain' entry"):
        NormalizedMLP(adaptive_gain=True).as_optax(plain.init(jax.random.PRNGKey(0)))
