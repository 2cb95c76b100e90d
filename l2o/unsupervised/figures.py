"""Pictures of what a base model learned: receptive fields and class-sorted activations.

- :func:`receptive_field_grid`: the first layer's weights, one tile per unit shaped like an input
  image (the input permutation undone), each standardized and mapped to gray levels, laid out on
  a square grid with one-pixel borders;
- :func:`class_sorted_activations`: the output features of a batch, one row per example, rows
  grouped by class with a blank row between classes, standardized and clipped to [-1, 1];
- :func:`write_figures`: both, for several named models side by side, as PNGs (matplotlib Agg).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def receptive_field_grid(w0, perm, image_shape: tuple[int, ...],
                         max_units: int = 100) -> np.ndarray:
    """A ``[rows·(h+1), cols·(w+1)]`` image in [0, 1] of the first ``max_units`` units'
    receptive fields (``w0`` ``[input_dim, units]``; ``perm`` the model's input permutation)."""
    w0 = np.asarray(w0, np.float64)
    perm = np.asarray(perm).astype(np.int64)
    h, w = int(image_shape[0]), int(np.prod(image_shape[1:]))
    if w0.ndim != 2 or w0.shape[0] != h * w or perm.shape != (w0.shape[0],):
        raise ValueError(f"first-layer weights {w0.shape} and permutation {perm.shape} do not "
                         f"match image shape {tuple(image_shape)}")
    fields = np.zeros_like(w0)
    fields[perm] = w0  # row j of w0 reads input coordinate perm[j]
    units = min(int(max_units), w0.shape[1])
    fields = fields[:, :units]
    fields = (fields - fields.mean()) / (fields.std() + 1e-8)
    fields = np.clip((fields + 1.0) / 2.0, 0.0, 1.0)
    side = math.ceil(math.sqrt(units))
    grid = np.ones((side * (h + 1), side * (w + 1)))
    for u in range(units):
        r, c = divmod(u, side)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = \
            fields[:, u].reshape(h, w)
    return grid


def class_sorted_activations(features, labels, num_classes: int) -> np.ndarray:
    """``[n + num_classes, d]`` in [0, 1]: the rows of ``features`` grouped by class, each
    group followed by a row of zeros; standardized over the whole array, clipped to [-1, 1]."""
    f = np.asarray(features, np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if f.ndim != 2 or f.shape[0] != y.shape[0]:
        raise ValueError(f"features {f.shape} and labels {y.shape} do not match")
    f = np.clip((f - f.mean()) / (f.std() + 1e-8), -1.0, 1.0)
    f = (f + 1.0) / 2.0
    rows = []
    for c in range(int(num_classes)):
        rows.append(f[y == c])
        rows.append(np.zeros((1, f.shape[1])))
    return np.concatenate(rows, axis=0)


def _panels(images: Mapping[str, np.ndarray], path: Path, title: str, cmap: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4.4), squeeze=False)
    for ax, (name, img) in zip(axes[0], images.items(), strict=True):
        ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_figures(out_dir: str | Path, first_layers: Mapping[str, tuple],
                  activations: Mapping[str, np.ndarray], labels, num_classes: int,
                  image_shape: tuple[int, ...]) -> list[str]:
    """Write ``receptive_fields.png`` and ``activations.png`` into ``out_dir``; their paths.

    ``first_layers``: name → ``(w0, perm)`` of each model; ``activations``: name → output
    features ``[n, d]`` of each model on one batch whose class ids are ``labels``.
    """
    out = Path(out_dir)
    fields = {k: receptive_field_grid(w0, perm, image_shape) for k, (w0, perm) in
              first_layers.items()}
    acts = {k: class_sorted_activations(f, labels, num_classes) for k, f in activations.items()}
    return [
        str(_panels(fields, out / "receptive_fields.png",
                    "first-layer receptive fields", "gray")),
        str(_panels(acts, out / "activations.png",
                    "output features, examples sorted by class (rows)", "viridis")),
    ]
