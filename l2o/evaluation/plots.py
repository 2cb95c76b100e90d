"""Plots of evaluation results and meta-training progress (matplotlib, Agg, no display).

Figures are built with the object-oriented API (no ``pyplot`` global state, safe in worker
threads) and written atomically: to a temporary file in the target directory, then renamed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from l2o.io.atomic import atomic_write
from l2o.io.storage import as_path


def _array(values: Any) -> np.ndarray:
    """A float array; ``None`` entries (non-finite values in JSON results) become NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically (:func:`l2o.io.atomic.atomic_write`)."""
    FigureCanvasAgg(fig)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    return as_path(path)


def _use_log_scale(*arrays: np.ndarray) -> bool:
    """Log scale only when every finite value is positive (and there is one)."""
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    return finite.size > 0 and bool(np.all(finite > 0))


def _band(ax, mean: np.ndarray, std: np.ndarray, label: str, color: str, log: bool) -> None:
    steps = np.arange(len(mean))
    ax.plot(steps, mean, label=label, color=color, lw=1.6)
    if len(std) == len(mean):
        lo, hi = mean - std, mean + std
        if log:  # keep the band on the axis: clip its lower edge to a fraction of the mean
            lo = np.maximum(lo, mean * 1e-3)
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.fill_between(steps, lo, hi, where=ok, color=color, alpha=0.2, lw=0)


def plot_curves(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Learned optimizer vs tuned Adam: mean loss over seeds with ±1 std bands.

    ``result`` is the dict returned by :func:`l2o.evaluation.comparison.evaluate` (keys
    ``learned_mean``,
    ``learned_std``, ``adam_mean``, ``adam_std``, ``task``, ``speedup_str``, ``adam_best_lr``).
    The y axis is logarithmic unless a loss is <= 0. Writes a PNG atomically and returns its path.
    """
    lm, ls = _array(result["learned_mean"]), _array(result.get("learned_std", []))
    am, as_ = _array(result["adam_mean"]), _array(result.get("adam_std", []))
    log = _use_log_scale(lm, am)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    if log:
        ax.set_yscale("log")
    name = result.get("learned_optimizer", "learned")
    _band(ax, lm, ls, f"{name}", "tab:blue", log)
    lr = result.get("adam_best_lr")
    _band(ax, am, as_, "tuned Adam" + (f" (lr={lr:g})" if lr is not None else ""), "tab:orange",
          log)
    ax.set_xlabel("inner step")
    ax.set_ylabel(f"loss ({result.get('loss_on', 'batch')}; mean ± std over "
                  f"{result.get('seeds', '?')} seeds)")
    title = str(result.get("task", "task"))
    if "speedup_str" in result:
        title += f" — speedup {result['speedup_str']}"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def plot_meta_loss(history: Sequence[float] | Sequence[Mapping[str, Any]],
                   path: str | os.PathLike, *, key: str = "meta_loss",
                   smooth: int = 20) -> Path:
    """Meta-training loss against meta-step, raw and as a trailing moving average.

    ``history`` is a sequence of numbers (one per meta-step) or of mappings holding ``key`` and
    optionally ``step``. Writes a PNG atomically and returns its path.
    """
    if history and isinstance(history[0], Mapping):
        values = _array([h.get(key) for h in history])
        steps = np.array([h.get("step", i) for i, h in enumerate(history)], dtype=np.float64)
    else:
        values = _array(list(history))
        steps = np.arange(len(values), dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    if values.size and _use_log_scale(values):
        ax.set_yscale("log")
    ax.plot(steps, values, color="tab:blue", alpha=0.35, lw=1, label=key)
    w = max(1, min(int(smooth), len(values)))
    if w > 1:
        finite = np.where(np.isfinite(values), values, 0.0)
        count = np.convolve(np.isfinite(values).astype(float), np.ones(w), "valid")
        with np.errstate(invalid="ignore", divide="ignore"):
            avg = np.convolve(finite, np.ones(w), "valid") / count
        ax.plot(steps[w - 1:], avg, color="tab:blue", lw=1.8, label=f"{key} ({w}-step mean)")
    ax.set_xlabel("meta-step")
    ax.set_ylabel(key)
    ax.set_title("meta-training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_png(fig, path)
