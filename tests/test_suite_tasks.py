"""The held-out suite's tasks (l2o.suite.tasks): determinism, splits, traceability, fingerprints."""

from __future__ import annotations

import dataclasses
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2o.suite import tasks as T
from l2o.suite.base import METRICS, SuiteTask

REQUIRED = {"wine_mlp", "breast_cancer_mlp", "iris_mlp", "mnist1d_mlp", "mnist1d_conv",
            "digits_conv", "digits_autoencoder", "deep_relu_layernorm", "text_lm",
            "logistic_regression", "ill_conditioned_quadratic", "rosenbrock"}


@pytest.fixture(scope="module")
def suite() -> list[SuiteTask]:
    return T.get_suite("heldout")


def _rows(x) -> set[bytes]:
    x = np.asarray(x)
    return {r.tobytes() for r in x.reshape(x.shape[0], -1)}


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                     jax.tree_util.tree_leaves(b), strict=True))


def test_suite_contents(suite):
    names = [st.name for st in suite]
    assert len(names) >= 12 and len(set(names)) == len(names)
    assert REQUIRED <= set(names)
    horizons = [st.horizon for st in suite]
    assert any(h <= 500 for h in horizons) and any(h >= 1000 for h in horizons)
    for st in suite:
        assert st.metric in METRICS and st.kind and st.description
        assert (st.metric == "accuracy") == isinstance(st.test_metric_fn, T.FixedBatchAccuracy)
    metric = {st.name: st.metric for st in suite}
    assert metric["wine_mlp"] == metric["mnist1d_conv"] == "accuracy"
    assert metric["text_lm"] == metric["digits_autoencoder"] == metric["rosenbrock"] == "loss"
    assert isinstance(T.SUITE_VERSION, str) and T.SUITE_VERSION


def test_unknown_names_are_clear_errors(suite):
    with pytest.raises(ValueError, match="unknown suite 'nope'.*heldout"):
        T.get_suite("nope")
    with pytest.raises(ValueError, match="unknown suite task 'nope'.*wine_mlp.*rosenbrock"):
        T.suite_task("heldout", "nope")
    assert T.suite_task("heldout", "iris_mlp").name == "iris_mlp"
    assert T.suite_task(suite, "text_lm") is T.suite_task("heldout", "text_lm")


def test_splits_are_disjoint_standardized_and_small(suite):
    for st in suite:
        task = st.task
        if st.name == "text_lm":
            continue
        if st.name == "rosenbrock":
            assert task.sample_batch(jax.random.PRNGKey(0)) == ()
            continue
        data = task.data
        assert data.num_train > 0 and data.num_test > 0
        assert not _rows(data.train_x) & _rows(data.test_x), st.name
        assert len(_rows(data.train_x)) == data.num_train, st.name  # no duplicates either
        assert st.train_loss_fn.batch["x"].shape[0] == min(data.num_train, T.TRAIN_EVAL_SIZE)
        assert st.test_metric_fn.batch["x"].shape[0] <= T.EVAL_SIZE
        assert _rows(st.train_loss_fn.batch["x"]) <= _rows(data.train_x), st.name
        assert _rows(st.test_metric_fn.batch["x"]) <= _rows(data.test_x), st.name
        if st.name != "ill_conditioned_quadratic":  # its scaling is the point
            x = np.asarray(data.train_x, np.float64)
            assert abs(x.mean()) < 1e-4 and abs(x.std() - 1.0) < 1e-3, st.name


def test_text_split_is_disjoint_text(suite):
    assert not set(T.TEXT_TRAIN_FILES) & set(T.TEXT_TEST_FILES)
    task = T.suite_task(suite, "text_lm").task
    train, test = np.asarray(task.train_tokens), np.asarray(task.test_tokens)
    assert train.size > 50_000 and test.size > 10_000
    assert train.max() < task.vocab_size and test.max() < task.vocab_size
    # Hardly any 48-byte chunk of the test text occurs in the training text.
    train_text = train.astype(np.uint8).tobytes()
    chunks = [test[i:i + 48].astype(np.uint8).tobytes() for i in range(0, test.size - 48, 48)]
    shared = sum(c in train_text for c in chunks)
    assert shared / len(chunks) < 0.02


def test_flat_init_mlp_equals_mlp_task(suite):
    from l2o.tasks.mlp import MLPTask

    fast = T.suite_task(suite, "iris_mlp").task
    slow = MLPTask(data=fast.data, hidden_sizes=fast.hidden_sizes, activation=fast.activation,
                   batch_size=fast.batch_size, num_classes=fast.num_classes)
    both = jax.jit(lambda k: (fast.init(k), slow.init(k)))(jax.random.PRNGKey(7))
    assert jax.tree_util.tree_structure(both[0]) == jax.tree_util.tree_structure(both[1])
    assert _leaves_equal(*both)


def test_matmul_convolutions_match_lax():
    rng = np.random.default_rng(0)

    @jax.jit
    def conv1d(x, w, stride=2):
        ref = jax.lax.conv_general_dilated(x, w, (stride,), "SAME",
                                           dimension_numbers=("NWC", "WIO", "NWC"))
        return T.conv1d_same(x, w, stride), ref

    @jax.jit
    def conv2d_and_pool(x, w):
        ref = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        pool = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                     "VALID")
        return T.conv2d_same(x, w), ref, T.max_pool_2x2(x), pool

    for length, k, c, o in [(40, 3, 8, 16), (7, 4, 3, 2)]:  # odd/even kernel, uneven padding
        mine, ref = conv1d(rng.standard_normal((3, length, c)), rng.standard_normal((k, c, o)))
        np.testing.assert_allclose(mine, ref, atol=1e-4)
    for k in (3, 2):
        out = conv2d_and_pool(rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((k, k, 3, 4)))
        np.testing.assert_allclose(out[0], out[1], atol=1e-4)
        np.testing.assert_array_equal(out[2], out[3])


def test_digits_test_split_is_load_digits_test_split():
    from sklearn.datasets import load_digits as sk_digits

    from l2o.tasks.datasets import load_digits

    tx, _, vx, vy = T.digits_split()
    ref = load_digits()
    raw = sk_digits().images.astype(np.float64)
    train_raw = raw[: ref.num_train]
    undone = np.asarray(vx, np.float64) * train_raw.std() + train_raw.mean()
    np.testing.assert_allclose(undone, np.asarray(ref.test_x) * 16.0, atol=1e-4)
    np.testing.assert_array_equal(vy, np.asarray(ref.test_y))
    assert tx.shape[0] == ref.num_train


@pytest.mark.parametrize("name", [st.name for st in T.get_suite("heldout")])
def test_deterministic_finite_and_vmappable(suite, name):
    st = T.suite_task(suite, name)

    @jax.jit
    @jax.vmap
    def run(key):
        params = st.task.init(key)
        batch = st.task.sample_batch(jax.random.fold_in(key, 1))
        return (params, batch), (st.task.loss(params, batch), st.train_loss(params),
                                 st.test_metric(params))

    keys = jnp.stack([jax.random.PRNGKey(3), jax.random.PRNGKey(4)])
    drawn, values = run(keys)
    again, _ = run(keys[::-1])
    first, second = (jax.tree_util.tree_map(lambda a, i=i: a[i], drawn) for i in range(2))
    assert _leaves_equal(first, jax.tree_util.tree_map(lambda a: a[1], again))  # same key
    assert not _leaves_equal(first[0], second[0])  # init depends on the key
    if st.name != "rosenbrock":  # the only task without data
        assert not _leaves_equal(first[1], second[1])
    for v in values:
        assert v.shape == (2,) and bool(jnp.all(jnp.isfinite(v)))
    if st.metric == "accuracy":
        assert bool(jnp.all((values[2] >= 0) & (values[2] <= 1)))


def _adam_curve(st: SuiteTask, lr: float, steps: int) -> tuple[float, float]:
    opt = optax.adam(lr)

    @jax.jit
    def run(key):
        params = st.task.init(key)

        def step(carry, k):
            p, s = carry
            grads = jax.grad(st.task.loss)(p, st.task.sample_batch(k))
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (final, _), _ = jax.lax.scan(step, (params, opt.init(params)),
                                     jax.random.split(jax.random.fold_in(key, 1), steps))
        return st.train_loss(params), st.train_loss(final)

    before, after = run(jax.random.PRNGKey(0))
    return float(before), float(after)


@pytest.mark.parametrize("name,lr,steps", [("wine_mlp", 1e-2, 30),
                                           ("ill_conditioned_quadratic", 3e-2, 50),
                                           ("rosenbrock", 3e-2, 50)])
def test_adam_reduces_train_loss(suite, name, lr, steps):
    before, after = _adam_curve(T.suite_task(suite, name), lr, steps)
    assert np.isfinite(after) and after < 0.8 * before, (before, after)


def test_fingerprint_tracks_version_and_data(suite, monkeypatch):
    fps = [T.task_fingerprint(st) for st in suite]
    assert all(re.fullmatch(r"[0-9a-f]{64}", f) for f in fps) and len(set(fps)) == len(fps)
    assert fps == [T.task_fingerprint(st) for st in T.get_suite("heldout")]

    st = T.suite_task(suite, "wine_mlp")
    data = st.task.data
    changed = dataclasses.replace(
        st, task=st.task.replace(data=data.replace(test_x=data.test_x.at[0, 0].add(1.0))))
    assert T.task_fingerprint(changed) != T.task_fingerprint(st)
    assert T.task_fingerprint(dataclasses.replace(st, horizon=st.horizon + 1)) \
        != T.task_fingerprint(st)
    wider = dataclasses.replace(st, task=st.task.replace(hidden_sizes=(33,)))
    assert T.task_fingerprint(wider) != T.task_fingerprint(st)

    lm = T.suite_task(suite, "text_lm")
    tokens = lm.task.train_tokens
    other_text = dataclasses.replace(lm, task=lm.task.replace(train_tokens=tokens.at[5].set(0)))
    assert T.task_fingerprint(other_text) != T.task_fingerprint(lm)

    monkeypatch.setattr(T, "SUITE_VERSION", T.SUITE_VERSION + "-next")
    assert T.task_fingerprint(st) != fps[0]


def test_rebuild_is_deterministic_and_keeps_global_rng(suite):
    before = [T.task_fingerprint(st) for st in suite]
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    for cached in (T._heldout_tasks, T.mnist1d_split, T.digits_split, T.text_split,
                   T.sklearn_split, T.classification_split, T.least_squares_split):
        cached.cache_clear()
    rebuilt = T.get_suite("heldout")
    assert np.random.rand() == expected_np and random.random() == expected_py
    assert [T.task_fingerprint(st) for st in rebuilt] == before
    assert rebuilt[0] is not suite[0]
