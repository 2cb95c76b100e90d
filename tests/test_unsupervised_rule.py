"""The learned unsupervised update rule and its base model (l2o.unsupervised)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose

from l2o.optimizers.base import LearnedOptimizer
from l2o.optimizers.registry import make_learned_optimizer
from l2o.unsupervised import UPDATE_RULES, BaseModel, UnsupervisedUpdateRule, rolling_step
from l2o.unsupervised.update_rule import (
    UPDATE_TERMS,
    LowRankReadouts,
    bias_update,
    merge_update_terms,
    pass_down,
    weight_update_terms,
)

# small, non-square sizes so that a transposed matrix cannot go unnoticed
MODEL = BaseModel(input_dim=16, hidden_sizes=(10,), output_size=6, shuffle_input=True)
RULE = UnsupervisedUpdateRule(output_size=6, top_delta_size=8, top_delta_layers=1,
                              compute_h_size=8, compute_h_layers=0, delta_dim=4,
                              num_grad_channels=2, inner_lr=1e-2)
BATCH = 16

apply = jax.jit(RULE.apply, static_argnums=1)
forward = jax.jit(MODEL.forward)


def updates(theta, model, params, x):
    """The rule's update Δ of ``w`` and ``b``, read off one (jitted) application."""
    new = apply(theta, model, params, x, None)
    lr = RULE.inner_lr
    return params.replace(
        w=tuple((p * (1 - lr) - n) / lr for p, n in zip(params.w, new.w)),
        b=tuple((p * (1 - lr) - n) / lr for p, n in zip(params.b, new.b)),
        bw=tuple((p * (1 - lr) - n) / lr for p, n in zip(params.bw, new.bw)))


def _data(seed=0, batch=BATCH):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, 4, 4))


@pytest.fixture(scope="module")
def setup():
    theta = RULE.init(jax.random.PRNGKey(0))
    params = MODEL.init(jax.random.PRNGKey(1))
    return theta, params, _data()


# ---------------------------------------------------------------------------------------------
# base model


def test_base_model_shapes_and_numpy_reference(setup):
    _, params, x = setup
    sizes = (16, 10, 6)
    assert [w.shape for w in params.w] == list(zip(sizes[:-1], sizes[1:]))
    assert [w.shape for w in params.bw] == [w.shape for w in params.w]
    assert [b.shape for b in params.b] == [(n,) for n in sizes[1:]]
    assert sorted(np.asarray(params.perm).tolist()) == list(range(16))
    assert not np.array_equal(np.asarray(params.perm), np.arange(16))

    acts = forward(params, x)
    assert [a.shape for a in acts.post] == [(BATCH, n) for n in sizes]
    assert [a.shape for a in acts.pre] == [(BATCH, n) for n in sizes[1:]]
    assert MODEL.features(params, x).shape == (BATCH, 6)
    np.testing.assert_allclose(MODEL.features(params, x), acts.post[-1], rtol=1e-5, atol=1e-5)

    # independent numpy forward pass
    h = np.asarray(x, np.float64).reshape(BATCH, -1)[:, np.asarray(params.perm)]
    for i, (w, b) in enumerate(zip(params.w, params.b)):
        z = h @ np.asarray(w, np.float64)
        z = (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-6) + np.asarray(b)
        np.testing.assert_allclose(acts.pre[i], z, rtol=1e-4, atol=1e-4)
        h = np.maximum(z, 0)
    np.testing.assert_allclose(acts.post[-1], h, rtol=1e-4, atol=1e-4)

    unshuffled = BaseModel(16, (12, 10), 6).init(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(unshuffled.perm, np.arange(16))


def test_base_model_rejects_bad_input(setup):
    _, params, _ = setup
    with pytest.raises(ValueError, match="input_dim=16"):
        MODEL.forward(params, jnp.ones((8, 15)))
    with pytest.raises(ValueError, match=r"BaseParams\.w\[1\]"):
        MODEL.forward(params.replace(w=(params.w[0], params.w[1].T)), _data())
    with pytest.raises(ValueError, match="hidden_sizes"):
        BaseModel(16, (10, 0), 6)


def test_backward_weights_carry_the_error_not_the_features(setup):
    theta, params, x = setup
    other_bw = MODEL.init(jax.random.PRNGKey(7)).bw
    moved = params.replace(bw=other_bw)
    # the forward pass never reads bw
    np.testing.assert_array_equal(forward(params, x).post[-1], forward(moved, x).post[-1])
    # ... but the error sent down does: lower layers' updates change
    up, up_moved = updates(theta, MODEL, params, x), updates(theta, MODEL, moved, x)
    assert float(jnp.max(jnp.abs(up.w[0] - up_moved.w[0]))) > 1e-4
    assert float(jnp.max(jnp.abs(up.b[0] - up_moved.b[0]))) > 1e-4
    # changing only the top backward matrix changes the update of the bottom layer
    top_only = params.replace(bw=(*params.bw[:-1], other_bw[-1]))
    assert float(jnp.max(jnp.abs(up.w[0] - updates(theta, MODEL, top_only, x).w[0]))) > 1e-4


def test_pass_down_matches_numpy():
    rng = np.random.default_rng(0)
    delta, bw = rng.normal(size=(5, 7, 3)), rng.normal(size=(4, 7))
    want = np.einsum("bjc,ij->bic", delta, bw)
    want = want / np.sqrt((want ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(pass_down(jnp.asarray(delta), jnp.asarray(bw)), want,
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# one application


def test_one_application_keeps_shapes_is_finite_and_moves_everything(setup):
    theta, params, x = setup
    new = apply(theta, MODEL, params, x, None)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
    for old_leaf, new_leaf in zip(jax.tree_util.tree_leaves(params),
                                  jax.tree_util.tree_leaves(new)):
        assert old_leaf.shape == new_leaf.shape and old_leaf.dtype == new_leaf.dtype
        assert bool(jnp.all(jnp.isfinite(new_leaf)))
    for field in ("w", "b", "bw"):
        for old_leaf, new_leaf in zip(getattr(params, field), getattr(new, field)):
            assert float(jnp.max(jnp.abs(old_leaf - new_leaf))) > 1e-5, field
    np.testing.assert_array_equal(new.perm, params.perm)
    assert bool(jnp.all(jnp.isfinite(forward(new, x).post[-1])))


def test_rule_checks_output_size_and_refuses_gradients(setup):
    theta, params, x = setup
    wide = BaseModel(16, (10,), 7)
    with pytest.raises(ValueError, match="output_size"):
        RULE.apply(theta, wide, wide.init(jax.random.PRNGKey(0)), x)
    # a learned update rule, not an optimizer: no opt_fn, not among the optimizers
    assert not isinstance(RULE, LearnedOptimizer) and not hasattr(RULE, "opt_fn")
    with pytest.raises(ValueError, match="unknown optimizer 'unsupervised_rule'"):
        make_learned_optimizer("unsupervised_rule")
    with pytest.raises(ValueError, match="inner_lr"):
        UnsupervisedUpdateRule(inner_lr=0.0)
    rule = UPDATE_RULES.make("unsupervised_rule", output_size=6)
    assert isinstance(rule, UnsupervisedUpdateRule) and rule.name == "unsupervised_rule"


# ---------------------------------------------------------------------------------------------
# meta-gradient


# the largest compile of this file (float64 meta-gradient through vmap and scan): ~30-40 s CPU
@pytest.mark.slow
def test_theta_gradient_through_vmapped_applications_matches_finite_differences(setup):
    theta, _, _ = setup
    with jax.enable_x64(True):
        def f64(tree):
            return jax.tree_util.tree_map(
                lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                tree)

        # At init every bias and offset of θ is exactly 0, so ReLUs sit exactly at their kinks
        # wherever a convolution sees only dead units; move θ off them to a generic point.
        leaves, treedef = jax.tree_util.tree_flatten(f64(theta))
        keys = jax.random.split(jax.random.PRNGKey(4), 2 * len(leaves))
        th = treedef.unflatten([a + 0.05 * jax.random.normal(k, a.shape, jnp.float64)
                                for a, k in zip(leaves, keys[:len(leaves)])])
        direction = [jax.random.normal(k, a.shape, jnp.float64)
                     for a, k in zip(leaves, keys[len(leaves):])]
        norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in direction))
        direction = treedef.unflatten([v / norm for v in direction])

        # two base models (vmapped), each trained by two applications of the rule (scanned)
        p0 = f64(jax.vmap(MODEL.init)(jax.random.split(jax.random.PRNGKey(1), 2)))
        batches = jnp.stack([_data(s) for s in (1, 2)]).astype(jnp.float64)
        probe = jax.random.normal(jax.random.PRNGKey(5), (2, BATCH, 6), jnp.float64)

        def one_model(t, p, pr):
            def body(p, xb):
                return RULE.apply(t, MODEL, p, xb, None), None
            p, _ = jax.lax.scan(body, p, batches)
            return jnp.sum(MODEL.features(p, batches[0]) * pr)

        def meta_loss(t):
            return jnp.sum(jax.vmap(one_model, in_axes=(None, 0, 0))(t, p0, probe))

        value_and_grad = jax.jit(jax.value_and_grad(meta_loss))
        value, grad = value_and_grad(th)
        g_leaves = jax.tree_util.tree_leaves(grad)
        assert np.isfinite(float(value))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in g_leaves)
        assert float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in g_leaves))) > 1e-6
        # the mixing readout and the hidden-state network are reached by the meta-gradient
        assert float(jnp.max(jnp.abs(grad["forward"]["mix"]["w"]))) > 0
        assert float(jnp.max(jnp.abs(grad["hidden"]["Conv_0"]["kernel"]))) > 0
        assert float(jnp.max(jnp.abs(grad["top_delta"]["Conv_0"]["kernel"]))) > 0

        eps = 1e-6
        def shifted(sign):
            return jax.tree_util.tree_map(lambda a, v: a + sign * eps * v, th, direction)
        fd = (value_and_grad(shifted(1.0))[0] - value_and_grad(shifted(-1.0))[0]) / (2 * eps)
        analytic = sum(jnp.sum(g * v) for g, v in
                       zip(g_leaves, jax.tree_util.tree_leaves(direction)))
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# forward / backward weights


def test_forward_and_backward_updates_identical_by_default(setup):
    theta, params, x = setup
    assert "backward" not in theta
    up = updates(theta, MODEL, params, x)   # from w·(1 − lr) − Δ·lr of both matrices
    assert_tree_allclose(up.w, up.bw, rtol=1e-3, atol=1e-3)
    assert all(float(jnp.max(jnp.abs(d))) > 0.01 for d in up.w)


def test_separate_backward_updates(setup):
    _, params, x = setup
    sep = UnsupervisedUpdateRule(**{**_rule_kwargs(), "identical_updates": False})
    theta = sep.init(jax.random.PRNGKey(0))
    assert set(theta) >= {"forward", "backward"}
    sep_updates = jax.jit(sep.updates, static_argnums=1)
    up = sep_updates(theta, MODEL, params, x)
    for dw, dbw in zip(up.w, up.bw):
        assert float(jnp.max(jnp.abs(dw - dbw))) > 1e-4
    # with the backward readouts equal to the forward ones and bw = w, the two coincide
    same = {**theta, "backward": theta["forward"]}
    tied = params.replace(bw=params.w)
    up = sep_updates(same, MODEL, tied, x)
    assert_tree_allclose(up.w, up.bw, rtol=1e-5, atol=1e-6)


def test_fixed_backward_weights_are_left_alone(setup, monkeypatch):
    _, params, x = setup
    fixed = UnsupervisedUpdateRule(**{**_rule_kwargs(), "update_backward": False})
    # the rule's Δ replaced by ones: apply must step w and b and leave bw exactly as it was
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    monkeypatch.setattr(UnsupervisedUpdateRule, "updates", lambda self, *a: ones)
    new = fixed.apply({}, MODEL, params, x)
    assert_tree_allclose(new.bw, params.bw, rtol=0, atol=0)
    lr = fixed.inner_lr
    assert_tree_allclose(new.w, [w * (1 - lr) - lr for w in params.w], rtol=1e-6, atol=1e-7)
    assert_tree_allclose(new.b, [b * (1 - lr) - lr for b in params.b], rtol=1e-6, atol=1e-7)
    moving = RULE.apply({}, MODEL, params, x)
    assert_tree_allclose(moving.bw, [w * (1 - lr) - lr for w in params.bw], rtol=1e-6, atol=1e-7)


def _rule_kwargs():
    names = ("output_size", "top_delta_size", "top_delta_layers", "compute_h_size",
             "compute_h_layers", "delta_dim", "num_grad_channels", "inner_lr")
    return {n: getattr(RULE, n) for n in names}


# ---------------------------------------------------------------------------------------------
# the inner step and the update's pieces


def test_rolling_step():
    w = jnp.asarray([[1.0, -2.0], [0.5, 4.0]])
    np.testing.assert_allclose(rolling_step(w, jnp.zeros_like(w), 0.1), np.asarray(w) * 0.9,
                               rtol=1e-6)
    delta = jnp.asarray([[1.0, 1.0], [-1.0, 2.0]])
    np.testing.assert_allclose(rolling_step(w, delta, 0.1),
                               np.asarray(w) * 0.9 - np.asarray(delta) * 0.1, rtol=1e-6)


def test_readout_has_one_weight_per_named_term(setup):
    theta, params, x = setup
    assert UPDATE_TERMS == (
        "w_base", "large_decay", "decorr_x", "hebb", "order0", "rbf", "order1",
        "lin_upper_symm", "lin_upper_psd", "lin_lower_symm", "sqr_upper_symm", "sqr_lower_symm")
    assert RULE.update_terms == UPDATE_TERMS
    assert theta["forward"]["mix"]["w"].shape == (len(UPDATE_TERMS),)
    assert theta["forward"]["mix"]["b"].shape == ()

    # every term reaches the update: changing its mixing weight changes the step
    base = apply(theta, MODEL, params, x, None)
    for i, name in enumerate(UPDATE_TERMS):
        mix = {**theta["forward"]["mix"], "w": theta["forward"]["mix"]["w"].at[i].add(1.0)}
        moved = apply({**theta, "forward": {**theta["forward"], "mix": mix}}, MODEL, params, x,
                      None)
        assert float(jnp.max(jnp.abs(moved.w[0] - base.w[0]))) > 1e-6, name


def test_update_terms_match_numpy():
    rng = np.random.default_rng(1)
    n_lo, n_up, batch = 5, 4, 9
    w = rng.normal(size=(n_lo, n_up)) * 0.3
    up_x, lo_x = rng.normal(size=(batch, n_up)), rng.normal(size=(batch, n_lo))
    readouts = {"order0": rng.normal(size=(n_lo, n_up)), "rbf": rng.normal(size=(n_lo, n_up)),
                "order1": rng.normal(size=(n_lo, n_up))}
    for name, n in (("lin_upper_symm", n_up), ("lin_upper_psd", n_up),
                    ("lin_lower_symm", n_lo), ("sqr_upper_symm", n_up),
                    ("sqr_lower_symm", n_lo)):
        readouts[name] = rng.normal(size=(n, n))
    terms = weight_update_terms(jnp.asarray(w), jnp.asarray(up_x), jnp.asarray(lo_x),
                                {k: jnp.asarray(v) for k, v in readouts.items()})
    assert tuple(sorted(terms)) == tuple(sorted(UPDATE_TERMS))
    assert all(t.shape == (n_lo, n_up) for t in terms.values())

    wt = w / np.sqrt((w ** 2).mean(0, keepdims=True) + 1e-6)

    def std(a):
        a = a - a.mean(0)
        return a / np.sqrt((a ** 2).mean(0) + 1e-6)

    ux, lx = std(up_x), std(lo_x)
    cw = wt @ (ux.T @ ux / batch / np.sqrt(n_up))
    sq = np.sqrt(1 + wt ** 2) - 1
    want = {
        "w_base": wt, "large_decay": wt ** 2 * np.sign(wt),
        "decorr_x": cw / np.sqrt((cw ** 2).mean() + 1e-8), "hebb": -(lx.T @ ux) / batch,
        "order0": readouts["order0"], "rbf": np.exp(-wt ** 2) * readouts["rbf"],
        "order1": wt * readouts["order1"],
        "lin_upper_symm": wt @ readouts["lin_upper_symm"],
        "lin_upper_psd": wt @ readouts["lin_upper_psd"],
        "lin_lower_symm": readouts["lin_lower_symm"] @ wt,
        "sqr_upper_symm": np.sign(wt) * (sq @ readouts["sqr_upper_symm"]),
        "sqr_lower_symm": np.sign(wt) * (readouts["sqr_lower_symm"] @ sq),
    }
    for k in UPDATE_TERMS:
        np.testing.assert_allclose(terms[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)

    # mixing and the rules against shrinking receptive fields
    mix_w, mix_b, eps = rng.normal(size=len(UPDATE_TERMS)), 0.3, 1.0
    got = merge_update_terms(terms, {"w": jnp.asarray(mix_w), "b": jnp.asarray(mix_b)}, eps)

    def norm(t):
        return t / np.sqrt(eps + (t ** 2).mean(0, keepdims=True))

    num = len(UPDATE_TERMS)
    dw = sum(c * norm(want[k]) for c, k in zip(mix_w, UPDATE_TERMS)) / num + mix_b / num
    dw = (dw - wt * max(float((dw * wt).mean()), 0.0)) / np.sqrt(num)
    np.testing.assert_allclose(got, norm(dw) - wt / 7, rtol=1e-4, atol=1e-5)


def test_merge_never_shrinks_along_the_weights():
    # a mix that points along w̃ (so w − lr·Δ would shrink it) loses that component
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(6, 3)))
    terms = {k: w for k in UPDATE_TERMS}
    mix = {"w": jnp.ones(len(UPDATE_TERMS)), "b": jnp.zeros(())}
    dw = merge_update_terms(terms, mix, 1.0)
    wt = w / jnp.sqrt(jnp.mean(w ** 2, 0, keepdims=True) + 1e-6)
    assert float(jnp.mean(dw * wt)) < 0  # the step grows the receptive fields


def test_bias_update_matches_numpy():
    rng = np.random.default_rng(4)
    for shift in (-2.0, 2.0):
        raw = rng.normal(size=(7, 5)) + shift
        db = raw.mean(0)
        db = db - min(db.mean(), 0.0)
        want = db / np.sqrt(0.5 + (db ** 2).mean())
        np.testing.assert_allclose(bias_update(jnp.asarray(raw)), want, rtol=1e-5, atol=1e-6)
        if shift < 0:
            assert abs(float(np.mean(want))) < 1e-6


def test_low_rank_readouts_structure():
    mod = LowRankReadouts(channels=3)
    up_h = jax.random.normal(jax.random.PRNGKey(0), (10, 4, 5))
    lo_h = jax.random.normal(jax.random.PRNGKey(1), (10, 6, 5))
    variables = jax.jit(mod.init)(jax.random.PRNGKey(2), up_h, lo_h)
    out = jax.jit(mod.apply)(variables, up_h, lo_h)
    assert out["order0"].shape == (6, 4)
    for name in ("lin_upper_symm", "sqr_upper_symm", "lin_lower_symm", "sqr_lower_symm"):
        m = np.asarray(out[name])
        np.testing.assert_allclose(m, m.T, atol=1e-6)
        np.testing.assert_array_equal(np.diag(m), 0)
    psd = np.asarray(out["lin_upper_psd"], np.float64)
    assert np.linalg.eigvalsh((psd + psd.T) / 2).min() > -1e-5
    # the zeroth-order readout is the batch contraction of two linear maps (slot 0 of each)
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    r_b = np.asarray(lo_h) @ p["lower_maps"][:, 0] + p["lower_bias"][0]
    r_t = np.asarray(up_h) @ p["upper_maps"][:, 0] + p["upper_bias"][0]
    np.testing.assert_allclose(out["order0"], np.einsum("big,bjg->ij", r_b, r_t) / (3 * 10),
                               rtol=1e-4, atol=1e-5)
