"""Tuned hand-designed baselines of a suite task, computed once and cached on disk.

Per task (:func:`compute_baselines`):

1. **Tuning.** Each optimizer of :data:`BASELINES` (Adam with a constant learning rate, AdamW
   with a warmup-cosine schedule to the horizon, SGD with momentum 0.9) is trained for the
   horizon ``N`` with every learning rate of its log grid on the *tuning* seeds (1000-1002; never
   the report seeds). The selected learning rate has the lowest mean final train loss over those
   seeds; a learning rate with any non-finite record on any seed ranks last. A selection at either
   end of the grid is flagged (``lr_at_grid_edge``: ``"low"`` or ``"high"``).
2. **Report runs.** Each tuned optimizer and *default Adam* (learning rate 1e-3, untuned: what a
   user who does not tune gets) run to ``N`` on the report seeds (0-4).
3. **Long runs.** Tuned Adam and default Adam also run to ``10 N`` on the report seeds (recorded
   every ``max(1, 10 N // 50)`` steps), for speedups. With a constant learning rate their first
   ``N`` steps are those of the report runs, whose finer records the speedups use up to ``N``.

The result is a JSON-able dict (:func:`compute_baselines`), cached by
:func:`load_or_compute_baselines` at
``$L2O_CACHE_DIR/suite/<suite version>/<task name>-<fingerprint[:12]>.json`` (``L2O_CACHE_DIR``
defaults to ``~/.cache/l2o``). The file records the suite version, the full task fingerprint and
the settings; any mismatch, or a file that cannot be read, means the baselines are recomputed
(a corrupt file with a warning). Files are written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from l2o.io.atomic import write_json
from l2o.suite.base import SuiteTask
from l2o.suite.runner import (
    OptimizerFactory,
    RunResult,
    grid_pairs,
    json_safe,
    run_curves,
)

#: Format of the cache files; bump to invalidate every cached baseline.
CACHE_FORMAT = 1

CACHE_DIR_ENV = "L2O_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/l2o")

#: Learning rate of the untuned "default Adam" baseline.
DEFAULT_ADAM_LR = 1e-3
#: Weight decay of the AdamW baseline.
ADAMW_WEIGHT_DECAY = 1e-4
#: Fraction of the horizon spent in AdamW's linear warmup.
ADAMW_WARMUP_FRACTION = 0.05

Log = Callable[[str], None]


def print_log(line: str) -> None:
    """The default progress log: print and flush."""
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# The baseline optimizers


def adam(lr: jax.Array, num_steps: int) -> optax.GradientTransformation:
    """Adam with a constant learning rate (the horizon is ignored)."""
    del num_steps
    return optax.adam(lr)


def adamw_cosine(lr: jax.Array, num_steps: int) -> optax.GradientTransformation:
    """AdamW (weight decay 1e-4): linear warmup over 5 % of ``num_steps`` from 0 to ``lr``, then
    cosine decay to 0 at ``num_steps``."""
    warmup = int(num_steps * ADAMW_WARMUP_FRACTION)
    # the shape with peak 1, scaled by lr: optax's schedules branch on a concrete peak value
    shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(num_steps, warmup + 1),
                                               end_value=0.0)
    return optax.adamw(lambda count: lr * shape(count), weight_decay=ADAMW_WEIGHT_DECAY)


def sgd_momentum(lr: jax.Array, num_steps: int) -> optax.GradientTransformation:
    """SGD with (heavy-ball) momentum 0.9 and a constant learning rate."""
    del num_steps
    return optax.sgd(lr, momentum=0.9)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A tunable baseline: ``make(lr, num_steps)`` and its default learning-rate grid."""

    name: str
    label: str
    make: OptimizerFactory
    grid: tuple[float, ...]


def _geom(lo: float, hi: float, n: int = 12) -> tuple[float, ...]:
    return tuple(float(f"{v:.4g}") for v in np.geomspace(lo, hi, n))


#: The tuned baselines, by name.
BASELINES: dict[str, Baseline] = {
    b.name: b for b in (
        Baseline("adam", "Adam (tuned)", adam, _geom(1e-4, 3e-1)),
        Baseline("adamw_cosine", "AdamW cosine (tuned)", adamw_cosine, _geom(3e-4, 3.0)),
        Baseline("sgdm", "SGD momentum 0.9 (tuned)", sgd_momentum, _geom(1e-4, 1.0)),
    )
}
#: Name and label of the untuned Adam baseline.
ADAM_DEFAULT, ADAM_DEFAULT_LABEL = "adam_default", "Adam (lr 1e-3, untuned)"


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
    """What a baseline computation does; part of the cache key.

    ``grids`` overrides the learning-rate grid of some baselines (name → grid); ``baselines``
    lists the tuned baselines to run (``"adam"`` is required: speedups are measured against it).
    """

    tuning_seeds: tuple[int, ...] = (1000, 1001, 1002)
    report_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    baselines: tuple[str, ...] = ("adam", "adamw_cosine", "sgdm")
    grids: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    default_lr: float = DEFAULT_ADAM_LR
    long_factor: int = 10

    def __post_init__(self):
        unknown = [b for b in (*self.baselines, *self.grids) if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; known: {sorted(BASELINES)}")
        if "adam" not in self.baselines:
            raise ValueError("the baselines must include 'adam' (speedups are measured against it)")
        if set(self.tuning_seeds) & set(self.report_seeds):
            raise ValueError("tuning and report seeds must differ")
        if not self.tuning_seeds or not self.report_seeds or self.long_factor < 1:
            raise ValueError("need tuning seeds, report seeds and long_factor >= 1")

    def grid(self, name: str) -> tuple[float, ...]:
        """The learning-rate grid of baseline ``name``."""
        return tuple(float(v) for v in self.grids.get(name, BASELINES[name].grid))

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON (grids spelled out), as stored in the cache."""
        return {"tuning_seeds": list(self.tuning_seeds), "report_seeds": list(self.report_seeds),
                "baselines": list(self.baselines),
                "grids": {b: list(self.grid(b)) for b in self.baselines},
                "default_lr": float(self.default_lr), "long_factor": int(self.long_factor),
                "adamw_weight_decay": ADAMW_WEIGHT_DECAY,
                "adamw_warmup_fraction": ADAMW_WARMUP_FRACTION}


# ---------------------------------------------------------------------------------------------
# Tuning


def run_score(train_loss: np.ndarray) -> float:
    """A run's tuning score: its final train loss, ``inf`` if any record is non-finite."""
    train_loss = np.asarray(train_loss, dtype=np.float64)
    return float(train_loss[-1]) if np.all(np.isfinite(train_loss)) else math.inf


def select_lr(grid: Sequence[float], scores: np.ndarray) -> dict[str, Any]:
    """Pick the learning rate with the lowest mean score; ``scores`` is ``[len(grid), seeds]``.

    Returns ``lr``, its index, ``lr_at_grid_edge`` (``"low"``, ``"high"`` or ``None``),
    ``all_diverged`` (then the smallest learning rate is taken) and the per-lr mean scores.
    """
    with np.errstate(invalid="ignore"):
        means = np.asarray(scores, dtype=np.float64).mean(axis=1)
    means = np.where(np.isfinite(means), means, math.inf)
    all_diverged = bool(np.all(np.isinf(means)))
    best = 0 if all_diverged else int(np.argmin(means))
    edge = "low" if best == 0 else "high" if best == len(grid) - 1 else None
    return {"lr": float(grid[best]), "index": best, "lr_at_grid_edge": edge,
            "all_diverged": all_diverged,
            "mean_final_train_loss": [float(m) if math.isfinite(m) else None for m in means]}


def tune(st: SuiteTask, name: str, settings: BaselineSettings, log: Log = print_log
         ) -> dict[str, Any]:
    """Tune baseline ``name`` on ``st`` over its grid and the tuning seeds (one jitted run)."""
    grid = settings.grid(name)
    seeds = settings.tuning_seeds
    hp, sd = grid_pairs(grid, seeds)
    run = run_curves(st, BASELINES[name].make, hp, sd)
    scores = np.asarray([run_score(c) for c in run.train_loss]).reshape(len(grid), len(seeds))
    choice = select_lr(grid, scores)
    edge = f" (at the {choice['lr_at_grid_edge']} edge of the grid)" \
        if choice["lr_at_grid_edge"] else ""
    log(f"  {st.name}: tuned {name} over {len(grid)} lrs x {len(seeds)} seeds in "
        f"{run.seconds:.1f}s -> lr {choice['lr']:.3g}{edge}")
    return {"grid": list(grid), "tuning_seeds": list(seeds), **choice,
            "final_train_loss": [[v if math.isfinite(v) else None for v in row]
                                 for row in scores.tolist()],
            "seconds": run.seconds}


# ---------------------------------------------------------------------------------------------
# The whole computation


def compute_baselines(st: SuiteTask, settings: BaselineSettings | None = None,
                      log: Log = print_log) -> dict[str, Any]:
    """Tune, then run the report and long runs of every baseline on ``st`` (no cache)."""
    settings = settings or BaselineSettings()
    start = time.perf_counter()
    n, seeds = st.horizon, settings.report_seeds
    baselines: dict[str, Any] = {}
    for name in settings.baselines:
        baselines[name] = {"label": BASELINES[name].label, "tuning": tune(st, name, settings, log)}
        baselines[name]["lr"] = baselines[name]["tuning"]["lr"]
        baselines[name]["lr_at_grid_edge"] = baselines[name]["tuning"]["lr_at_grid_edge"]
    baselines[ADAM_DEFAULT] = {"label": ADAM_DEFAULT_LABEL, "lr": float(settings.default_lr),
                               "lr_at_grid_edge": None, "tuning": None}

    # report runs to N; tuned and default Adam share one program
    adam_lrs = (baselines["adam"]["lr"], settings.default_lr)
    hp, sd = grid_pairs(adam_lrs, seeds)
    run = run_curves(st, adam, hp, sd)
    log(f"  {st.name}: report runs of tuned and default Adam in {run.seconds:.1f}s")
    baselines["adam"]["report"] = run.select(slice(0, len(seeds))).to_json()
    baselines[ADAM_DEFAULT]["report"] = run.select(slice(len(seeds), None)).to_json()
    for name in settings.baselines:
        if name == "adam":
            continue
        run = run_curves(st, BASELINES[name].make, [baselines[name]["lr"]] * len(seeds), seeds)
        log(f"  {st.name}: report runs of {name} in {run.seconds:.1f}s")
        baselines[name]["report"] = run.to_json()

    # long runs (speedups): tuned and default Adam to long_factor * N
    long_n = settings.long_factor * n
    run = run_curves(st, adam, hp, sd, num_steps=long_n)
    log(f"  {st.name}: tuned and default Adam to {long_n} steps in {run.seconds:.1f}s")
    baselines["adam"]["long"] = run.select(slice(0, len(seeds))).to_json()
    baselines[ADAM_DEFAULT]["long"] = run.select(slice(len(seeds), None)).to_json()
    return {"task": st.name, "kind": st.kind, "horizon": n, "metric": st.metric,
            "higher_is_better": st.higher_is_better, "settings": settings.to_json(),
            "baselines": baselines, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# The cache


def cache_root() -> Path:
    """``$L2O_CACHE_DIR`` if set, else ``~/.cache/l2o``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def cache_path(task_name: str, version: str, fingerprint: str,
               cache_dir: Path | None = None) -> Path:
    """``<cache dir>/suite/<version>/<task name>-<fingerprint[:12]>.json``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "suite" / str(version) / f"{task_name}-{fingerprint[:12]}.json"


def _read_cache(path: Path) -> dict[str, Any] | None:
    """The cached JSON at ``path``; ``None`` (with a warning) if it cannot be read."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("baselines"), dict):
            raise ValueError("not a baselines record")
        return data
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        warnings.warn(f"baseline cache {path} is unreadable ({e}); recomputing", stacklevel=3)
        return None


def _suite_identity(st: SuiteTask, version: str | None, fingerprint: str | None
                    ) -> tuple[str, str]:
    """``(suite version, task fingerprint)``; missing ones come from :mod:`l2o.suite.tasks`."""
    if version is None or fingerprint is None:
        from l2o.suite import tasks as suite_tasks

        version = suite_tasks.SUITE_VERSION if version is None else version
        fingerprint = suite_tasks.task_fingerprint(st) if fingerprint is None else fingerprint
    return str(version), str(fingerprint)


def load_or_compute_baselines(st: SuiteTask, settings: BaselineSettings | None = None, *,
                              version: str | None = None, fingerprint: str | None = None,
                              cache_dir: Path | None = None, refresh: bool = False,
                              log: Log = print_log) -> dict[str, Any]:
    """The baselines of ``st``: from the cache when it holds this suite version, task fingerprint
    and settings, else computed (:func:`compute_baselines`) and cached.

    ``version`` and ``fingerprint`` default to ``l2o.suite.tasks.SUITE_VERSION`` and
    ``task_fingerprint(st)``; ``refresh`` recomputes regardless of the cache.
    """
    settings = settings or BaselineSettings()
    version, fingerprint = _suite_identity(st, version, fingerprint)
    path = cache_path(st.name, version, fingerprint, cache_dir)
    cached = None if refresh else _read_cache(path)
    key = {"format": CACHE_FORMAT, "suite_version": version, "fingerprint": fingerprint,
           "settings": settings.to_json()}
    if cached is not None and all(cached.get(k) == v for k, v in key.items()):
        log(f"{st.name}: baselines from {path}")
        return {**cached, "cache_path": str(path), "from_cache": True}
    if cached is not None:
        log(f"{st.name}: cached baselines are stale (suite version, task or settings changed)")
    log(f"{st.name}: computing baselines (horizon {st.horizon})")
    data = {**key, **compute_baselines(st, settings, log), "created": time.time()}
    write_json(path, json_safe(data), indent=1)
    log(f"{st.name}: baselines in {data['seconds']:.1f}s, cached at {path}")
    return {**data, "cache_path": str(path), "from_cache": False}


def baseline_runs(record: Mapping[str, Any], which: str = "report") -> dict[str, RunResult]:
    """The ``which`` (``"report"`` or ``"long"``) runs of a baselines record, by baseline name."""
    return {name: RunResult.from_json(b[which]) for name, b in record["baselines"].items()
            if b.get(which) is not None}
