"""Learned Lion (l2o/optimizers/lion.py): optax's Lion at init, by name, through the bridge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2o.io.config import ConfigError, config_from_dict, estimator_config, optimizer_config
from l2o.optimizers.lion import LearnedLion
from l2o.optimizers.optax_bridge import as_gradient_transformation
from l2o.optimizers.registry import make_learned_optimizer
from l2o.tasks.quadratic import QuadraticFamily
from l2o.training.build import estimator_from_config, learned_optimizer_from_config


def _loss(params):
    return jnp.sum(jnp.array([1.0, 3.0, 10.0]) * (params["a"] - 1.0) ** 2) + jnp.sum(
        params["b"] ** 2)


def _params():
    return {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([[1.0, -2.0], [0.3, 0.1]])}


def _optax_run(tx, steps):
    params, state = _params(), tx.init(_params())
    for _ in range(steps):
        updates, state = tx.update(jax.grad(_loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_initial_theta_takes_optax_lion_steps(weight_decay):
    lopt = LearnedLion(learning_rate=0.01, b1=0.9, b2=0.99, weight_decay=weight_decay)
    mine = _optax_run(as_gradient_transformation(lopt, lopt.init(jax.random.PRNGKey(0))), 30)
    ref = _optax_run(optax.lion(0.01, b1=0.9, b2=0.99, weight_decay=weight_decay), 30)
    for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_every_coordinate_moves_by_the_learning_rate():
    lopt = LearnedLion(learning_rate=0.05)
    opt = lopt.opt_fn(lopt.init(jax.random.PRNGKey(0)))
    state = opt.init(_params())
    new = opt.params(opt.update(state, jax.grad(_loss)(_params())))
    moves = [np.abs(np.asarray(n - p)) for n, p in zip(jax.tree_util.tree_leaves(new),
                                                       jax.tree_util.tree_leaves(_params()))]
    np.testing.assert_allclose(np.concatenate([m.ravel() for m in moves]), 0.05, rtol=1e-5)


def test_registered_by_name_and_configured_with_checked_kwargs():
    lopt = make_learned_optimizer("learned_lion", learning_rate=3e-4)
    assert lopt == LearnedLion(learning_rate=3e-4) and lopt.name == "learned_lion"
    built = learned_optimizer_from_config(optimizer_config(name="learned_lion",
                                                           kwargs={"b2": 0.98}))
    assert built == LearnedLion(b2=0.98)
    with pytest.raises(ConfigError, match=r"optimizer\.kwargs\.lr"):
        config_from_dict({"optimizer": {"name": "learned_lion", "kwargs": {"lr": 1e-4}}})
    with pytest.raises(ValueError, match="b1"):
        LearnedLion(b1=1.0)


def test_truncated_backprop_learns_the_learning_rate_and_es_all_three():
    lopt = LearnedLion(learning_rate=1e-2)
    theta = lopt.init(jax.random.PRNGKey(0))
    family = QuadraticFamily(dim=3)
    grads = {}
    for name, extra in (("tbptt", {}), ("es", {"std": 0.1})):
        est = estimator_from_config(estimator_config(name=name, num_tasks=4, unroll_length=5,
                                                     num_steps=20, **extra), family, lopt)
        state = est.init_worker_state(theta, jax.random.PRNGKey(1))
        grads[name], _, _ = est.compute_gradient_estimate(theta, state, jax.random.PRNGKey(2))
    assert float(grads["tbptt"]["log_lr"]) != 0.0  # sign() has no derivative: β's get none
    assert float(grads["tbptt"]["logit_b1"]) == 0.0
    assert all(np.isfinite(float(g)) for g in jax.tree_util.tree_leaves(grads["es"]))
    assert any(float(grads["es"][k]) != 0.0 for k in ("logit_b1", "logit_b2"))


def test_through_the_optax_bridge_it_minimizes_a_quadratic():
    lopt = make_learned_optimizer("learned_lion", learning_rate=0.02)
    params = _optax_run(as_gradient_transformation(lopt, lopt.init(jax.random.PRNGKey(0))), 200)
    assert float(_loss(params)) < 0.05 * float(_loss(_params()))
