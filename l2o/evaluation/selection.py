"""Which θ of a run to ship: candidates scored on validation tasks, never on the held-out suite.

The eval pool scores every checkpoint on *one* task drawn from the run's evaluation family, which
is a noisy guide to which θ generalizes. :func:`select_theta` widens that: it draws several tasks
from a validation family (by default the run's evaluation family, e.g. sampled MLPs on synthetic
data), tunes Adam on each (the same grid as the run's evaluation), and scores

* each of the run's last ``last`` params checkpoints, and
* the average of the last ``average`` of them (θ averaging, as in Polyak averaging),

by the geometric mean over tasks of ``learned final loss / tuned-Adam final loss`` (lower is
better; a diverged run counts as a ratio of :data:`DIVERGED_RATIO`). The candidate with the lowest
score is chosen. Nothing here reads the suite, so the suite stays a held-out measurement of the
chosen θ.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from l2o.evaluation.comparison import DEFAULT_ADAM_LEARNING_RATES
from l2o.io.config import TaskConfig
from l2o.types import MetaParams

#: The loss ratio a diverged (non-finite) validation run counts as.
DIVERGED_RATIO = 100.0


def averaged_theta(thetas: Sequence[MetaParams]) -> MetaParams:
    """The element-wise mean of several θ of one optimizer (same tree structure)."""
    if not thetas:
        raise ValueError("averaged_theta needs at least one θ")
    return jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *thetas)


def loss_ratio(learned: float | None, adam: float | None) -> float:
    """``learned / adam`` final loss, capped at :data:`DIVERGED_RATIO`, which a diverged run
    (non-finite or missing loss) also counts as. Both losses must be positive (a cross-entropy or
    squared error): anything else raises ``ValueError``."""
    if learned is None or adam is None or not math.isfinite(learned):
        return DIVERGED_RATIO
    if learned < 0 or not adam > 0:
        raise ValueError(f"loss ratios need positive losses, got {learned} / {adam}")
    return min(float(learned) / float(adam), DIVERGED_RATIO)


def geometric_mean(values: Sequence[float]) -> float:
    """The geometric mean of positive numbers."""
    return float(np.exp(np.mean(np.log(np.maximum(np.asarray(values, np.float64), 1e-12)))))


def select_theta(checkpoints: Sequence[Path], task: TaskConfig, *, last: int = 10,
                 average: int = 5, num_tasks: int = 6, steps: int = 500, seeds: int = 4,
                 seed: int = 20261130,
                 adam_learning_rates: Sequence[float] = DEFAULT_ADAM_LEARNING_RATES,
                 log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Score the last ``last`` of ``checkpoints`` (params checkpoints of one run, in version
    order) and the average of the last ``average`` on ``num_tasks`` tasks drawn from ``task``'s
    family; return every candidate's per-task ratios and score, and the chosen one."""
    from l2o.evaluation.comparison import CurveResult, adam_baseline, loss_curves
    from l2o.training.build import task_family_from_config
    from l2o.training.job import load_theta

    if last < 1 or average < 0 or num_tasks < 1:
        raise ValueError("last and num_tasks must be at least 1, average at least 0")
    chosen_paths = list(checkpoints)[-last:]
    if not chosen_paths:
        raise ValueError("no checkpoints to select from")
    loaded = [load_theta(p) for p in chosen_paths]
    lopt = loaded[0][0]
    # (name, θ, versions it comes from, metadata of the newest of them)
    candidates: list[tuple[str, MetaParams, list[int], dict[str, Any]]] = [
        (Path(p).name, theta, [int(meta["version"])], meta)
        for p, (_, theta, meta) in zip(chosen_paths, loaded, strict=True)]
    tail = loaded[-average:] if average > 1 else []
    if len(tail) > 1:
        candidates.append((f"average of the last {len(tail)}",
                           averaged_theta([theta for _, theta, _ in tail]),
                           [int(meta["version"]) for _, _, meta in tail], tail[-1][2]))

    family = task_family_from_config(task)
    task_keys = jax.random.split(jax.random.PRNGKey(seed), num_tasks)
    tasks = []
    for i, k in enumerate(task_keys):
        k_task, k_run = jax.random.split(k)
        t = family.sample_task(k_task)
        baseline = adam_baseline(t, steps=steps, seeds=seeds, key=k_run,
                                 adam_learning_rates=tuple(adam_learning_rates),
                                 adam_steps=steps)
        tasks.append((t, k_run, baseline))
        log(f"validation task {i}: tuned Adam lr {baseline['best_lr']:g}, "
            f"final loss {baseline['final_loss']}")

    rows = []
    for name, theta, versions, _ in candidates:
        # the same seeds and batches as tuned Adam's runs (same key), train loss only
        ratios = [loss_ratio(CurveResult.from_curves(
            loss_curves(t, lopt, theta, steps, seeds, k), 1).final_loss, b["final_loss"])
            for t, k, b in tasks]
        rows.append({"candidate": name, "versions": versions, "ratios": ratios,
                     "score": geometric_mean(ratios)})
        log(f"{name}: geometric-mean loss ratio {rows[-1]['score']:.4f}")
    best = min(range(len(rows)), key=lambda i: rows[i]["score"])
    name, theta, versions, meta = candidates[best]
    return {"validation_task": task.model_dump(mode="json"), "num_tasks": num_tasks,
            "steps": steps, "seeds": seeds, "seed": seed, "candidates": rows,
            "chosen": name, "chosen_versions": versions, "chosen_theta": theta,
            "chosen_meta": meta, "optimizer": lopt}


def write_selection(result: dict[str, Any], out: Path) -> Path:
    """Write the chosen θ as a params checkpoint ``out`` and ``OUT.selection.json`` next to it;
    return ``out``. Its metadata is the newest source checkpoint's (``version`` is that one's: an
    average is as far trained as its newest member) with ``selection`` naming the candidate and
    the versions it comes from, and the time of this write."""
    import time

    from flax import serialization

    from l2o.io.checkpoints import save_checkpoint

    table = {k: v for k, v in result.items()
             if k not in ("chosen_theta", "chosen_meta", "optimizer")}
    meta = {**result["chosen_meta"], "saved_at": time.time(),
            "selection": {"chosen": table["chosen"], "versions": table["chosen_versions"]}}
    save_checkpoint(out, serialization.to_state_dict(result["chosen_theta"]), meta)
    out.with_suffix(".selection.json").write_text(json.dumps(table, indent=2))
    return out
