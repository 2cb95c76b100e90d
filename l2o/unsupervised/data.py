"""Class-balanced datasets for the unsupervised update rule, held on the device.

A :class:`BalancedData` keeps flattened images of a train and a test split plus, per split, a
table of each class's example indices, so that :meth:`BalancedData.sample_balanced` can draw
exactly ``samples_per_class`` distinct examples of every class *inside* ``jit``. Arrays are pytree
leaves (jit arguments); sizes and names are static fields.

Loaders:

- :func:`load_digits_balanced` — scikit-learn's 8×8 digits (offline, the default): 64-d inputs,
  pixels scaled from 0..16 to [0, 1]; the last 20 % in scikit-learn's order are the test split.
- :func:`load_tiny_mnist` — MNIST from the data directory (``$L2O_DATA_DIR``, see
  :mod:`l2o.tasks.datasets`; nothing is downloaded), downsampled from 28×28 to 14×14 by 2×2
  averaging: 196-d inputs in [0, 1]. Raises ``DataNotFoundError`` naming every path it tried.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from l2o.tasks.base import TaskFamily
from l2o.types import PRNGKey


@struct.dataclass
class BalancedData:
    """Train/test splits of flattened images ``[N, D]`` in [0, 1] with int32 labels ``[N]``.

    ``*_index``: ``[num_classes, max_count]`` int32, row ``c`` lists the examples of class ``c``
    (padded with its first one); ``*_count``: ``[num_classes]`` int32, how many are real.
    """

    train_x: jax.Array
    train_y: jax.Array
    test_x: jax.Array
    test_y: jax.Array
    train_index: jax.Array
    train_count: jax.Array
    test_index: jax.Array
    test_count: jax.Array
    name: str = struct.field(pytree_node=False, default="dataset")
    num_classes: int = struct.field(pytree_node=False, default=10)
    image_shape: tuple[int, ...] = struct.field(pytree_node=False, default=(8, 8))
    #: the smallest class size of each split: ``samples_per_class`` may not exceed it
    min_train_count: int = struct.field(pytree_node=False, default=0)
    min_test_count: int = struct.field(pytree_node=False, default=0)

    @property
    def input_dim(self) -> int:
        """Width of one flattened example."""
        return int(self.train_x.shape[1])

    def _split(self, split: str) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, int]:
        if split == "train":
            return (self.train_x, self.train_y, self.train_index, self.train_count,
                    self.min_train_count)
        if split == "test":
            return self.test_x, self.test_y, self.test_index, self.test_count, self.min_test_count
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def sample_balanced(self, key: PRNGKey, samples_per_class: int,
                        split: str = "train") -> tuple[jax.Array, jax.Array]:
        """``(x [C·k, D], y [C·k])``: ``k = samples_per_class`` distinct examples of each of the
        ``C`` classes of ``split``, in random order. Jit-friendly; ``k`` is static."""
        xs, ys, index, count, min_count = self._split(split)
        k = int(samples_per_class)
        if k <= 0 or k > min_count:
            raise ValueError(f"samples_per_class must be in 1..{min_count} (the smallest class "
                             f"of the {self.name} {split} split), got {samples_per_class}")
        k_pick, k_perm = jax.random.split(key)
        # k distinct slots per class: the top-k of uniform scores, padding slots scored -1
        scores = jax.random.uniform(k_pick, index.shape)
        valid = jnp.arange(index.shape[1])[None, :] < count[:, None]
        _, slots = jax.lax.top_k(jnp.where(valid, scores, -1.0), k)  # [C, k]
        idx = jnp.take_along_axis(index, slots, axis=1).reshape(-1)
        idx = jax.random.permutation(k_perm, idx)
        return jnp.take(xs, idx, axis=0), jnp.take(ys, idx, axis=0)

    def sample_batch(self, key: PRNGKey, batch_size: int,
                     split: str = "train") -> tuple[jax.Array, jax.Array]:
        """``(x, y)``: ``batch_size`` examples drawn uniformly with replacement (not balanced)."""
        xs, ys, *_ = self._split(split)
        idx = jax.random.randint(key, (int(batch_size),), 0, xs.shape[0])
        return jnp.take(xs, idx, axis=0), jnp.take(ys, idx, axis=0)

    def split_arrays(self, split: str) -> tuple[jax.Array, jax.Array]:
        """All ``(x, y)`` of ``split``."""
        xs, ys, *_ = self._split(split)
        return xs, ys


def _class_table(y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(y, minlength=num_classes)
    if np.any(counts == 0):
        raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no examples")
    table = np.zeros((num_classes, int(counts.max())), np.int32)
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        table[c, :] = members[0]
        table[c, :len(members)] = members
    return table, counts.astype(np.int32)


def make_balanced_data(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                       test_y: np.ndarray, *, name: str, image_shape: tuple[int, ...],
                       num_classes: int) -> BalancedData:
    """A :class:`BalancedData` from numpy images (any shape ``[N, ...]``, flattened here) and
    integer labels in ``0..num_classes-1``."""
    def flat(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        if x.shape[1] != int(np.prod(image_shape)):
            raise ValueError(f"{name}: images of {x.shape[1]} values do not match image_shape "
                             f"{image_shape}")
        return x

    def labels(y: np.ndarray) -> np.ndarray:
        y = np.asarray(y).reshape(-1).astype(np.int32)
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name}: labels must be in 0..{num_classes - 1}")
        return y

    tx, vx, ty, vy = flat(train_x), flat(test_x), labels(train_y), labels(test_y)
    for split, x, y in (("train", tx, ty), ("test", vx, vy)):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: {split} split has {x.shape[0]} images "
                             f"but {y.shape[0]} labels")
    t_index, t_count = _class_table(ty, num_classes)
    v_index, v_count = _class_table(vy, num_classes)
    return BalancedData(
        train_x=jnp.asarray(tx), train_y=jnp.asarray(ty), test_x=jnp.asarray(vx),
        test_y=jnp.asarray(vy), train_index=jnp.asarray(t_index),
        train_count=jnp.asarray(t_count), test_index=jnp.asarray(v_index),
        test_count=jnp.asarray(v_count), name=name, num_classes=int(num_classes),
        image_shape=tuple(int(s) for s in image_shape),
        min_train_count=int(t_count.min()), min_test_count=int(v_count.min()))


def load_digits_balanced(test_fraction: float = 0.2) -> BalancedData:
    """scikit-learn's 8×8 digits as 64-d vectors in [0, 1] (offline; see the module doc)."""
    from l2o.tasks.datasets import load_digits

    d = load_digits(test_fraction)
    return make_balanced_data(np.asarray(d.train_x), np.asarray(d.train_y),
                              np.asarray(d.test_x), np.asarray(d.test_y), name="digits",
                              image_shape=(8, 8), num_classes=10)


def downsample2x(images: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` (or ``[N, H, W, 1]``) images averaged over 2×2 blocks: ``[N, H/2, W/2]``."""
    x = np.asarray(images, np.float32)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"expected [N, H, W] images with even H and W, got {x.shape}")
    n, h, w = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def load_tiny_mnist(data_dir: str | os.PathLike | None = None) -> BalancedData:
    """MNIST at 14×14 (196-d, [0, 1]) from the data directory (``$L2O_DATA_DIR``).

    Raises :class:`~l2o.tasks.datasets.DataNotFoundError` listing the paths tried when the MNIST
    files are absent.
    """
    from l2o.tasks.datasets import load_mnist

    d = load_mnist(data_dir)
    return make_balanced_data(downsample2x(np.asarray(d.train_x)), np.asarray(d.train_y),
                              downsample2x(np.asarray(d.test_x)), np.asarray(d.test_y),
                              name="tiny_mnist", image_shape=(14, 14), num_classes=10)


# ---------------------------------------------------------------------------------------------
# The task family of the unsupervised rule


@struct.dataclass
class UnsupervisedFamily(TaskFamily):
    """What the unsupervised rule is meta-trained on: a dataset and the base model's config.

    ``data`` is a pytree field (a jit argument); the rest is static: ``model`` (a
    ``l2o.unsupervised.base_model.BaseModel``), ``batch_per_class`` (the rule sees batches of
    ``num_classes × batch_per_class`` unlabelled examples), ``samples_per_class`` (each of the
    ridge meta-objective's fit and scoring batches), ``ridge_factor`` and ``hinge_loss``.

    It is registered as a task family (``unsupervised_digits``, ``unsupervised_tiny_mnist``) so
    configs name it like any task, but it holds no gradient-trained task: base models are
    updated by the rule (``l2o.unsupervised.estimator``), so :meth:`task` raises.
    """

    data: BalancedData
    model: object = struct.field(pytree_node=False)
    batch_per_class: int = struct.field(pytree_node=False, default=10)
    samples_per_class: int = struct.field(pytree_node=False, default=10)
    ridge_factor: float = struct.field(pytree_node=False, default=0.1)
    hinge_loss: bool = struct.field(pytree_node=False, default=False)

    @property
    def name(self) -> str:
        """``unsupervised_<dataset>``."""
        return f"unsupervised_{self.data.name}"

    @property
    def batch_size(self) -> int:
        """Examples in one batch the rule is applied to."""
        return self.data.num_classes * self.batch_per_class

    def sample(self, key: PRNGKey) -> jax.Array:
        """A dummy task config (every base model sees the same data)."""
        return jnp.zeros(())

    def task(self, cfg) -> None:
        """Not available: these base models are trained by the rule, not by a gradient
        optimizer."""
        raise TypeError(f"task family {self.name!r} holds base models for the unsupervised "
                        "update rule, not gradient-trained tasks: use estimator 'unsupervised' "
                        "and optimizer 'unsupervised_rule' with it")

    def sample_task(self, key: PRNGKey) -> None:
        """Not available (see :meth:`task`)."""
        return self.task(None)

    def rule_batch(self, key: PRNGKey, split: str = "train") -> jax.Array:
        """A class-balanced batch of unlabelled inputs for one application of the rule."""
        return self.data.sample_balanced(key, self.batch_per_class, split)[0]


def unsupervised_family(dataset: str = "digits", hidden_sizes=(128, 128, 128, 128),
                        output_size: int = 32, shuffle_input: bool = False,
                        batch_per_class: int = 10, samples_per_class: int = 10,
                        ridge_factor: float = 0.1, hinge_loss: bool = False,
                        data_dir: str | None = None) -> UnsupervisedFamily:
    """An :class:`UnsupervisedFamily` on ``dataset`` (``"digits"`` or ``"tiny_mnist"``)."""
    from l2o.unsupervised.base_model import BaseModel

    if dataset == "digits":
        data = load_digits_balanced()
    elif dataset == "tiny_mnist":
        data = load_tiny_mnist(data_dir)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; use 'digits' or 'tiny_mnist'")
    if isinstance(hidden_sizes, int):
        hidden_sizes = (hidden_sizes,)
    hidden = tuple(int(h) for h in hidden_sizes)
    if not hidden or any(h <= 0 for h in hidden):
        raise ValueError(f"hidden_sizes must be positive ints, got {hidden_sizes!r}")
    for name, v in (("output_size", output_size), ("batch_per_class", batch_per_class),
                    ("samples_per_class", samples_per_class)):
        if isinstance(v, bool) or int(v) != v or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    limit = data.min_train_count
    for name, v in (("batch_per_class", batch_per_class), ("samples_per_class",
                                                           samples_per_class)):
        if v > limit:
            raise ValueError(f"{name}={v} exceeds the smallest class of the {data.name} train "
                             f"split ({limit} examples)")
    if ridge_factor < 0:
        raise ValueError(f"ridge_factor must be >= 0, got {ridge_factor}")
    model = BaseModel(input_dim=data.input_dim, hidden_sizes=hidden,
                      output_size=int(output_size), shuffle_input=bool(shuffle_input))
    return UnsupervisedFamily(data=data, model=model, batch_per_class=int(batch_per_class),
                              samples_per_class=int(samples_per_class),
                              ridge_factor=float(ridge_factor), hinge_loss=bool(hinge_loss))
