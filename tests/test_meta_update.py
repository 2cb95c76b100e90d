"""The one meta-update (l2o.training.meta_update): its non-finite policy, in the trainer and the
learner alike."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from helpers import assert_tree_equal

import l2o.training.trainer as trainer_module
import learner.core as learner_module
from l2o.io.checkpoints import latest_checkpoint, load_run_checkpoint
from l2o.io.config import ServiceConfig, config_from_dict
from l2o.training.meta_update import init_meta_state, meta_update
from l2o.training.trainer import Trainer
from learner.core import GradientHeader, Learner

#: finite, but its square overflows float32: Adam's second moment becomes inf while the step it
#: takes is 0, so θ stays finite and only the optimizer state is poisoned
OVERFLOWING = 1e20


def full_like(tree: Any, value: float) -> Any:
    return jax.tree_util.tree_map(lambda x: np.full(np.shape(x), value, np.float32), tree)


def on_device(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.asarray, tree)


def small_theta() -> dict[str, Any]:
    return {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
            "b": np.zeros(3, np.float32)}


def one_step(tx: optax.GradientTransformation, theta: Any, grad: Any) -> Any:
    """θ after one ``tx`` step from a fresh optimizer state."""
    updates, _ = tx.update(grad, tx.init(theta), theta)
    return optax.apply_updates(theta, updates)


def test_a_finite_update_is_the_optax_step():
    tx = optax.adam(1e-2)
    state = init_meta_state(jax.tree_util.tree_map(jnp.asarray, small_theta()), tx)
    grad = full_like(small_theta(), 0.5)
    new, info = jax.jit(meta_update, static_argnums=0)(tx, state, grad)
    assert bool(info.applied) and bool(info.grad_finite) and bool(info.result_finite)
    assert int(new.version) == 1
    for got, want in zip(jax.tree_util.tree_leaves(new.theta),
                         jax.tree_util.tree_leaves(one_step(tx, small_theta(), grad))):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_non_finite_gradient_or_result_leaves_the_state_untouched():
    state = init_meta_state(jax.tree_util.tree_map(jnp.asarray, small_theta()), optax.adam(1e-2))
    nan = full_like(small_theta(), 1.0)
    nan["w"][0, 1] = np.nan
    cases = [  # (meta-optimizer, gradient, gradient finite?)
        (optax.adam(1e-2), nan, False),
        (optax.adam(1e-2), full_like(small_theta(), np.inf), False),
        # finite gradient, non-finite optimizer state (θ itself stays finite)
        (optax.adam(1e-2), full_like(small_theta(), OVERFLOWING), True),
        # finite gradient, non-finite θ
        (optax.sgd(1e30), full_like(small_theta(), 1e10), True),
    ]
    for tx, grad, grad_finite in cases:
        new, info = meta_update(tx, state, on_device(grad))
        assert not bool(info.applied) and bool(info.grad_finite) == grad_finite
        assert not bool(info.result_finite) or not grad_finite
        assert_tree_equal(new, state)
        assert int(new.version) == 0


def test_the_trainer_and_the_learner_share_one_meta_update():
    assert trainer_module.meta_update is meta_update and learner_module.meta_update is meta_update


@struct.dataclass
class _OverflowThenOnes:
    """An estimator whose first estimate overflows Adam's second moment and whose later ones are
    all ones; its worker state counts the estimates."""

    def compute_gradient_estimate(self, theta: Any, count: jax.Array, key: jax.Array):
        value = jnp.where(count == 0, OVERFLOWING, 1.0)
        grad = jax.tree_util.tree_map(lambda x: jnp.full_like(x, value), theta)
        return grad, count + 1, {"meta_loss": jnp.float32(1.0), "inner_steps": jnp.int32(1)}


def test_trainer_skips_and_counts_a_non_finite_update(tmp_path):
    cfg = config_from_dict({
        "run_name": "t", "run_dir": str(tmp_path), "seed": 3, "meta_steps": 1, "log_every": 1,
        "checkpoint_every": 100, "task": {"name": "quadratic", "kwargs": {"dim": 4}},
        "optimizer": {"name": "learned_adam"},
        "estimator": {"num_tasks": 2, "unroll_length": 2, "num_steps": 4},
        "meta_optimizer": {"learning_rate": 1e-2, "clip_norm": None}})
    trainer = Trainer(cfg)
    theta0 = trainer.state.theta
    trainer.estimator, trainer.worker_state = _OverflowThenOnes(), jnp.zeros((), jnp.int32)
    trainer.train()
    assert int(trainer.worker_state) == 2  # two estimates, one update
    assert trainer.step == 1 and trainer.skipped_nonfinite == 1
    # the applied step is Adam's first step from a fresh state: the skipped one left no trace
    expected = one_step(trainer.meta_tx, theta0, full_like(theta0, 1.0))
    for got, want in zip(jax.tree_util.tree_leaves(trainer.state.theta),
                         jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    _, meta = load_run_checkpoint(latest_checkpoint(trainer.run_dir, "full"),
                                  {"theta": theta0, "opt_state": trainer.state.opt_state})
    assert meta.counters == {"skipped_nonfinite": 1}


@pytest.mark.filterwarnings("ignore:overflow encountered in add")  # the overflowing mean
def test_learner_skips_and_counts_a_non_finite_update(tmp_path):
    tx = optax.adam(1e-2)
    learner = Learner(small_theta(), tx, ServiceConfig(batch_size=2, max_staleness=0),
                      tmp_path, "run", tensorboard=False, start=False)
    theta0, state0 = learner.theta, learner.opt_state

    def submit(value: float, seq: int) -> None:
        header = GradientHeader("run", theta_version=0, gen_id=0, worker_id="w", seq=seq,
                                incarnation=learner.incarnation)
        assert learner.submit(full_like(small_theta(), value), header).accepted

    # each gradient is finite (it passes validation); the mean of the first pair is not (it
    # overflows float32), and the second pair overflows Adam's second moment
    for seq, value in enumerate([3e38, 3e38, OVERFLOWING, OVERFLOWING]):
        submit(value, seq)
        if seq % 2:
            assert not learner.step()
    status = learner.status()
    assert status["skipped_nonfinite"] == 2 and status["failed_updates"] == 0
    assert status["applied"] == 0 and status["version"] == 0 and status["buffer_depth"] == 0
    assert_tree_equal(learner.theta, theta0)
    assert_tree_equal(learner.opt_state, state0)
    submit(1.0, 4)
    submit(1.0, 5)
    assert learner.step() and learner.version == 1
    expected = one_step(tx, small_theta(), full_like(small_theta(), 1.0))
    for got, want in zip(jax.tree_util.tree_leaves(learner.theta),
                         jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    learner.stop(checkpoint=True)
    resumed = Learner.resume(small_theta(), tx, ServiceConfig(batch_size=2), tmp_path, "run",
                             tensorboard=False, start=False)
    assert resumed.status()["skipped_nonfinite"] == 2


def test_a_cosine_meta_learning_rate_decays_to_its_final_fraction_and_stays():
    from l2o.io.config import ConfigError
    from l2o.training.build import meta_optimizer_from_config

    cfg = config_from_dict({"meta_optimizer": {"name": "sgd", "learning_rate": 0.1,
                                               "clip_norm": None, "schedule": "cosine",
                                               "decay_steps": 10, "final_fraction": 0.2}})
    tx = meta_optimizer_from_config(cfg.meta_optimizer)
    theta = {"w": jnp.zeros(2)}
    state = tx.init(theta)
    steps = []
    for _ in range(14):  # a unit gradient: SGD's step is the learning rate
        update, state = tx.update({"w": jnp.ones(2)}, state, theta)
        steps.append(-float(update["w"][0]))
    np.testing.assert_allclose(steps[0], 0.1, rtol=1e-6)
    assert all(a > b for a, b in zip(steps[:10], steps[1:10], strict=False))
    np.testing.assert_allclose(steps[10:], 0.02, rtol=1e-5)
    with pytest.raises(ConfigError, match="meta_optimizer.*decay_steps"):
        config_from_dict({"meta_optimizer": {"schedule": "cosine"}})
