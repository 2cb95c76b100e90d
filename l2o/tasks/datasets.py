"""Image classification datasets held on the device, and their loaders.

A :class:`Dataset` is a ``flax.struct`` whose arrays are pytree leaves: a task holding one is
passed to ``jit`` as an argument, and batches are drawn inside ``jit`` with ``jax.random``
indices (:meth:`Dataset.sample_batch`). Images are ``float32`` in ``[0, 1]`` with shape
``[N, H, W, C]``; labels are ``int32``.

Loaders:

* :func:`load_digits` — scikit-learn's 8×8 digits (ships with scikit-learn, no download). The
  last 20 % of the examples, in scikit-learn's order, are the test split.
* :func:`load_mnist`, :func:`load_fashion_mnist` — read from a data directory (nothing is
  downloaded). The directory is ``data_dir`` if given, else ``$L2O_DATA_DIR``, else
  ``~/.l2o/data``. Searched, in this order:

  1. ``<data dir>/<sub>/`` with ``<sub>`` = ``mnist`` or ``fashion_mnist``;
  2. ``<data dir>/`` itself.

  In each folder, the first of these that is present is used:

  a. the four standard IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
     ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or gzipped (``.gz``);
  b. ``<sub>.npz`` (``mnist.npz`` / ``fashion_mnist.npz``) with arrays ``x_train``, ``y_train``,
     ``x_test``, ``y_test`` (the Keras layout).

  Because (2) accepts IDX files lying directly in the data directory, keep MNIST and
  Fashion-MNIST in their own subfolders when both are present. If nothing is found,
  :class:`DataNotFoundError` lists every path that was tried.
"""

from __future__ import annotations

import gzip
import os
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from l2o.types import PRNGKey

DATA_DIR_ENV = "L2O_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.l2o/data")

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# IDX type code -> numpy dtype (big-endian on disk).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are not in the data directory; the message lists what was looked for."""


@struct.dataclass
class Dataset:
    """Train and test splits of an image classification dataset, as device arrays.

    ``train_x``/``test_x``: ``float32`` ``[N, H, W, C]`` in ``[0, 1]``; ``train_y``/``test_y``:
    ``int32`` ``[N]``. ``name`` and ``num_classes`` are static.
    """

    train_x: jax.Array
    train_y: jax.Array
    test_x: jax.Array
    test_y: jax.Array
    name: str = struct.field(pytree_node=False, default="dataset")
    num_classes: int = struct.field(pytree_node=False, default=10)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, ``(H, W, C)``."""
        return tuple(self.train_x.shape[1:])

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return self.train_x.shape[0]

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return self.test_x.shape[0]

    def sample_batch(self, key: PRNGKey, batch_size: int, split: str = "train") -> dict:
        """``{"x": images, "y": labels}``: ``batch_size`` examples drawn uniformly with
        replacement from ``split`` (``"train"`` or ``"test"``); jit-friendly."""
        if split == "train":
            xs, ys = self.train_x, self.train_y
        elif split == "test":
            xs, ys = self.test_x, self.test_y
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        idx = jax.random.randint(key, (batch_size,), 0, xs.shape[0])
        return {"x": jnp.take(xs, idx, axis=0), "y": jnp.take(ys, idx, axis=0)}


def make_dataset(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, name: str, scale: float,
                 num_classes: int | None = None) -> Dataset:
    """A :class:`Dataset` from numpy arrays: images divided by ``scale`` (to ``[0, 1]``) and
    given a channel axis when they have none (``[N, H, W]`` → ``[N, H, W, 1]``)."""

    def images(x: np.ndarray) -> jax.Array:
        x = np.asarray(x, dtype=np.float32) / np.float32(scale)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"{name}: images must be [N, H, W] or [N, H, W, C], got {x.shape}")
        return jnp.asarray(x)

    def labels(y: np.ndarray) -> jax.Array:
        return jnp.asarray(np.asarray(y).reshape(-1).astype(np.int32))

    tx, ty, vx, vy = images(train_x), labels(train_y), images(test_x), labels(test_y)
    for split, x, y in (("train", tx, ty), ("test", vx, vy)):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: {split} split has {x.shape[0]} images "
                             f"but {y.shape[0]} labels")
    if num_classes is None:
        num_classes = int(max(int(ty.max()), int(vy.max()))) + 1
    return Dataset(train_x=tx, train_y=ty, test_x=vx, test_y=vy, name=name,
                   num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8×8 digits (1797 images, 10 classes), pixels scaled from 0..16 to [0, 1].

    Deterministic split: the last ``test_fraction`` of the examples (scikit-learn's order) are
    the test set (359 of 1797 by default).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = _sk_load_digits()
    x, y = d.images, d.target
    n_test = int(round(test_fraction * x.shape[0]))
    n_train = x.shape[0] - n_test
    return make_dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                        name="digits", scale=16.0, num_classes=10)


def load_synthetic(num_examples: int = 4000, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A synthetic 10-class problem shaped like digits (8×8 "images" of 64 features).

    scikit-learn's ``make_classification`` (16 informative features, 2 clusters per class,
    fixed ``seed``), each feature min-max scaled to ``[0, 1]`` with the training split's range.
    Meant for meta-training: it shares digits' input size, so one sampled-MLP family covers both.
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=num_examples, n_features=64, n_informative=16,
                               n_redundant=16, n_classes=10, n_clusters_per_class=2,
                               class_sep=1.5, random_state=seed)
    n_train = num_examples - int(round(test_fraction * num_examples))
    lo, hi = x[:n_train].min(axis=0), x[:n_train].max(axis=0)
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0).reshape(-1, 8, 8)
    return make_dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                        name="synthetic", scale=1.0, num_classes=10)


# ---------------------------------------------------------------------------------------------
# IDX files


def _read_bytes(path: Path) -> bytes:
    """The (decompressed, if gzipped) contents of ``path``."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip file ({e})") from e
    return raw


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX-format bytes into a numpy array (native byte order).

    Raises ``ValueError`` naming ``source`` on a bad magic number, an unknown type code or a
    length that does not match the header.
    """
    if len(data) < 4:
        raise ValueError(f"{source}: not an IDX file (only {len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source}: not an IDX file (bad magic number {data[:4].hex()})")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{source}: not an IDX file (unknown type code 0x{type_code:02x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{source}: IDX length mismatch: header says shape {shape} "
                         f"({expected} bytes in all) but the file has {len(data)} bytes")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a numpy array; ``ValueError`` if malformed."""
    path = Path(path)
    return parse_idx(_read_bytes(path), source=str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)


# ---------------------------------------------------------------------------------------------
# MNIST-layout datasets from a data directory


def data_dir_path(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$L2O_DATA_DIR``, else ``~/.l2o/data``."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def _find_idx(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (each plain or ``.gz``), or None if any is missing."""
    found = {}
    for key, base in IDX_FILES.items():
        for candidate in (folder / base, folder / f"{base}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of a Keras-layout ``.npz`` file, keyed like :data:`IDX_FILES`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [_npz_key(k) for k in IDX_FILES if _npz_key(k) not in f.files]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing} "
                                 f"(need x_train, y_train, x_test, y_test); has {f.files}")
            return {k: np.asarray(f[_npz_key(k)]) for k in IDX_FILES}
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable npz file ({e})") from e


def _npz_key(key: str) -> str:
    """Our split key (``train_x``) → the Keras npz key (``x_train``)."""
    split, part = key.split("_")
    return f"{part}_{split}"


def load_mnist_layout(sub: str, *, title: str,
                      data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a 28×28, 10-class dataset stored like MNIST (see the module docstring for the
    search order); ``sub`` names both its subfolder and its ``.npz`` file."""
    root = data_dir_path(data_dir)
    tried: list[str] = []
    for folder in (root / sub, root):
        files = _find_idx(folder)
        if files is not None:
            arrays = {k: read_idx(p) for k, p in files.items()}
            source = str(folder)
            break
        tried.extend(f"{folder / b}[.gz]" for b in IDX_FILES.values())
        npz = folder / f"{sub}.npz"
        if npz.is_file():
            arrays = _load_npz(npz)
            source = str(npz)
            break
        tried.append(str(npz))
    else:
        raise DataNotFoundError(
            f"{title} not found (nothing is downloaded). Looked for:\n  "
            + "\n  ".join(tried)
            + f"\nPut the four IDX files ({', '.join(f'{b}[.gz]' for b in IDX_FILES.values())}) "
            f"or {sub}.npz (Keras layout: x_train, y_train, x_test, y_test) into "
            f"{root / sub}/ — or pass data_dir=..., or set {DATA_DIR_ENV} to the folder "
            f"holding {sub}/ (default {DEFAULT_DATA_DIR}).")

    for key in ("train_x", "test_x"):
        if arrays[key].ndim != 3:
            raise ValueError(f"{source}: {key} images must be [N, H, W], got {arrays[key].shape}")
    for key in ("train_y", "test_y"):
        if arrays[key].ndim != 1:
            raise ValueError(f"{source}: {key} labels must be [N], got {arrays[key].shape}")
        if arrays[key].size and (arrays[key].min() < 0 or arrays[key].max() > 9):
            raise ValueError(f"{source}: {key} labels must be in 0..9")
    return make_dataset(arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"],
                        name=sub, scale=255.0, num_classes=10)


def load_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """MNIST (60000 train / 10000 test, 28×28×1) from the data directory; see the module
    docstring for where it is looked for. Raises :class:`DataNotFoundError` if absent."""
    return load_mnist_layout("mnist", title="MNIST", data_dir=data_dir)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST (same layout as MNIST) from the data directory; see the module docstring.
    Raises :class:`DataNotFoundError` if absent."""
    return load_mnist_layout("fashion_mnist", title="Fashion-MNIST", data_dir=data_dir)
