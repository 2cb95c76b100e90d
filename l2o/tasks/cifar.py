"""CIFAR-10 from the standard python-pickle batches, and L2L's CIFAR conv-net problem.

:func:`load_cifar10` reads the ``cifar-10-batches-py`` folder of the official python archive
(nothing is downloaded): five training batches ``data_batch_1`` … ``data_batch_5`` and
``test_batch``, each a pickled dict with ``b"data"`` (``uint8 [N, 3072]``, the red, green and blue
32×32 planes of each image one after the other) and ``b"labels"`` (N ints in 0..9). The data
directory is ``data_dir`` if given, else ``$L2O_DATA_DIR``, else ``~/.l2o/data``
(:func:`~l2o.tasks.datasets.data_dir_path`); the folders searched, in order, are

1. ``<data dir>/cifar-10-batches-py/``
2. ``<data dir>/cifar10/cifar-10-batches-py/``
3. ``<data dir>/cifar10/``

and the first that holds all six files is used; otherwise
:class:`~l2o.tasks.datasets.DataNotFoundError` lists every path looked for. The batches are
pickles: only point the data directory at files you trust.

:func:`cifar_conv_family` is the network of the ``cifar`` and ``cifar_multi`` tasks: three 5×5
stride-2 convolutions of 16 channels with ReLU and a linear readout (a small CPU-friendly
stand-in for L2L's conv net, which also had pooling, batch norm and a 32-unit hidden layer). Its
parameters are ``conv_0``…``conv_2`` and ``readout``, so the optimizer selectors ``"conv"`` and
``"readout"`` split convolutional from fully connected parameters (``cifar_multi``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from l2o.tasks.base import SingleTaskFamily
from l2o.tasks.datasets import DATA_DIR_ENV, DataNotFoundError, Dataset, data_dir_path, make_dataset

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CIFAR_FOLDER = "cifar-10-batches-py"


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 32, 32, 3], labels int [N])`` of one pickled batch."""
    try:
        with path.open("rb") as f:
            d = pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ValueError(f"{path}: unreadable CIFAR-10 batch ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch (a pickled {type(d).__name__})")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: not a CIFAR-10 batch (no data/labels entries)")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels).reshape(-1)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and "
                         f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be in 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def cifar10_folders(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders :func:`load_cifar10` looks in, in order."""
    root = data_dir_path(data_dir)
    return [root / CIFAR_FOLDER, root / "cifar10" / CIFAR_FOLDER, root / "cifar10"]


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 (50000 train / 10000 test, 32×32×3, pixels in [0, 1]) from the pickle batches.

    See the module docstring for where it is looked for. Raises
    :class:`~l2o.tasks.datasets.DataNotFoundError` listing the paths tried if absent and
    ``ValueError`` naming the file if a batch is malformed.
    """
    names = (*TRAIN_BATCHES, TEST_BATCH)
    tried = []
    for folder in cifar10_folders(data_dir):
        if all((folder / n).is_file() for n in names):
            break
        tried.extend(str(folder / n) for n in names)
    else:
        root = data_dir_path(data_dir)
        raise DataNotFoundError(
            "CIFAR-10 not found (nothing is downloaded). Looked for:\n  " + "\n  ".join(tried)
            + f"\nUnpack the python version of CIFAR-10 (cifar-10-python.tar.gz) so that "
            f"{root / CIFAR_FOLDER}/ holds {', '.join(names)} — or pass data_dir=..., or set "
            f"{DATA_DIR_ENV} to the folder holding {CIFAR_FOLDER}/.")
    train = [_read_batch(folder / n) for n in TRAIN_BATCHES]
    test_x, test_y = _read_batch(folder / TEST_BATCH)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return make_dataset(train_x, train_y, test_x, test_y, name="cifar10", scale=255.0,
                        num_classes=10)


def cifar_conv_family(data: Dataset, channels: tuple[int, ...] = (16, 16, 16),
                      kernel_size: int = 5, batch_size: int = 128) -> SingleTaskFamily:
    """L2L-style CIFAR conv net on ``data``: ``channels`` k×k stride-2 ReLU convs + readout."""
    from l2o.tasks.conv import ConvTask

    return SingleTaskFamily(base=ConvTask(data=data, channels=tuple(channels),
                                          kernel_size=int(kernel_size), stride=2,
                                          activation="relu", batch_size=int(batch_size),
                                          num_classes=data.num_classes))
