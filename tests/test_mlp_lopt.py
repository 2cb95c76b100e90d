"""Tests of the per-parameter MLP optimizers (mlp, factored_mlp, rnn_mlp) and the sampled and
reparameterized task families."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_tree_allclose, assert_tree_equal

from l2o.estimators.truncated_step import TruncatedStep
from l2o.io.config import config_from_dict
from l2o.optimizers import (
    OPTIMIZERS,
    FactoredMLPLOpt,
    MLPLOpt,
    RNNMLPLOpt,
    as_gradient_transformation,
    make_learned_optimizer,
)
from l2o.optimizers.factored_mlp import factored_shape
from l2o.optimizers.mlp_lopt import SlabLayout, _step_dots, init_mlp, mlp_step
from l2o.tasks.augment import ReparamFamily
from l2o.tasks.datasets import load_digits
from l2o.tasks.quadratic import QuadraticFamily
from l2o.tasks.registry import make_task_family
from l2o.tasks.sampled import SampledMLPFamily
from l2o.training.trainer import Trainer

KEY = jax.random.PRNGKey(0)
# small hidden layers keep compile times short; the defaults are exercised by test_registered
# and the benchmark
LOPTS = {"mlp": MLPLOpt(hidden_sizes=(8,)), "factored_mlp": FactoredMLPLOpt(hidden_sizes=(8,)),
         "rnn_mlp": RNNMLPLOpt(hidden_sizes=(8,), lstm_units=8),
         "mlp_two_layers": MLPLOpt(hidden_sizes=(8, 8))}


def _params():
    return {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.array([0.5, -0.5, 0.0, 1.0]),
            "s": jnp.array(2.0)}


def _loss(params):
    return (jnp.sum((params["w"] - 0.3) ** 2) + jnp.sum(jnp.sin(params["b"]) ** 2)
            + params["s"] ** 2)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_registered():
    p, g = _params(), jax.grad(_loss)(_params())
    for name, cls in (("mlp", MLPLOpt), ("factored_mlp", FactoredMLPLOpt),
                      ("rnn_mlp", RNNMLPLOpt)):
        assert OPTIMIZERS[name] is cls
        lopt = make_learned_optimizer(name)
        assert isinstance(lopt, cls) and lopt.name == name
        opt = lopt.opt_fn(lopt.init(KEY))
        new = jax.jit(opt.update)(opt.init(p), g)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(new))


def test_slab_layout_round_trip():
    p = _params()
    lay = SlabLayout.of(p)
    assert lay.total == 17 and lay.num_tensors == 3
    flat = lay.flatten(p)
    back = lay.apply_step(p, jnp.zeros_like(flat))
    assert_tree_equal(back, p)
    means = lay.tensor_mean(flat[None])
    np.testing.assert_allclose(means[0], [jnp.mean(p["b"]), 2.0, jnp.mean(p["w"])], rtol=1e-6)
    assert lay.expand(means).shape == (1, 17)
    assert factored_shape((3, 4)) == (3, 4) and factored_shape((4,)) is None
    assert factored_shape((2, 1, 5)) == (2, 5) and factored_shape((1, 7)) is None


def test_fused_step_matches_matmul_form():
    net = init_mlp(KEY, 7, (32,), 11, out_scale=1.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 40))
    emb, skip, bias = jnp.full((11,), 0.3), jnp.arange(7.0) / 7, jnp.linspace(-1, 1, 32)

    def fused(net, skip, x):
        return mlp_step(net, skip, x, emb, 0.1, 0.01, first_bias=bias)

    def ref(net, skip, x):
        b1 = net["layers"][0]["b"] + emb @ net["time"] + bias
        return _step_dots((net["layers"][0]["w"], net["out"]["w"]), (b1, net["out"]["b"]),
                          skip, x, 0.1, 0.01)

    np.testing.assert_allclose(fused(net, skip, x), ref(net, skip, x), rtol=1e-5, atol=1e-8)
    ga = jax.grad(lambda *a: jnp.sum(jnp.sin(100 * fused(*a))), (0, 1, 2))(net, skip, x)
    gb = jax.grad(lambda *a: jnp.sum(jnp.sin(100 * ref(*a))), (0, 1, 2))(net, skip, x)
    assert_tree_allclose(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LOPTS))
def test_one_update_shapes_finite_and_bounded(name):
    lopt = LOPTS[name]
    opt = lopt.opt_fn(lopt.init(KEY))
    p = _params()
    state = opt.init(p)
    grads = jax.grad(_loss)(p)
    new = opt.update(state, grads, loss=_loss(p))
    assert int(new.iteration) == 1
    for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(p)):
        assert a.shape == b.shape and a.dtype == b.dtype
        step = np.asarray(b - a)
        assert np.all(np.isfinite(step))
        # at init: direction ≈ the per-tensor normalized Adam direction, magnitude ≈ step_mult
        assert np.max(np.abs(step)) <= 5 * lopt.step_mult
    # descent: the first step moves against the gradient (Adam-like initialization)
    moved = jax.tree_util.tree_map(lambda a, b: a - b, new.params, p)
    dot = sum(jnp.vdot(m, g) for m, g in zip(jax.tree_util.tree_leaves(moved),
                                              jax.tree_util.tree_leaves(grads)))
    assert float(dot) < 0
    assert float(_loss(new.params)) < float(_loss(p))


@pytest.mark.parametrize("name", ["mlp", "factored_mlp", "rnn_mlp"])
def test_state_dtypes_stable_in_scan(name):
    lopt = LOPTS[name]
    theta = lopt.init(KEY)
    opt = lopt.opt_fn(theta)
    state = opt.init(_params())

    def body(s, _):
        g = jax.grad(_loss)(opt.params(s))
        return opt.update(s, g), None

    out, _ = jax.lax.scan(body, state, None, length=5)  # scan fails if the carry type changes
    assert int(out.iteration) == 5
    for a in jax.tree_util.tree_leaves(out):
        assert np.all(np.isfinite(np.asarray(a)))


@pytest.mark.parametrize("name", sorted(LOPTS))
def test_meta_gradient_finite_and_nonzero(name):
    lopt = LOPTS[name]
    theta = lopt.init(KEY)

    def meta_loss(th):
        opt = lopt.opt_fn(th)
        s = opt.init(_params())

        def body(s, _):
            loss, g = jax.value_and_grad(_loss)(opt.params(s))
            return opt.update(s, g, loss=loss), loss

        s, losses = jax.lax.scan(body, s, None, length=4)
        return jnp.mean(losses) + _loss(opt.params(s))

    grads = jax.grad(meta_loss)(theta)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(grads)]
    assert all(np.all(np.isfinite(x)) for x in leaves)
    assert sum(float(np.sum(np.abs(x))) for x in leaves) > 0
    assert np.any(np.asarray(grads["mlp"]["out"]["w"]) != 0)
    if name == "rnn_mlp":  # the LSTM's read-outs get gradient from the first step on
        assert np.any(np.asarray(grads["rnn"]["log_scale"]) != 0)


def test_rnn_mlp_matches_mlp_at_init():
    rnn = RNNMLPLOpt(hidden_sizes=(8,), lstm_units=8)
    theta = rnn.init(KEY)
    mlp_theta = {"mlp": theta["mlp"], "skip": theta["skip"]}
    p, g = _params(), jax.grad(_loss)(_params())
    a = rnn.opt_fn(theta).update(rnn.opt_fn(theta).init(p), g)
    mlp = MLPLOpt(hidden_sizes=(8,))
    b = mlp.opt_fn(mlp_theta).update(mlp.opt_fn(mlp_theta).init(p), g)
    assert_tree_allclose(a.params, b.params, rtol=1e-6, atol=1e-8)


def test_optax_bridge_with_mlp_lopt():
    lopt = MLPLOpt(hidden_sizes=(8,))
    tx = as_gradient_transformation(lopt, lopt.init(KEY))
    params = _params()
    opt_state = tx.init(params)
    first = float(_loss(params))

    @jax.jit
    def step(params, opt_state):
        loss, g = jax.value_and_grad(_loss)(params)
        updates, opt_state = tx.update(g, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(20):
        params, opt_state = step(params, opt_state)
    assert float(_loss(params)) < first
    assert int(opt_state.inner.iteration) == 20


def test_meta_training_mlp_lowers_meta_loss(tmp_path):
    cfg = config_from_dict({
        "run_name": "mlp-quad", "run_dir": str(tmp_path), "seed": 0,
        "meta_steps": 40, "log_every": 10, "checkpoint_every": 1000,
        "task": {"name": "quadratic", "kwargs": {"dim": 4}},
        "optimizer": {"name": "mlp", "kwargs": {"hidden_sizes": [8], "step_mult": 0.01}},
        "estimator": {"name": "tbptt", "num_tasks": 8, "unroll_length": 10, "num_steps": 40},
        "meta_optimizer": {"learning_rate": 3e-2},
    })
    history = Trainer(cfg).train()
    first, last = history[0]["meta_loss"], history[-1]["meta_loss"]
    assert np.isfinite(last)
    assert last < 0.8 * first, (first, last)


# -- task families ----------------------------------------------------------------------------


def test_sampled_family_configs_differ_and_vmap(digits):
    fam = SampledMLPFamily(data=digits)
    cfgs = jax.device_get(jax.jit(jax.vmap(fam.sample))(jax.random.split(KEY, 16)))
    combos = {(int(cfgs.width[i]), int(cfgs.depth[i]), int(cfgs.activation[i]),
               int(cfgs.batch_size[i])) for i in range(16)}
    assert len(combos) > 4
    assert set(cfgs.width.tolist()) <= set(fam.widths)
    assert set(cfgs.batch_size.tolist()) <= set(fam.batch_sizes)
    # the registry entry builds such a family; vmapped TruncatedStep unrolls (with resets, i.e.
    # configurations sampled under jit) give finite losses
    fam2 = make_task_family("sampled_mlp", widths=[8, 16], depths=[1, 2])
    ts = TruncatedStep(family=fam2, learned_opt=MLPLOpt(hidden_sizes=(8,)), num_steps=2)
    theta = ts.learned_opt.init(KEY)

    @jax.jit
    def run(th, key):
        states = ts.init_states(th, key, 4)
        return ts.unroll(th, states, key, 5)

    states, out = run(theta, KEY)
    assert out.loss.shape == (5, 4) and np.all(np.isfinite(np.asarray(out.loss)))
    assert bool(np.any(np.asarray(out.reset)))


def test_sampled_masking_matches_small_network(digits):
    fam = SampledMLPFamily(data=digits, widths=(4, 8), depths=(1, 2))
    cfg = fam.sample(KEY).replace(width=jnp.int32(4), depth=jnp.int32(1),
                                  activation=jnp.int32(0), batch_size=jnp.int32(32))
    task = fam.task(cfg)
    params = jax.jit(task.init)(KEY)
    batch = jax.jit(task.sample_batch)(KEY)
    loss, g = jax.jit(jax.value_and_grad(task.loss))(params, batch)
    # masked units and the skipped layer get no gradient
    assert np.all(np.asarray(g["layer_0"]["w"])[:, 4:] == 0)
    assert np.all(np.asarray(g["layer_1"]["w"]) == 0)
    # the loss only uses the first batch_size examples
    x, y = batch["x"][:32], batch["y"][:32]
    h = jax.nn.relu(x.reshape(32, -1) @ params["layer_0"]["w"][:, :4] + params["layer_0"]["b"][:4])
    logits = h @ params["readout"]["w"][:4] + params["readout"]["b"]
    ref = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_sampled_layernorm_matches_small_network_and_none_ignores_its_tensors(digits):
    from l2o.suite.tasks import layer_norm

    fam = SampledMLPFamily(data=digits, widths=(4, 8), depths=(1, 2), norms=("none", "layernorm"))
    cfg = fam.sample(KEY).replace(width=jnp.int32(4), depth=jnp.int32(1), norm=jnp.int32(1),
                                  activation=jnp.int32(0), batch_size=jnp.int32(32))
    task = fam.task(cfg)
    params = jax.jit(task.init)(KEY)
    params["layer_0"]["offset"] = params["layer_0"]["offset"] + 0.3  # not the identity
    # masked units must not reach the readout, whatever its weights from them
    params["readout"]["w"] = params["readout"]["w"].at[4:].set(1.0)
    batch = jax.jit(task.sample_batch)(KEY)
    loss, g = jax.jit(jax.value_and_grad(task.loss))(params, batch)
    assert np.all(np.asarray(g["layer_0"]["scale"])[4:] == 0)
    assert np.any(np.asarray(g["layer_0"]["scale"])[:4] != 0)
    # layer norm over the four active units only, then relu and the readout
    x, y = batch["x"][:32], batch["y"][:32]
    lay = jax.tree_util.tree_map(lambda v: v[..., :4], params["layer_0"])
    h = jax.nn.relu(layer_norm(x.reshape(32, -1) @ lay["w"] + lay["b"], lay["scale"],
                               lay["offset"]))
    logits = h @ params["readout"]["w"][:4] + params["readout"]["b"]
    ref = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    np.testing.assert_allclose(loss, ref, rtol=1e-4)
    # the same problem without the norm: its scale/offset get no gradient
    g_none = jax.grad(fam.task(cfg.replace(norm=jnp.int32(0))).loss)(params, batch)
    assert np.all(np.asarray(g_none["layer_0"]["scale"]) == 0)
    assert np.all(np.asarray(g_none["layer_0"]["offset"]) == 0)
    with pytest.raises(ValueError, match="norms"):
        SampledMLPFamily(data=digits, norms=("batchnorm",))


def test_reparam_loss_is_base_loss():
    base = QuadraticFamily(dim=5)
    fam = ReparamFamily(base=base, min_scale=1e-2, max_scale=1e2)
    cfg = fam.sample(KEY)
    task = fam.task(cfg)
    base_task = base.task(cfg.base)
    p = base_task.init(KEY)
    scaled = jax.tree_util.tree_map(lambda x, s: x / s, p, cfg.scales)
    np.testing.assert_allclose(task.loss(scaled, ()), base_task.loss(p, ()), rtol=1e-5)
    q0 = task.init(KEY)  # init is the base init divided by the scales
    np.testing.assert_allclose(q0["x"], p["x"] / cfg.scales["x"], rtol=1e-6)
    s = float(cfg.scales["x"])
    assert 1e-2 <= s <= 1e2
    # different keys, different scales; vmapped sampling works
    scales = jax.vmap(fam.sample)(jax.random.split(KEY, 8)).scales["x"]
    assert len(set(np.asarray(scales).tolist())) == 8


def test_reparam_registry_wraps_sampled_mlp():
    fam = make_task_family("reparam", task="sampled_mlp",
                           task_kwargs={"widths": [8], "depths": [1]})
    cfgs = jax.vmap(fam.sample)(jax.random.split(KEY, 3))
    assert set(cfgs.scales) == {"layer_0", "readout"}
    task = fam.task(jax.tree_util.tree_map(lambda x: x[0], cfgs))
    params = task.init(KEY)
    assert np.isfinite(float(task.loss(params, task.sample_batch(KEY))))
