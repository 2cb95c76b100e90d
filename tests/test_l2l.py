"""The L2L suite: problems, mixed routing, the λ optimizers, evaluation flags and presets."""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_tree_allclose

from l2o.io.checkpoints import read_checkpoint
from l2o.io.config import PRESETS, config_from_dict, preset
from l2o.optimizers.baselines import adam
from l2o.optimizers.lambda_blend import FixedLambdaLOpt, LearnedLambdaLOpt
from l2o.optimizers.lstm import LSTMLearnedOptimizer
from l2o.optimizers.mixed import MixedOptimizer
from l2o.tasks.cifar import load_cifar10
from l2o.tasks.datasets import DataNotFoundError
from l2o.tasks.registry import make_task_family
from l2o.training.build import (
    estimator_from_config,
    learned_optimizer_from_config,
    task_family_from_config,
)
from l2o.training.trainer import Trainer

SMALL = {"layers": (6, 6)}


def _run(opt, params, grad_fn, steps):
    state = opt.init(params)
    for _ in range(steps):
        state = opt.update(state, grad_fn(opt.params(state)))
    return opt.params(state)


def _quadratic_problem():
    params = {"a": jnp.array([1.0, -2.0, 0.5]), "b": {"w": jnp.ones((2, 2))}}
    target = jax.tree_util.tree_map(lambda p: 0.3 * jnp.ones_like(p), params)
    loss = lambda p: sum(jnp.sum((x - t) ** 2 * (i + 1)) for i, (x, t) in enumerate(
        zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target), strict=True)))
    return params, jax.grad(loss)


# --- simple-multi and MixedOptimizer ---------------------------------------------------------

def test_simple_multi_routes_one_variable_to_adam():
    task = make_task_family("simple_multi").sample_task(jax.random.PRNGKey(0))
    params = task.init(jax.random.PRNGKey(0))
    assert float(task.loss(params)) == 2.0
    lstm = LSTMLearnedOptimizer(**SMALL)
    lopt = MixedOptimizer(learned=lstm, fallback=adam(0.1), learned_paths="^x_0$")
    theta = lopt.init(jax.random.PRNGKey(1))
    assert jax.tree_util.tree_structure(theta) == jax.tree_util.tree_structure(
        lstm.init(jax.random.PRNGKey(1)))
    grad = jax.grad(task.loss)
    got = _run(lopt.opt_fn(theta), params, grad, 5)
    # x_1 follows optax.adam(0.1) alone, x_0 the LSTM alone (the loss is separable)
    tx, p = optax.adam(0.1), {"x_1": params["x_1"]}
    s = tx.init(p)
    for _ in range(5):
        u, s = tx.update(jax.grad(lambda q: q["x_1"] ** 2)(p), s, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(got["x_1"], p["x_1"], rtol=1e-6)
    x0 = _run(lstm.opt_fn(theta), {"x_0": params["x_0"]}, jax.grad(lambda q: q["x_0"] ** 2), 5)
    np.testing.assert_allclose(got["x_0"], x0["x_0"], rtol=1e-6)
    assert float(got["x_1"]) < 1.0


# --- λ optimizers ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda lam: FixedLambdaLOpt(lam=lam, learning_rate=0.05, **SMALL),
    lambda lam: LearnedLambdaLOpt(learning_rate=0.05, **SMALL),
], ids=["fixed", "learned"])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_lambda_endpoints_reproduce_lstm_and_adam(make, lam):
    params, grad = _quadratic_problem()
    lopt = make(lam)
    theta = lopt.init(jax.random.PRNGKey(0))
    if isinstance(lopt, LearnedLambdaLOpt):  # saturate the λ head: λ = 1 or λ ≈ 0
        theta = {n: {**net, "lambda": {"w": net["lambda"]["w"],
                                       "b": jnp.asarray(100.0 if lam else -100.0)}}
                 for n, net in theta.items()}
    got = _run(lopt.opt_fn(theta), params, grad, 6)
    if lam == 1.0:
        lstm_theta = {n: {"lstm": net["lstm"], "out": net["out"]} for n, net in theta.items()}
        want = _run(LSTMLearnedOptimizer(**SMALL).opt_fn(lstm_theta), params, grad, 6)
    else:
        tx, want = optax.adam(0.05), params
        s = tx.init(want)
        for _ in range(6):
            u, s = tx.update(grad(want), s, want)
            want = optax.apply_updates(want, u)
    assert_tree_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_learned_lambda_shapes_and_per_coordinate_lambda():
    params, grad = _quadratic_problem()
    lopt = LearnedLambdaLOpt(initial_lambda=0.25, **SMALL)
    theta = lopt.init(jax.random.PRNGKey(0))
    head = theta["coordinatewise"]["lambda"]
    assert head["w"].shape == (6,) and head["b"].shape == ()
    opt = lopt.opt_fn(theta)
    state = opt.init(params)
    steps, lams, _, rnn = opt.blend(state, grad(params))
    assert jax.tree_util.tree_map(jnp.shape, steps) == jax.tree_util.tree_map(jnp.shape, params)
    assert jax.tree_util.tree_map(jnp.shape, lams) == jax.tree_util.tree_map(jnp.shape, params)
    np.testing.assert_allclose(np.asarray(lams["a"]), 0.25, rtol=1e-6)  # w_λ = 0 at init
    assert rnn["coordinatewise"].h[0].shape == (6, 7)  # 3 + 4 coordinates
    # with a nonzero head, λ differs between coordinates and stays in (0, 1)
    theta["coordinatewise"]["lambda"]["w"] = jnp.linspace(-3.0, 3.0, 6)
    _, lams, _, _ = lopt.opt_fn(theta).blend(state, grad(params))
    flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(lams)])
    assert np.all((flat > 0) & (flat < 1)) and np.ptp(flat) > 1e-4
    with pytest.raises(ValueError, match="lam"):
        FixedLambdaLOpt(lam=1.5)


@pytest.mark.parametrize("name", ["fixed_lambda", "learned_lambda"])
def test_lambda_meta_training_lowers_meta_loss_on_quadratics(tmp_path, name):
    cfg = config_from_dict({
        "run_name": name, "run_dir": str(tmp_path), "seed": 0, "meta_steps": 30, "log_every": 10,
        "checkpoint_every": 1000, "time_budget_s": None,
        "task": {"name": "quadratic", "kwargs": {"dim": 4}},
        "optimizer": {"name": name, "kwargs": {"layers": [8], "learning_rate": 0.01}},
        # 4 truncations per inner run: every 10-step log window mixes the same positions
        "estimator": {"num_tasks": 4, "unroll_length": 8, "num_steps": 32},
        "meta_optimizer": {"learning_rate": 3e-2},
    })
    history = Trainer(cfg).train()
    first, last = history[0]["meta_loss"], history[-1]["meta_loss"]
    assert np.isfinite(last) and last < 0.8 * first, (first, last)


# --- CIFAR-10 loader ---------------------------------------------------------------------------

def _write_cifar(folder, rng, n_train=2, n_test=3):
    folder.mkdir(parents=True)
    for name, n in [*[(f"data_batch_{i}", n_train) for i in range(1, 6)], ("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar10_loader_reads_pickle_batches(tmp_path):
    rng = np.random.default_rng(0)
    _write_cifar(tmp_path / "cifar-10-batches-py", rng)
    ds = load_cifar10(tmp_path)
    assert ds.train_x.shape == (10, 32, 32, 3) and ds.test_x.shape == (3, 32, 32, 3)
    assert ds.train_y.shape == (10,) and ds.num_classes == 10
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    img = raw[b"data"][0].reshape(3, 32, 32)  # R, G, B planes
    np.testing.assert_allclose(np.asarray(ds.train_x[0, 4, 7]), img[:, 4, 7] / 255.0, rtol=1e-6)
    assert int(ds.train_y[0]) == raw[b"labels"][0]
    family = make_task_family("cifar_multi", data_dir=str(tmp_path), channels=[4, 4],
                              kernel_size=3, batch_size=4)
    task = family.sample_task(jax.random.PRNGKey(0))
    assert set(jax.eval_shape(task.init, jax.random.PRNGKey(0))) == {"conv_0", "conv_1", "readout"}
    loss = jax.jit(lambda k: task.loss(task.init(k), task.sample_batch(k)))
    assert np.isfinite(float(loss(jax.random.PRNGKey(1))))


def test_cifar10_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("L2O_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError) as err:
        load_cifar10()
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "test_batch" in msg and "L2O_DATA_DIR" in msg
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(DataNotFoundError):  # incomplete folders are skipped
        load_cifar10()


# --- evaluation_period / best.ckpt ------------------------------------------------------------

def _eval_config(tmp_path, **extra):
    return config_from_dict({
        "run_name": "ev", "run_dir": str(tmp_path), "meta_steps": 10, "log_every": 5,
        "checkpoint_every": 1000, "time_budget_s": None,
        "task": {"name": "quadratic", "kwargs": {"dim": 3}},
        "optimizer": {"name": "lstm", "kwargs": {"layers": [4]}},
        "estimator": {"num_tasks": 2, "unroll_length": 4, "num_steps": 12},
        "eval": {"steps": 8}, **extra})


def test_best_checkpoint_follows_scripted_evaluations(tmp_path, monkeypatch):
    trainer = Trainer(_eval_config(tmp_path, evaluation_period=2))
    scores = iter([3.0, 2.0, 2.5, 1.0, 1.5])
    monkeypatch.setattr(trainer, "quick_eval", lambda: next(scores))
    thetas = {}
    real = trainer.evaluate_and_keep_best

    def spy():
        thetas[trainer.step] = jax.device_get(trainer.state.theta)
        return real()

    monkeypatch.setattr(trainer, "evaluate_and_keep_best", spy)
    trainer.train()
    assert [(e["step"], e["improved"]) for e in trainer.evaluations] == [
        (2, True), (4, True), (6, False), (8, True), (10, False)]
    tree, meta = read_checkpoint(trainer.best_checkpoint_path())
    assert meta["kind"] == "params" and meta["version"] == 8 and meta["eval_final_loss"] == 1.0
    assert meta["optimizer"]["name"] == "lstm"
    np.testing.assert_array_equal(tree["coordinatewise"]["out"]["w"],
                                  thetas[8]["coordinatewise"]["out"]["w"])
    resumed = Trainer(_eval_config(tmp_path, evaluation_period=2))
    assert resumed.restore() and resumed.best_eval == 1.0 and len(resumed.evaluations) == 5


def test_real_periodic_evaluation_writes_loadable_best(tmp_path):
    from l2o.training.job import load_theta

    trainer = Trainer(_eval_config(tmp_path, evaluation_period=5, evaluation_epochs=2))
    trainer.train()
    assert [e["step"] for e in trainer.evaluations] == [5, 10]
    assert all(np.isfinite(e["eval_final_loss"]) for e in trainer.evaluations)
    lopt, theta, meta = load_theta(trainer.best_checkpoint_path())
    best = min(trainer.evaluations, key=lambda e: e["eval_final_loss"])
    assert meta["version"] == best["step"] and lopt.name == "lstm"
    assert Trainer(_eval_config(tmp_path / "off")).evaluations == []


# --- presets ----------------------------------------------------------------------------------

L2L_PRESETS = [n for n in PRESETS if n.startswith("l2l-")]
NEEDS_FILES = {"l2l-mnist", "l2l-cifar", "l2l-cifar-multi"}


def test_l2l_presets_cover_the_suite():
    assert {"l2l-simple", "l2l-simple-multi", "l2l-quadratic", "l2l-mnist", "l2l-cifar",
            "l2l-cifar-multi", "l2l-digits-conv-multi", "l2l-fixed-lambda",
            "l2l-learned-lambda"} <= set(L2L_PRESETS)


@pytest.mark.parametrize("name", L2L_PRESETS)
def test_l2l_presets_build(name, tmp_path, monkeypatch):
    monkeypatch.setenv("L2O_DATA_DIR", str(tmp_path))  # empty: no MNIST, no CIFAR
    cfg = preset(name)
    if name in NEEDS_FILES:
        with pytest.raises(DataNotFoundError):
            task_family_from_config(cfg.task)
        return
    family = task_family_from_config(cfg.task)
    lopt = learned_optimizer_from_config(cfg.optimizer)
    est = estimator_from_config(cfg.estimator, family, lopt)
    theta = jax.eval_shape(lopt.init, jax.random.PRNGKey(0))
    task = family.sample_task(jax.random.PRNGKey(0))
    params = jax.eval_shape(task.init, jax.random.PRNGKey(1))
    state = jax.eval_shape(lambda th, p: lopt.opt_fn(th).init(p), theta, params)
    assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(params)
    assert est.unroll_length == cfg.estimator.unroll_length
    if name == "l2l-digits-conv-multi":  # conv and readout parameters go to separate nets
        assert set(theta) == {"conv", "fc"}
        sizes = [int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)]
        assert state.rnn["conv"].h[0].shape[1] + state.rnn["fc"].h[0].shape[1] == sum(sizes)
        assert state.rnn["fc"].h[0].shape[1] == 64 * 10 + 10
