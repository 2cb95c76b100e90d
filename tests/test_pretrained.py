"""The optimizer shipped in the package: loading, optax composition, zero in/zero out, quality."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import minimize, squared_distance_to

from l2o import pretrained


def test_names_and_unknown_name():
    assert {"general-v1", "general-v2", "general-v3", "general-v4"} <= set(pretrained.names())
    assert pretrained.DEFAULT in pretrained.names()
    with pytest.raises(ValueError, match="general-v1"):
        pretrained.load("nope")
    for name in pretrained.names():
        card = pretrained.info(name)
        assert card["name"] == name and card["suite"]["version"] and "summary" in card["suite"]


def test_loads_as_optax_and_composes_with_clipping_under_jit():
    tx = optax.chain(optax.clip_by_global_norm(1.0), pretrained.load(num_steps=200))
    params = {"dense": {"w": jnp.full((3, 2), 0.5), "b": jnp.zeros((2,))},
              "scale": jnp.asarray(2.0)}
    target = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.25, params)
    loss = squared_distance_to(target)
    start = float(loss(params))
    params = minimize(tx, loss, params, 200)
    assert float(loss(params)) < 0.01 * start
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(target)


@pytest.mark.parametrize("name", ["general-v1", "general-v2", "general-v3", "general-v4"])
def test_zero_gradient_from_the_start_gives_zero_update(name):
    tx = pretrained.load(name, num_steps=50)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros((3,))}
    state = tx.init(params)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    for _ in range(50):
        updates, state = tx.update(zero, state, params)
        assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates))


@pytest.mark.parametrize("task_name", ["digits_autoencoder", "diabetes_mlp_regression"])
def test_beats_tuned_adam_on_a_suite_task(task_name):
    """A quality check (fixed seeds, no timing): final train loss over the report seeds 0-4
    against Adam tuned over its 12-point grid on seeds 1000-1002."""
    from l2o.suite.baselines import BaselineSettings, compute_baselines
    from l2o.suite.runner import fixed_optimizer, run_curves
    from l2o.suite.tasks import suite_task

    st = suite_task("heldout", task_name)
    record = compute_baselines(st, BaselineSettings(baselines=("adam",), long_factor=1),
                               log=lambda line: None)
    adam_final = np.asarray(record["baselines"]["adam"]["report"]["train_loss"])[:, -1]
    run = run_curves(st, fixed_optimizer(lambda n: pretrained.load(num_steps=n)),
                     [0.0] * 5, list(range(5)))
    assert np.all(np.isfinite(run.final_train_loss))
    assert run.final_train_loss.mean() < adam_final.mean()
