"""The hierarchical RNN optimizer, its simpler relatives, and its meta-training problem set."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2o.evaluation.comparison import loss_curves
from l2o.io.checkpoints import checkpoint_path
from l2o.io.config import MetaOptimizerConfig, config_from_dict, estimator_config, preset
from l2o.optimizers.registry import make_learned_optimizer
from l2o.tasks.problem_set import DIM, HALF, KINDS, ProblemSetFamily, ProblemSetTask
from l2o.tasks.quadratic import QuadraticFamily
from l2o.tasks.registry import make_task_family
from l2o.training.build import estimator_from_config, meta_optimizer_from_config
from l2o.training.job import load_theta
from l2o.training.trainer import Trainer, init_meta_state, meta_step

NEW = ("hierarchical_rnn", "coordinatewise_rnn", "learned_lr_sgd", "learned_momentum")


def _tree():
    return {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.zeros((4,))}


def _grads():
    return {"w": jnp.linspace(-1.0, 2.0, 12).reshape(3, 4), "b": jnp.asarray([0.5, -0.5, 1.0, 0.0])}


@pytest.mark.parametrize("name", NEW)
def test_one_update_shapes_and_finite(name):
    lopt = make_learned_optimizer(name)
    theta = lopt.init(jax.random.PRNGKey(0))
    opt = lopt.opt_fn(theta)
    state = opt.init(_tree())
    new = jax.jit(opt.update)(state, _grads())
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.all(np.isfinite(np.asarray(a)))
    assert int(new.iteration) == 1
    step = jax.tree_util.tree_map(lambda p, q: p - q, state.params, opt.params(new))
    g = _grads()
    if name == "learned_lr_sgd":
        np.testing.assert_allclose(step["w"], 1e-2 * g["w"], rtol=1e-5)
    elif name == "learned_momentum":
        newer = jax.jit(opt.update)(new, g)
        step2 = opt.params(new)["w"] - opt.params(newer)["w"]
        np.testing.assert_allclose(step2, 1e-2 * (0.9 * g["w"] + g["w"]), rtol=1e-5)
    else:
        # untrained: close to lr 1e-3 × sign(g) on the first step (normalized momentum)
        nz = np.asarray(g["w"]) != 0
        s = np.asarray(step["w"])[nz]
        assert np.all(np.sign(s) == np.sign(np.asarray(g["w"])[nz]))
        np.testing.assert_allclose(np.abs(s), 1e-3, rtol=0.3)


def test_hierarchy_levels_in_theta():
    h = make_learned_optimizer("hierarchical_rnn").init(jax.random.PRNGKey(0))
    c = make_learned_optimizer("coordinatewise_rnn").init(jax.random.PRNGKey(0))
    assert {"tensor", "global", "down"} <= set(h)
    assert not {"tensor", "global", "down"} & set(c)
    assert h["param"]["wh"].shape == (10, 30) and h["tensor"]["wh"].shape == (20, 60)
    state = make_learned_optimizer("hierarchical_rnn").opt_fn(h).init(_tree())
    assert state.h.shape == (10, 16) and state.tensor_h.shape == (20, 2)
    assert state.global_h.shape == (20,)


@pytest.mark.parametrize("name", NEW)
def test_unroll_gradient_wrt_theta(name):
    lopt = make_learned_optimizer(name)
    theta = lopt.init(jax.random.PRNGKey(1))
    task = QuadraticFamily(dim=4).sample_task(jax.random.PRNGKey(2))
    params = task.init(jax.random.PRNGKey(3))

    def unroll_loss(th):
        opt = lopt.opt_fn(th)

        def body(s, _):
            loss, g = jax.value_and_grad(task.loss)(opt.params(s))
            return opt.update(s, jax.lax.stop_gradient(g)), loss

        _, losses = jax.lax.scan(body, opt.init(params), None, length=6)
        return jnp.sum(losses)

    grad = jax.grad(unroll_loss)(theta)
    leaves = jax.tree_util.tree_leaves_with_path(grad)
    for path, g in leaves:
        assert np.all(np.isfinite(np.asarray(g))), path
    norm = math.sqrt(sum(float(jnp.sum(g * g)) for _, g in leaves))
    assert norm > 0
    if name == "hierarchical_rnn":  # the upper levels reach the loss
        for key in ("tensor", "global", "down"):
            assert any(float(jnp.abs(x).sum()) > 0
                       for x in jax.tree_util.tree_leaves(grad[key])), key


def _only(kind: str, **kw) -> ProblemSetFamily:
    opts = {"noise_prob": 0.0, "rescale_prob": 0.0, "sum_prob": 0.0, **kw}
    return make_task_family("problem_set", kinds=[kind], **opts)


@jax.jit
def _sample(family, key):
    return family.sample_task(key)


@jax.jit
def _clean(task, params):
    return task.clean_loss(params)


@jax.jit
def _clean_grad(task, params):
    return jax.grad(task.clean_loss)(params)


def _point(first, second=None) -> dict:
    x = np.zeros(DIM, np.float32)
    x[:len(first)] = first
    if second is not None:
        x[HALF:HALF + len(second)] = second
    return {"x": jnp.asarray(x)}


def test_problem_losses_at_known_points():
    # one sampled config, edited per type: one compilation for all types
    cfg = _sample(make_task_family("problem_set"), jax.random.PRNGKey(4)).cfg
    cfg = cfg.replace(use_second=jnp.asarray(False), scale=jnp.asarray(1.0),
                      noise=jnp.asarray(0.0))
    first = cfg.first
    center = np.asarray(first.center)

    def loss_of(kind, x, **changes):
        c = cfg.replace(first=first.replace(kind=jnp.asarray(KINDS.index(kind), jnp.int32)),
                        **changes)
        return float(_clean(ProblemSetTask(cfg=c), x))

    for kind, at, value in (("rosenbrock", [1.0, 1.0], 0.0), ("beale", [3.0, 0.5], 0.0),
                            ("logistic", [], math.log(2.0)), ("mlp", [], math.log(2.0)),
                            ("quadratic", center[:10], 0.0), ("bowl", center[:2], 0.0)):
        np.testing.assert_allclose(loss_of(kind, _point(at)), value, atol=1e-6)
    assert loss_of("quadratic", _point([])) > 0 and loss_of("bowl", _point([])) > 0
    # a sum uses both halves; a rescaled problem has its minimum at x*/scale
    both = {"second": first.replace(kind=jnp.asarray(KINDS.index("rosenbrock"), jnp.int32)),
            "use_second": jnp.asarray(True)}
    assert loss_of("rosenbrock", _point([1.0, 1.0], [1.0, 1.0]), **both) < 1e-7
    assert loss_of("rosenbrock", _point([1.0, 1.0]), **both) > 0
    s = 3.0
    assert loss_of("rosenbrock", _point([1 / s, 1 / s]), scale=jnp.asarray(s)) < 1e-6
    # sampled kinds honour the restriction
    for kind in ("beale", "mlp"):
        assert int(_sample(_only(kind), jax.random.PRNGKey(0)).cfg.first.kind) == KINDS.index(kind)


@jax.jit
def _grad(task, params, batch):
    return jax.grad(task.loss)(params, batch)


def test_unused_coordinates_have_zero_gradient():
    fam = make_task_family("problem_set")
    for i in range(6):
        task = _sample(fam, jax.random.PRNGKey(i))
        params = task.init(jax.random.PRNGKey(10 + i))
        batch = task.sample_batch(jax.random.PRNGKey(20 + i))
        g = _grad(task, params, batch)["x"]
        assert np.all(np.asarray(g)[np.asarray(task._mask()) == 0] == 0)
        assert np.all(np.isfinite(np.asarray(g)))


def test_noise_changes_gradients_not_clean_loss():
    cfg = _sample(make_task_family("problem_set"), jax.random.PRNGKey(5)).cfg
    task = ProblemSetTask(cfg=cfg.replace(noise=jnp.asarray(0.3)))
    noiseless = ProblemSetTask(cfg=cfg.replace(noise=jnp.asarray(0.0)))
    params = task.init(jax.random.PRNGKey(6))
    b1, b2 = (task.sample_batch(jax.random.PRNGKey(k)) for k in (7, 8))
    g1, g2 = (_grad(task, params, b)["x"] for b in (b1, b2))
    assert not np.allclose(g1, g2)
    g_clean = _clean_grad(task, params)["x"]
    eval_batch = task.sample_eval_batch(jax.random.PRNGKey(9))
    np.testing.assert_allclose(jax.jit(type(task).loss)(task, params, eval_batch),
                               _clean(task, params))
    np.testing.assert_allclose(_clean(noiseless, params), _clean(task, params))
    np.testing.assert_allclose(g1 - g_clean, 0.3 * b1["eps"] * task._mask(), rtol=1e-5,
                               atol=1e-6)


def test_meta_training_lowers_quadratic_meta_loss():
    lopt = make_learned_optimizer("hierarchical_rnn")
    est = estimator_from_config(
        estimator_config(num_tasks=4, unroll_length=8, num_steps=40), QuadraticFamily(dim=4), lopt)
    tx = meta_optimizer_from_config(MetaOptimizerConfig(name="adam", learning_rate=3e-2))
    theta = lopt.init(jax.random.PRNGKey(0))
    probe = est.init_worker_state(theta, jax.random.PRNGKey(1))
    probe_loss = jax.jit(lambda th: est.meta_loss(th, probe, jax.random.PRNGKey(2))[0])
    before = float(probe_loss(theta))
    state, worker = init_meta_state(theta, tx), est.init_worker_state(theta, jax.random.PRNGKey(3))
    for i in range(20):
        state, worker, _ = meta_step(est, tx, state, worker, jax.random.PRNGKey(100 + i))
    after = float(probe_loss(state.theta))
    assert after < 0.9 * before, (before, after)


def test_checkpoint_as_black_box_optimizer_on_unseen_task(tmp_path):
    """Meta-train briefly on the problem set, reload θ from the params checkpoint and train a
    digits MLP (a task never seen in meta-training) with it."""
    base = preset("hrnn-problem-set").model_dump()
    base.update(run_dir=str(tmp_path), run_name="bb", meta_steps=16, log_every=8,
                checkpoint_every=1000, time_budget_s=None)
    base["estimator"].update(num_tasks=4, unroll_length=5, num_steps=50, horizon_min=10)
    trainer = Trainer(config_from_dict(base))
    history = trainer.train()
    assert all(np.isfinite(h["meta_loss"]) for h in history)
    lopt, theta, meta = load_theta(checkpoint_path(tmp_path / "bb", "params", trainer.step))
    assert lopt.name == "hierarchical_rnn" and int(meta["version"]) == 16
    family = make_task_family("digits_mlp")
    task = family.task(family.sample(jax.random.PRNGKey(0)))
    curves = loss_curves(task, lopt, theta, steps=40, seeds=2, key=jax.random.PRNGKey(1))
    assert curves.shape == (2, 41) and np.all(np.isfinite(curves))
    assert curves[:, -5:].mean() < curves[:, :5].mean() - 0.05
