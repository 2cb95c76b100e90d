"""Tests of the tasks package: losses at known points, data sampling, loaders, registry."""

from __future__ import annotations

import gzip
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2o.tasks import (
    ConvTask,
    DataNotFoundError,
    MLPTask,
    QuadraticFamily,
    SimpleTask,
    SingleTaskFamily,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    make_task_family,
    read_idx,
    write_idx,
)
from l2o.tasks.datasets import IDX_FILES, make_dataset
from l2o.tasks.registry import TASKS, describe_tasks


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _toy_dataset(n_train=40, n_test=12, shape=(8, 8)):
    """Train images all 0 with labels 0..4, test images all 1 with labels 5..9."""
    train_x = np.zeros((n_train, *shape), np.float32)
    test_x = np.ones((n_test, *shape), np.float32)
    train_y = np.arange(n_train) % 5
    test_y = 5 + np.arange(n_test) % 5
    return make_dataset(train_x, train_y, test_x, test_y, name="toy", scale=1.0, num_classes=10)


# --- losses at known points -------------------------------------------------------------------


def test_quadratic_zero_at_solution():
    fam = QuadraticFamily(dim=10)
    task = fam.task(fam.sample(jax.random.key(0)))
    x_star = np.linalg.solve(np.asarray(task.w, np.float64), np.asarray(task.y, np.float64))
    loss = jax.jit(task.loss)
    assert float(loss({"x": jnp.asarray(x_star, jnp.float32)})) == pytest.approx(0.0, abs=1e-6)
    assert float(loss({"x": jnp.asarray(x_star + 1.0, jnp.float32)})) > 1e-2


def test_simple_loss():
    task = SimpleTask()
    params = task.init(jax.random.key(0))
    assert params["x"].shape == ()
    assert float(params["x"]) == 1.0
    assert float(task.loss(params, ())) == 1.0
    assert float(task.loss({"x": jnp.asarray(3.0)}, ())) == 9.0
    assert float(jax.grad(lambda p: task.loss(p, ()))(params)["x"]) == 2.0


def _zeros_like(tree):
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


@pytest.mark.parametrize("cls", [MLPTask, ConvTask])
def test_zero_params_give_log_num_classes(digits, cls):
    task = cls(data=digits, batch_size=16)
    loss = jax.jit(lambda t, k: t.loss(_zeros_like(t.init(k)), t.sample_batch(k)))
    np.testing.assert_allclose(float(loss(task, jax.random.key(1))), math.log(10), rtol=1e-6)


def test_mlp_loss_matches_numpy(digits):
    task = MLPTask(data=digits, hidden_sizes=(5,), activation="tanh", batch_size=7)
    params, batch, value = jax.jit(
        lambda t, k: (t.init(k), t.sample_batch(k), t.loss(t.init(k), t.sample_batch(k)))
    )(task, jax.random.key(1))
    x = np.asarray(batch["x"]).reshape(7, -1)
    h = np.tanh(x @ np.asarray(params["layer_0"]["w"]) + np.asarray(params["layer_0"]["b"]))
    z = h @ np.asarray(params["layer_1"]["w"]) + np.asarray(params["layer_1"]["b"])
    logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1)[:, None]
    expected = -logp[np.arange(7), np.asarray(batch["y"])].mean()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


# --- params and batches -----------------------------------------------------------------------


def test_init_shapes(digits):
    init = jax.jit(lambda task, key: task.init(key))
    mlp = MLPTask(data=digits, hidden_sizes=(20,))
    p = init(mlp, jax.random.key(0))
    assert jax.tree_util.tree_map(jnp.shape, p) == {
        "layer_0": {"w": (64, 20), "b": (20,)},
        "layer_1": {"w": (20, 10), "b": (10,)},
    }
    assert float(jnp.abs(p["layer_0"]["b"]).max()) == 0.0
    # LeCun scale: std of the first layer ≈ 1/sqrt(64).
    assert 0.08 < float(jnp.std(p["layer_0"]["w"])) < 0.17
    q = init(mlp, jax.random.key(1))
    assert not np.allclose(p["layer_0"]["w"], q["layer_0"]["w"])

    conv = ConvTask(data=digits, channels=(8, 16))
    p = jax.eval_shape(conv.init, jax.random.key(0))
    assert jax.tree_util.tree_map(lambda a: a.shape, p) == {
        "conv_0": {"w": (3, 3, 1, 8), "b": (8,)},
        "conv_1": {"w": (3, 3, 8, 16), "b": (16,)},
        "readout": {"w": (2 * 2 * 16, 10), "b": (10,)},
    }
    mnist_like = ConvTask(data=_toy_dataset(shape=(28, 28)))
    shapes = jax.eval_shape(mnist_like.init, jax.random.key(0))
    assert shapes["readout"]["w"].shape == (7 * 7 * 16, 10)


def test_digits_dataset(digits):
    assert digits.train_x.shape == (1438, 8, 8, 1) and digits.test_x.shape == (359, 8, 8, 1)
    assert digits.train_x.dtype == jnp.float32 and digits.train_y.dtype == jnp.int32
    assert float(digits.train_x.min()) == 0.0 and float(digits.train_x.max()) == 1.0
    assert set(np.unique(digits.test_y)) == set(range(10))
    again = load_digits()
    np.testing.assert_array_equal(digits.test_x, again.test_x)  # deterministic split


def test_batches_sampled_in_jit(digits):
    task = MLPTask(data=digits, batch_size=32)

    @jax.jit
    def sample(task, key):
        return task.sample_batch(key), task.sample_eval_batch(key)

    (b1, e1), (b2, _) = sample(task, jax.random.key(0)), sample(task, jax.random.key(1))
    assert b1["x"].shape == (32, 8, 8, 1) and b1["y"].shape == (32,)
    assert b1["y"].dtype == jnp.int32
    assert e1["x"].shape == (32, 8, 8, 1)
    assert not np.array_equal(b1["x"], b2["x"])
    # Every eval image is a row of the test split.
    test = np.asarray(digits.test_x).reshape(digits.num_test, -1)
    for row in np.asarray(e1["x"]).reshape(32, -1):
        assert np.any(np.all(test == row, axis=1))


def test_eval_batches_come_from_test_split():
    data = _toy_dataset()
    task = ConvTask(data=data, batch_size=16)
    train, ev = jax.jit(lambda t, k: (t.sample_batch(k), t.sample_eval_batch(k)))(
        task, jax.random.key(0))
    assert float(train["x"].max()) == 0.0 and int(train["y"].max()) < 5
    assert float(ev["x"].min()) == 1.0 and int(ev["y"].min()) >= 5


def test_family_passed_as_jit_argument(digits):
    fam = SingleTaskFamily(base=MLPTask(data=digits, batch_size=16))

    @jax.jit
    def loss(fam, key):
        task = fam.task(fam.sample(key))
        return task.loss(task.init(key), task.sample_batch(key))

    value = loss(fam, jax.random.key(0))
    assert np.isfinite(float(value)) and float(value) > 0.0
    # The dataset is an argument, not a constant baked into the program.
    hlo = loss.lower(fam, jax.random.key(0)).as_text()
    assert len(hlo) < 100_000
    # Vmapped over configs sampled from a family that has several tasks.
    qfam = QuadraticFamily(dim=4)

    def qloss(fam, key):
        task = fam.task(fam.sample(key))
        return task.loss(task.init(key), ())

    keys = jax.random.split(jax.random.key(0), 3)
    losses = jax.jit(jax.vmap(qloss, in_axes=(None, 0)))(qfam, keys)
    assert losses.shape == (3,) and len(set(np.asarray(losses).tolist())) == 3


def test_mlp_learns_digits(digits):
    """A few hundred SGD steps classify held-out digits far above chance."""
    task = MLPTask(data=digits, hidden_sizes=(20,), activation="relu", batch_size=64)

    @jax.jit
    def train(task, key):
        def body(p, k):
            g = jax.grad(task.loss)(p, task.sample_batch(k))
            return jax.tree_util.tree_map(lambda a, b: a - 0.2 * b, p, g), None

        p, _ = jax.lax.scan(body, task.init(key), jax.random.split(key, 200))
        return task.accuracy(p, {"x": task.data.test_x, "y": task.data.test_y})

    assert float(train(task, jax.random.key(0))) > 0.7  # chance is 0.1


def test_bad_activation(digits):
    with pytest.raises(ValueError, match="activation"):
        MLPTask(data=digits, activation="swish")


# --- IDX files and the MNIST loaders ----------------------------------------------------------


def _write_mnist_like(folder, rng, gz, n_train=6, n_test=3):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for key, base in IDX_FILES.items():
        write_idx(folder / (base + (".gz" if gz else "")), arrays[key])
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 256, (3, 4, 5), dtype=np.uint8),
                rng.standard_normal((2, 3)).astype(np.float32),
                rng.integers(-1000, 1000, (7,), dtype=np.int32)):
        path = tmp_path / ("a.idx.gz" if gz else "a.idx")
        write_idx(path, arr)
        back = read_idx(path)
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)


def test_idx_hand_written_header(tmp_path):
    # Magic 0x00000801 (ubyte, 1 dim), 3 items — the MNIST labels layout, independent of write_idx.
    data = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 0, 9])
    (tmp_path / "labels").write_bytes(data)
    (tmp_path / "labels.gz").write_bytes(gzip.compress(data))
    for name in ("labels", "labels.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), [7, 0, 9])


def test_idx_corrupt(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good"
    write_idx(good, arr)
    raw = good.read_bytes()

    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="truncated-idx3-ubyte.*length"):
        read_idx(truncated)

    bad_magic = tmp_path / "badmagic"
    bad_magic.write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(ValueError, match="badmagic.*magic"):
        read_idx(bad_magic)

    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(gzip.compress(raw)[:-6])
    with pytest.raises(ValueError, match="bad.gz"):
        read_idx(bad_gz)


def test_missing_mnist_names_files(tmp_path, monkeypatch):
    monkeypatch.setenv("L2O_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError) as info:
        load_mnist()
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for base in IDX_FILES.values():
        assert base in msg
    assert str(tmp_path / "mnist") in msg and "mnist.npz" in msg and "L2O_DATA_DIR" in msg
    # Through the registry too, and only when the task is built.
    with pytest.raises(DataNotFoundError, match="Fashion-MNIST"):
        make_task_family("fashion_mnist_mlp")


def test_load_mnist_from_idx(tmp_path, monkeypatch):
    monkeypatch.setenv("L2O_DATA_DIR", str(tmp_path))
    arrays = _write_mnist_like(tmp_path / "mnist", np.random.default_rng(1), gz=True)
    ds = load_mnist()
    assert ds.train_x.shape == (6, 28, 28, 1) and ds.test_y.shape == (3,)
    np.testing.assert_allclose(ds.train_x[..., 0], arrays["train_x"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.test_y, arrays["test_y"])
    # The registry builds the L2L MNIST MLP on it, 784-20-10.
    fam = make_task_family("mnist_mlp", batch_size=4)
    p = jax.eval_shape(fam.task(None).init, jax.random.key(0))
    assert p["layer_0"]["w"].shape == (784, 20)
    # Fashion-MNIST: plain files directly in an explicit data_dir.
    other = tmp_path / "elsewhere"
    _write_mnist_like(other, np.random.default_rng(2), gz=False, n_train=5)
    assert load_fashion_mnist(other).train_x.shape == (5, 28, 28, 1)


def test_load_mnist_from_npz(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "mnist"
    folder.mkdir()
    x = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.savez(folder / "mnist.npz", x_train=x, y_train=np.arange(4), x_test=x[:2],
             y_test=np.arange(2))
    ds = load_mnist(tmp_path)
    assert ds.train_x.shape == (4, 28, 28, 1) and ds.test_x.shape == (2, 28, 28, 1)
    np.testing.assert_array_equal(ds.train_y, np.arange(4))
    np.savez(folder / "mnist.npz", x_train=x, y_train=np.arange(4))
    with pytest.raises(ValueError, match="x_test"):
        load_mnist(tmp_path)


def test_mismatched_idx_counts(tmp_path):
    _write_mnist_like(tmp_path, np.random.default_rng(4), gz=False)
    write_idx(tmp_path / IDX_FILES["train_y"], np.zeros((5,), np.uint8))  # 6 images, 5 labels
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        load_mnist(tmp_path)


# --- registry -------------------------------------------------------------------------------


def test_registry_unknown_name():
    with pytest.raises(ValueError, match="unknown task 'nope'.*digits_mlp"):
        make_task_family("nope")


def test_registry_bad_kwargs():
    with pytest.raises(TypeError, match="'digits_mlp'.*hidden"):
        make_task_family("digits_mlp", hiden_sizes=(5,))


def test_registry_builds_and_describes():
    required = {"quadratic", "simple", "digits_mlp", "digits_mlp_relu", "digits_conv",
                "mnist_mlp", "fashion_mnist_mlp", "mnist_conv"}
    assert required <= set(TASKS)
    described = dict(describe_tasks())
    assert set(described) == set(TASKS) and all(described.values())

    fam = make_task_family("digits_mlp", hidden_sizes=[30, 12], activation="tanh", batch_size=8)
    task = fam.task(fam.sample(jax.random.key(0)))
    assert isinstance(task, MLPTask)
    assert task.hidden_sizes == (30, 12) and task.activation == "tanh"
    assert jax.eval_shape(task.sample_batch, jax.random.key(0))["x"].shape[0] == 8
    default = make_task_family("digits_mlp").task(None)
    assert default.layer_sizes == (64, 20, 10) and default.activation == "sigmoid"
    assert default.batch_size == 128
    assert make_task_family("digits_mlp_relu").task(None).activation == "relu"
    assert isinstance(make_task_family("digits_conv").task(None), ConvTask)
    assert make_task_family("quadratic", dim=3).dim == 3
    assert float(make_task_family("simple").task(None).loss({"x": jnp.asarray(2.0)})) == 4.0
    with pytest.raises(ValueError, match="batch_size"):
        make_task_family("digits_mlp", batch_size=0)
