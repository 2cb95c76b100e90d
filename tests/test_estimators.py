"""Truncated ES, PES and full ES: bias (influence balancing), agreement with the full-horizon
gradient, antithetic symmetry, determinism, PES accumulator resets, NaN guards and schedules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2o.estimators import (
    PES,
    ConstantHorizon,
    FullES,
    GrowingLogUniformHorizon,
    LogUniformHorizon,
    TruncatedBackprop,
    TruncatedES,
    TruncatedStep,
    make_horizon_schedule,
)
from l2o.estimators.es import antithetic_unroll, combine, perturbed_pair, sample_perturbations
from l2o.io.config import config_from_dict, estimator_config
from l2o.optimizers.learned_adam import LearnedAdam
from l2o.tasks.influence import InfluenceDynamics, influence_family
from l2o.tasks.quadratic import QuadraticFamily
from l2o.training.build import estimator_from_config
from l2o.training.trainer import Trainer, init_meta_state, meta_step


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


# ------------------------------------------------------------------------------------------------
# Influence balancing (PES paper, Sec. 5.1): n = 23, 10 positive entries, θ0 = 0.5, truncation 1,
# SGD(1e-4) for 3000 meta-steps, σ = 0.1; the steady-state optimum is θ* = −1/6.


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _meta_train_theta(est, tx, iters: int, key):
    lopt = est.truncated_step.learned_opt
    theta = lopt.init(key)
    ws = est.init_worker_state(theta, key)

    def body(carry, k):
        state, ws = carry
        state, ws, _ = meta_step(est, tx, state, ws, k)
        return (state, ws), state.theta["theta"]

    _, traj = jax.lax.scan(body, (init_meta_state(theta, tx), ws), jax.random.split(key, iters))
    return traj


def test_influence_balancing_pes_is_unbiased_truncated_methods_are_not():
    lopt = InfluenceDynamics()
    assert lopt.optimum() == pytest.approx(-1 / 6)
    ts = TruncatedStep(family=influence_family(), learned_opt=lopt, num_steps=10**8)
    tx = optax.sgd(1e-4)
    key = jax.random.PRNGKey(3)
    # "sum": the loss of the step's result (the loss before it does not depend on θ)
    tbptt = TruncatedBackprop(ts, num_tasks=1, unroll_length=1, meta_loss_reduction="sum")
    es = TruncatedES(ts, num_tasks=100, unroll_length=1, std=0.1)
    pes = PES(ts, num_tasks=100, unroll_length=1, std=0.1)
    final = {name: float(_meta_train_theta(est, tx, 3000, key)[-1])
             for name, est in (("tbptt", tbptt), ("es", es), ("pes", pes))}
    assert abs(final["pes"] - (-1 / 6)) < 1e-3, final
    assert abs(final["tbptt"] - 3.26) < 0.05, final
    assert abs(final["es"] - 3.26) < 0.1, final


# ------------------------------------------------------------------------------------------------
# Agreement with the exact gradient of the full-horizon meta-loss on quadratics.

HORIZON, TRUNC, PARTICLES = 20, 5, 512


def _quadratic_step(second_derivatives: bool = False) -> TruncatedStep:
    return TruncatedStep(family=QuadraticFamily(dim=4), learned_opt=LearnedAdam(learning_rate=0.03),
                         num_steps=HORIZON, second_derivatives=second_derivatives)


@jax.jit
def _full_horizon_gradient(theta, states):
    """Exact ∇θ of the mean post-step loss over the horizon (second derivatives on)."""
    ts = _quadratic_step(second_derivatives=True)

    def loss(th):
        final_states, out = ts.unroll(th, states, jax.random.PRNGKey(0), HORIZON)
        final = jax.vmap(ts.final_loss, in_axes=(None, 0, 0))(
            th, final_states, jax.random.split(jax.random.PRNGKey(1), PARTICLES))
        post = jnp.concatenate([out.loss[1:], final[None]], axis=0)
        return post.mean()

    return jax.grad(loss)(theta)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _quadratic_pes():
    ts = _quadratic_step()
    pes = PES(ts, num_tasks=PARTICLES, unroll_length=TRUNC, std=0.01)
    return pes, ts.learned_opt.init(jax.random.PRNGKey(0))


def test_pes_and_full_es_agree_with_full_horizon_gradient():
    pes, theta = _quadratic_pes()
    ts = pes.truncated_step
    ws = pes.init_worker_state(theta, jax.random.PRNGKey(1))
    reference = flat(_full_horizon_gradient(theta, ws.pos))
    total = 0.0
    for i in range(HORIZON // TRUNC):  # one whole horizon, no restart
        g, ws, m = pes.compute_gradient_estimate(theta, ws, jax.random.PRNGKey(100 + i))
        total = total + flat(g)
        assert int(m["resets"]) == 0 and int(m["nonfinite"]) == 0
    assert _cosine(total, reference) > 0.9, (total, reference)
    # and in scale: the truncations' meta-losses (means over K steps) sum to T/K times the
    # horizon's (a mean over T steps)
    ratio = np.linalg.norm(total * TRUNC / HORIZON) / np.linalg.norm(reference)
    assert 0.75 < ratio < 1.3, ratio

    full = FullES(ts, num_tasks=PARTICLES, std=0.01, loss_type="mean")
    key = jax.random.PRNGKey(8)
    g, _, m = full.compute_gradient_estimate(theta, full.init_worker_state(theta, key), key)
    fresh = ts.init_states(theta, jax.random.split(key, 4)[0], PARTICLES)  # FullES's problems
    assert _cosine(flat(g), flat(_full_horizon_gradient(theta, fresh))) > 0.9
    assert int(m["inner_steps"]) == 2 * HORIZON * PARTICLES


# ------------------------------------------------------------------------------------------------
# Antithetic symmetry, determinism, accumulator resets.


def test_antithetic_runs_see_the_same_data_and_keys():
    from l2o.tasks.registry import make_task_family

    family = make_task_family("digits_mlp", hidden_sizes=(4,), batch_size=8)
    ts = TruncatedStep(family=family, learned_opt=LearnedAdam(learning_rate=0.01), num_steps=4)
    theta = ts.learned_opt.init(jax.random.PRNGKey(0))
    states = ts.init_states(theta, jax.random.PRNGKey(1), 3, random_offset=True)
    pairs = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), states)
    eps = sample_perturbations(theta, jax.random.PRNGKey(2), 3, 0.1)
    run = jax.jit(lambda e: antithetic_unroll(ts, perturbed_pair(theta, e), pairs,
                                              jax.random.PRNGKey(3), 6))
    zero = run(jax.tree_util.tree_map(jnp.zeros_like, eps))
    # with ε = 0 the + and − runs are the same computation: same batches, resets, keys
    np.testing.assert_array_equal(zero.post_loss[0], zero.post_loss[1])
    np.testing.assert_array_equal(zero.train_loss[0], zero.train_loss[1])
    assert zero.reset.any()  # a restart (new task and init keys) happened inside the unroll
    plus, minus = run(eps), run(jax.tree_util.tree_map(jnp.negative, eps))
    # flipping ε swaps the roles of the two runs exactly
    np.testing.assert_array_equal(plus.post_loss[0], minus.post_loss[1])
    np.testing.assert_array_equal(plus.post_loss[1], minus.post_loss[0])
    assert not np.array_equal(plus.post_loss[0], plus.post_loss[1])


def test_pes_is_deterministic_and_resets_accumulator_exactly_at_restarts():
    pes, theta = _quadratic_pes()  # the same compiled program as the agreement test
    ws = pes.init_worker_state(theta, jax.random.PRNGKey(1))
    offsets = jax.random.randint(jax.random.PRNGKey(5), (PARTICLES,), 0, HORIZON)
    ws = ws.replace(pos=ws.pos.replace(step=offsets), neg=ws.neg.replace(step=offsets))
    seen_restart = np.zeros(PARTICLES, bool)
    seen_carry = np.zeros(PARTICLES, bool)
    for i in range(5):
        key = jax.random.PRNGKey(20 + i)
        g, new, m = pes.compute_gradient_estimate(theta, ws, key)
        g2, new2, _ = pes.compute_gradient_estimate(theta, ws, key)
        np.testing.assert_array_equal(flat(g), flat(g2))
        np.testing.assert_array_equal(flat(new), flat(new2))
        old_step, new_step = np.asarray(ws.pos.step), np.asarray(new.pos.step)
        np.testing.assert_array_equal(new_step, np.asarray(new.neg.step))
        restarted = new_step <= old_step  # truncation 5 < horizon 20: a restart happened iff so
        assert int(m["resets"]) == restarted.sum()
        eps = sample_perturbations(theta, jax.random.split(key)[0], PARTICLES, pes.std)
        for name in theta:
            want = np.where(restarted, 0.0, np.asarray(ws.accum[name])) + np.asarray(eps[name])
            np.testing.assert_allclose(np.asarray(new.accum[name]), want, rtol=1e-6, atol=1e-7)
        seen_restart |= restarted
        seen_carry |= ~restarted
        ws = new
    assert seen_restart.all() and seen_carry.all()


# ------------------------------------------------------------------------------------------------
# NaN guards.


def test_combine_drops_nonfinite_particles():
    eps = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
    coef = jnp.array([1.0, jnp.nan, 2.0])
    est, finite, count = combine([(coef, eps)])
    np.testing.assert_array_equal(np.asarray(finite), [True, False, True])
    assert int(count) == 2
    np.testing.assert_allclose(np.asarray(est["a"]), [(1 + 10) / 2, (2 + 12) / 2])
    est, _, count = combine([(jnp.full(3, jnp.inf), eps)])
    assert int(count) == 0 and np.all(np.isnan(np.asarray(est["a"])))


# ------------------------------------------------------------------------------------------------
# Schedules, config and the trainer.


def test_horizon_schedules():
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    sched = LogUniformHorizon(10, 1000)
    h = np.asarray(jax.vmap(sched.sample)(keys))
    assert h.min() >= 10 and h.max() <= 1000 and sched.max_length == 1000
    assert 0.4 < np.mean(h < 100) < 0.6  # log-uniform: half the mass below the geometric middle
    assert int(ConstantHorizon(7).sample(keys[0])) == 7
    grow = GrowingLogUniformHorizon(5, 10, 50, 100, ramp_iterations=100)
    assert [int(b) for b in grow.bounds(0)] == [5, 10]
    assert [int(b) for b in grow.bounds(100)] == [50, 100] == [int(b) for b in grow.bounds(10**6)]
    lo, hi = grow.bounds(50)
    assert 5 < int(lo) < 50 and 10 < int(hi) < 100
    assert make_horizon_schedule("constant", 100) is None
    assert isinstance(make_horizon_schedule("log_uniform", 100), LogUniformHorizon)
    with pytest.raises(ValueError):
        make_horizon_schedule("log_uniform", 100, 10, 200)

    ts = TruncatedStep(family=QuadraticFamily(dim=2), learned_opt=LearnedAdam(),
                       num_steps=12, horizon_schedule=LogUniformHorizon(2, 12))
    theta = ts.learned_opt.init(jax.random.PRNGKey(0))
    states = ts.init_states(theta, jax.random.PRNGKey(1), 16)
    horizons = np.asarray(states.horizon)
    assert horizons.min() >= 2 and horizons.max() <= 12 and len(set(horizons.tolist())) > 1
    _, out = jax.jit(lambda s: ts.unroll(theta, s, jax.random.PRNGKey(2), 30))(states)
    first_reset = np.asarray(out.reset).argmax(axis=0)
    np.testing.assert_array_equal(first_reset, horizons)  # each restarts at its own horizon


def test_config_builds_every_estimator():
    lopt = LearnedAdam()
    family = QuadraticFamily(dim=2)
    kinds = {"tbptt": TruncatedBackprop, "es": TruncatedES, "pes": PES, "full_es": FullES}
    es_fields = {"std": 0.1, "sign_delta_loss": True, "meta_loss_split": "eval"}
    for name, cls in kinds.items():
        own = {} if name == "tbptt" else es_fields  # truncated backprop has no ES fields
        est = estimator_from_config(
            estimator_config(name=name, horizon_schedule="growing", horizon_min=5,
                             horizon_start_min=2, **own),
            family, lopt)
        assert isinstance(est, cls) and est.estimator_name == name
        assert isinstance(est.truncated_step.horizon_schedule, GrowingLogUniformHorizon)


def _pes_config(tmp_path):
    return config_from_dict({
        "run_name": "pes", "run_dir": str(tmp_path), "seed": 0, "meta_steps": 4, "log_every": 2,
        "checkpoint_every": 2, "task": {"name": "quadratic", "kwargs": {"dim": 3}},
        "optimizer": {"name": "learned_adam"},
        "estimator": {"name": "pes", "num_tasks": 4, "unroll_length": 3, "num_steps": 7,
                      "std": 0.05, "random_initial_offset": True,
                      "horizon_schedule": "log_uniform"},
        "meta_optimizer": {"learning_rate": 1e-2},
    })


def test_trainer_meta_trains_with_pes_and_resumes(tmp_path):
    cfg = _pes_config(tmp_path)
    straight = Trainer(cfg, run_dir=tmp_path / "a")
    history = straight.train()
    assert len(history) == 2 and all(np.isfinite(h["meta_loss"]) for h in history)
    half = Trainer(cfg, run_dir=tmp_path / "b")
    half.train(num_steps=2)
    resumed = Trainer(cfg, run_dir=tmp_path / "b")
    assert resumed.restore() and resumed.step == 2
    resumed.train()
    np.testing.assert_allclose(flat(resumed.state.theta), flat(straight.state.theta), rtol=1e-6)
    horizons = np.asarray(resumed.worker_state.pos.horizon)
    assert horizons.min() >= 1 and horizons.max() <= 7


def test_nonfinite_estimate_is_counted_and_never_applied(tmp_path):
    trainer = Trainer(_pes_config(tmp_path), run_dir=tmp_path)  # same program as the test above
    state, ws = trainer.state, trainer.worker_state
    theta = dict(state.theta, log_lr=jnp.full_like(state.theta["log_lr"], 1e4))  # lr = inf
    state = state.replace(theta=theta)
    new_state, new_ws, metrics = meta_step(trainer.estimator, trainer.meta_tx, state, ws,
                                           jax.random.PRNGKey(2))
    assert int(metrics["nonfinite"]) == 1 and int(metrics["nonfinite_particles"]) == 4
    assert not bool(metrics["grad_finite"])
    np.testing.assert_array_equal(flat(new_state.theta), flat(state.theta))
    np.testing.assert_array_equal(flat(new_state.opt_state), flat(state.opt_state))
    assert int(new_state.version) == 0
    # the diverged problems restart (pairs and accumulators with them) at the next step
    assert np.all(np.asarray(new_ws.pos.step) >= np.asarray(new_ws.pos.horizon))
    assert np.all(np.asarray(new_ws.neg.step) >= np.asarray(new_ws.neg.horizon))
