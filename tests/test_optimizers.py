"""Tests of the optimizers package: LSTM, learned Adam, baselines, optax bridge, registry."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2o.optimizers import (
    OPTIMIZERS,
    LearnedAdam,
    LSTMLearnedOptimizer,
    as_gradient_transformation,
    log_and_sign,
    make_learned_optimizer,
)

KEY = jax.random.PRNGKey(0)


def _quadratic(params):
    """A small ill-conditioned quadratic over a two-leaf tree."""
    scales = jnp.array([1.0, 3.0, 10.0])
    return jnp.sum(scales * (params["a"] - 1.0) ** 2) + jnp.sum(params["b"] ** 2)


def _params():
    return {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([[1.0, -2.0], [0.3, 0.0]])}


def _run_direct(lopt, theta, params, steps):
    opt = lopt.opt_fn(theta)
    state = opt.init(params)
    for _ in range(steps):
        loss, g = jax.value_and_grad(_quadratic)(opt.params(state))
        state = opt.update(state, g, loss=loss)
    return state


# -- LogAndSign ------------------------------------------------------------------------------


def test_log_and_sign_known_values():
    g = jnp.array([0.0, 1e-10, 1e-3, math.exp(-5), 0.1, 1.0, -1.0, 100.0, -1e-4, 1e30])
    log, sign = log_and_sign(g, k=5.0)
    eps = float(np.finfo(np.float32).eps)
    expected_log = np.maximum(np.log(np.abs(np.asarray(g, np.float64)) + eps) / 5.0, -1.0)
    np.testing.assert_allclose(log, expected_log, rtol=1e-5, atol=1e-6)
    # spot values: tiny gradients clamp to -1, |g| = 1 gives 0, 100 gives log(100)/5
    assert float(log[0]) == -1.0 and float(log[1]) == -1.0 and float(log[2]) == -1.0
    assert abs(float(log[5])) < 1e-6
    assert float(log[7]) == pytest.approx(math.log(100.0) / 5.0, rel=1e-5)
    assert float(log[4]) == pytest.approx(math.log(0.1) / 5.0, rel=1e-5)
    e5 = math.exp(5.0)
    np.testing.assert_allclose(
        sign, [0.0, 1e-10 * e5, 1e-3 * e5, 1.0, 1.0, 1.0, -1.0, 1.0, -1e-4 * e5, 1.0], rtol=1e-5
    )
    assert np.all(np.isfinite(log)) and np.all(np.isfinite(sign))


# -- the LSTM --------------------------------------------------------------------------------


def test_lstm_theta_and_state_shapes():
    lopt = LSTMLearnedOptimizer()
    theta = lopt.init(KEY)
    assert list(theta) == ["coordinatewise"]
    shapes = jax.tree_util.tree_map(jnp.shape, theta["coordinatewise"])
    assert shapes == {
        "lstm": [{"w": (22, 80), "b": (80,)}, {"w": (40, 80), "b": (80,)}],
        "out": {"w": (20,), "b": ()},
    }
    state = lopt.opt_fn(theta).init(_params())
    assert state.iteration.dtype == jnp.int32 and int(state.iteration) == 0
    rnn = state.rnn["coordinatewise"]
    assert [h.shape for h in rnn.h] == [(20, 7), (20, 7)]
    assert [c.shape for c in rnn.c] == [(20, 7), (20, 7)]
    assert all(float(jnp.abs(x).sum()) == 0.0 for x in rnn.h + rnn.c)


@pytest.mark.parametrize("grad_scale", [1e-12, 1.0, 1e8])
def test_lstm_update_bounded_by_output_scale(grad_scale):
    lopt = LSTMLearnedOptimizer()
    theta = lopt.init(KEY)
    opt = lopt.opt_fn(theta)
    params = _params()
    state = opt.init(params)
    grads = jax.tree_util.tree_map(lambda p: grad_scale * jnp.sign(p - 0.2), params)
    for _ in range(3):
        new = opt.update(state, grads)
        steps = jax.tree_util.tree_map(lambda a, b: a - b, new.params, state.params)
        out = theta["coordinatewise"]["out"]
        bound = 0.01 * (float(jnp.abs(out["w"]).sum()) + abs(float(out["b"])))
        for s, p in zip(jax.tree_util.tree_leaves(steps), jax.tree_util.tree_leaves(params),
                        strict=True):
            assert s.shape == p.shape
            assert np.all(np.isfinite(s))
            assert float(jnp.max(jnp.abs(s))) <= bound * (1 + 1e-5)
        state = new
    assert int(state.iteration) == 3
    # the network does something: steps are not all zero
    assert float(jnp.max(jnp.abs(steps["a"]))) > 0


def test_lstm_is_coordinatewise():
    """The step of a coordinate depends only on its own gradient, not on the tree layout."""
    lopt = LSTMLearnedOptimizer()
    theta = lopt.init(KEY)
    opt = lopt.opt_fn(theta)
    g = jnp.array([1e-3, -0.5, 2.0, 0.0, 1e-6, -3.0, 0.25])
    tree = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    gtree = {"a": g[:3], "b": g[3:].reshape(2, 2)}
    s_tree = opt.init(tree)
    s_flat = opt.init(jnp.zeros(7))
    s_rev = opt.init(jnp.zeros(7))
    for _ in range(3):
        s_tree = opt.update(s_tree, gtree)
        s_flat = opt.update(s_flat, g)
        s_rev = opt.update(s_rev, g[::-1])
    flat_from_tree = jnp.concatenate([s_tree.params["a"], s_tree.params["b"].ravel()])
    np.testing.assert_allclose(flat_from_tree, s_flat.params, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s_rev.params[::-1], s_flat.params, rtol=1e-6, atol=1e-9)


def test_net_assignments_route_parameters():
    lopt = LSTMLearnedOptimizer(
        net_assignments=(("conv", r"^conv/"), ("fc", lambda path, leaf: leaf.ndim <= 2))
    )
    theta = lopt.init(KEY)
    assert set(theta) == {"conv", "fc"}
    # separate nets, separately initialized
    assert not np.allclose(theta["conv"]["lstm"][0]["w"], theta["fc"]["lstm"][0]["w"])
    params = {"conv": {"w": jnp.zeros((3, 3, 1, 4))},
              "fc": {"w": jnp.zeros((36, 5)), "b": jnp.zeros(5)}}
    # a net with zero read-out weights steps by exactly output_scale * bias
    theta["conv"]["out"] = {"w": jnp.zeros(20), "b": jnp.asarray(1.0)}
    theta["fc"]["out"] = {"w": jnp.zeros(20), "b": jnp.asarray(-2.0)}
    opt = lopt.opt_fn(theta)
    state = opt.init(params)
    assert state.rnn["conv"].h[0].shape == (20, 36)
    assert state.rnn["fc"].h[0].shape == (20, 36 * 5 + 5)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    new = opt.update(state, grads)
    np.testing.assert_allclose(new.params["conv"]["w"], 0.01)
    np.testing.assert_allclose(new.params["fc"]["w"], -0.02)
    np.testing.assert_allclose(new.params["fc"]["b"], -0.02)


def test_net_assignments_errors():
    lopt = LSTMLearnedOptimizer(net_assignments=(("conv", "^conv/"),))
    with pytest.raises(ValueError, match="fc/w"):
        lopt.opt_fn(lopt.init(KEY)).init({"conv": {"w": jnp.zeros(2)}, "fc": {"w": jnp.zeros(2)}})
    with pytest.raises(ValueError, match="repeated"):
        LSTMLearnedOptimizer(net_assignments=(("a", "x"), ("a", "y")))


def test_lstm_config_from_yaml_like_kwargs_is_hashable():
    lopt = make_learned_optimizer("lstm", layers=[20, 20], net_assignments=[["all", ".*"]])
    assert lopt == LSTMLearnedOptimizer(layers=(20, 20), net_assignments=(("all", ".*"),))
    assert hash(lopt) == hash(LSTMLearnedOptimizer(net_assignments=(("all", ".*"),)))


def test_lstm_meta_gradient_through_unroll():
    """jax.grad of a short unroll's summed loss w.r.t. θ is finite and nonzero (under jit)."""
    lopt = LSTMLearnedOptimizer(net_assignments=(("a", "^a"), ("b", "^b")))
    theta = lopt.init(KEY)

    @jax.jit
    def meta_loss(theta):
        opt = lopt.opt_fn(theta, is_training=True)
        state = opt.init(_params())

        def body(state, _):
            loss, g = jax.value_and_grad(_quadratic)(opt.params(state))
            return opt.update(state, jax.lax.stop_gradient(g), loss=loss), loss

        state, losses = jax.lax.scan(body, state, None, length=5)
        return losses.sum() + _quadratic(opt.params(state))

    grad = jax.grad(meta_loss)(theta)
    leaves = jax.tree_util.tree_leaves(grad)
    assert all(np.all(np.isfinite(x)) for x in leaves)
    for net in ("a", "b"):
        assert float(jnp.abs(grad[net]["out"]["w"]).sum()) > 0
        assert float(jnp.abs(grad[net]["lstm"][0]["w"]).sum()) > 0


def test_lstm_with_truncated_backprop():
    """The LSTM works inside the estimator: vmapped, scanned and differentiated."""
    from l2o.estimators import TruncatedBackprop, TruncatedStep
    from l2o.tasks.quadratic import QuadraticFamily

    lopt = LSTMLearnedOptimizer()
    est = TruncatedBackprop(
        truncated_step=TruncatedStep(family=QuadraticFamily(dim=4), learned_opt=lopt,
                                     num_steps=6),
        num_tasks=2, unroll_length=4,
    )
    theta = lopt.init(KEY)
    ws = est.init_worker_state(theta, KEY)
    grad, ws, metrics = est.compute_gradient_estimate(theta, ws, jax.random.PRNGKey(1))
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(theta)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(grad))
    assert float(jnp.abs(grad["coordinatewise"]["out"]["w"]).sum()) > 0
    assert np.isfinite(float(metrics["meta_loss"]))


# -- learned Adam and baselines --------------------------------------------------------------


def test_learned_adam_matches_optax_adam():
    lopt = LearnedAdam()
    theta = lopt.init(KEY)
    state = _run_direct(lopt, theta, _params(), steps=8)
    tx = optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)
    params = _params()
    opt_state = tx.init(params)
    for _ in range(8):
        g = jax.grad(_quadratic)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(state.iteration) == 8


def test_learned_adam_theta_is_differentiable():
    lopt = LearnedAdam()

    def meta_loss(theta):
        return _quadratic(_run_direct(lopt, theta, _params(), steps=3).params)

    grad = jax.grad(meta_loss)(lopt.init(KEY))
    assert set(grad) == {"log_lr", "logit_b1", "logit_b2", "log_eps"}
    assert all(np.isfinite(float(v)) for v in grad.values())
    assert float(grad["log_lr"]) < 0  # a larger step lowers this loss


@pytest.mark.parametrize("name, kwargs, tx", [
    ("adam", {"learning_rate": 0.01}, optax.adam(0.01)),
    ("sgd", {"learning_rate": 0.05, "momentum": 0.9}, optax.sgd(0.05, momentum=0.9)),
    ("rmsprop", {"learning_rate": 0.01}, optax.rmsprop(0.01, decay=0.9, eps=1e-8)),
])
def test_baselines_match_optax(name, kwargs, tx):
    lopt = make_learned_optimizer(name, **kwargs)
    theta = lopt.init(KEY)
    assert theta == {}
    state = _run_direct(lopt, theta, _params(), steps=5)
    params = _params()
    opt_state = tx.init(params)
    for _ in range(5):
        updates, opt_state = tx.update(jax.grad(_quadratic)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sgd_step_formula():
    lopt = make_learned_optimizer("sgd", learning_rate=0.1)
    state = _run_direct(lopt, {}, _params(), steps=1)
    g = jax.grad(_quadratic)(_params())
    np.testing.assert_allclose(state.params["a"], _params()["a"] - 0.1 * g["a"], rtol=1e-6)


# -- the optax bridge ------------------------------------------------------------------------


@pytest.mark.parametrize("lopt", [LSTMLearnedOptimizer(), LearnedAdam(learning_rate=0.05)],
                         ids=["lstm", "learned_adam"])
def test_bridge_matches_direct_optimizer(lopt):
    theta = lopt.init(KEY)
    direct = _run_direct(lopt, theta, _params(), steps=10)

    tx = as_gradient_transformation(lopt, theta, num_steps=10)
    params = _params()
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        loss, g = jax.value_and_grad(_quadratic)(params)
        updates, opt_state = tx.update(g, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(10):
        params, opt_state = train_step(params, opt_state)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(direct.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(opt_state.inner.iteration) == 10
    assert _quadratic(params) < _quadratic(_params()) or isinstance(lopt, LSTMLearnedOptimizer)


def test_bridge_params_passed_to_update_are_authoritative():
    lopt = make_learned_optimizer("sgd", learning_rate=0.1)
    tx = as_gradient_transformation(lopt, {})
    params = {"x": jnp.array([1.0, 2.0])}
    state = tx.init(params)
    moved = {"x": jnp.array([5.0, -1.0])}  # the user changed params outside the optimizer
    grads = {"x": jnp.array([1.0, 1.0])}
    updates, state = tx.update(grads, state, moved)
    np.testing.assert_allclose(updates["x"], [-0.1, -0.1], rtol=1e-6)
    np.testing.assert_allclose(state.inner.params["x"], [4.9, -1.1], rtol=1e-6)
    # without params, it steps from its own copy
    updates, state = tx.update(grads, state)
    np.testing.assert_allclose(updates["x"], [-0.1, -0.1], rtol=1e-5)


# -- registry --------------------------------------------------------------------------------


def test_registry_names_and_errors():
    assert {"lstm", "learned_adam", "adam", "sgd", "rmsprop"} <= set(OPTIMIZERS)
    assert isinstance(make_learned_optimizer("learned_adam"), LearnedAdam)
    with pytest.raises(ValueError, match="learned_adam.*lstm"):
        make_learned_optimizer("nope")
    with pytest.raises(TypeError, match="'lstm'.*nonsense"):
        make_learned_optimizer("lstm", nonsense=1)
    with pytest.raises(TypeError, match="'adam'"):
        make_learned_optimizer("adam", lr=0.1)


def test_a_name_registers_once():
    from l2o.optimizers.registry import register_optimizer

    with pytest.raises(ValueError, match="optimizer 'adam' is registered twice"):
        register_optimizer("adam")(lambda learning_rate=1.0: None)
