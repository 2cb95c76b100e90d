"""Scores of an optimizer on suite tasks against the tuned baselines, and the suite summary.

Per task and optimizer (over the report seeds): the final train loss and the test metric as
mean ± std, and divergence (a seed whose records hold a non-finite value, or whose final train loss
is above its initial one).

Against a baseline with a long run (tuned Adam and default Adam run to ``10 N``):

* **speedup** = (steps the baseline's seed-mean train-loss curve (its report run's records up to
  ``N``, then its long run's; :func:`speedup_curve`) needs to reach the learned
  optimizer's seed-mean final train loss) ÷ ``N``. The steps are interpolated linearly between the
  last record point above the target and the first at or below it. A curve already at or below the
  target at its first record point (step 0) gives 0. Never reached within the long run: the long
  run's length ÷ ``N`` (10) with ``speedup_reached = False`` (read "≥ 10"). A non-finite learned
  final loss gives 0.
* **final-loss ratio** = learned ÷ baseline seed-mean final train loss at ``N`` (every baseline).
* **beats on test** = the learned seed-mean test metric is strictly better (every baseline).

Suite summary: the IQM (interquartile mean) over tasks of the speedups over tuned and over default
Adam (each against that baseline's own long run), the fraction of tasks where the learned optimizer
beats each baseline on the test metric, the median final-loss ratio against tuned Adam and the
number of tasks where the learned optimizer (and each baseline) diverged on some seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from l2o.suite.runner import RunResult


def _f(x: float) -> float | None:
    """A JSON-able float: non-finite becomes ``None``."""
    x = float(x)
    return x if math.isfinite(x) else None


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and (population) std; NaN when any value is non-finite."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return math.nan, math.nan
    return float(v.mean()), float(v.std())


def diverged_seeds(train_loss: np.ndarray) -> np.ndarray:
    """Per run (row of ``[P, R]`` records): any non-finite record, or final above initial."""
    c = np.atleast_2d(np.asarray(train_loss, dtype=np.float64))
    nonfinite = ~np.all(np.isfinite(c), axis=1)
    with np.errstate(invalid="ignore"):
        rose = c[:, -1] > c[:, 0]
    return nonfinite | rose


def run_summary(run: RunResult) -> dict[str, Any]:
    """Final train loss and test metric (mean ± std over seeds), mean minibatch loss, divergence."""
    loss_m, loss_s = mean_std(run.final_train_loss)
    test_m, test_s = mean_std(run.test_metric)
    div = diverged_seeds(run.train_loss)
    return {"final_train_loss_mean": _f(loss_m), "final_train_loss_std": _f(loss_s),
            "test_metric_mean": _f(test_m), "test_metric_std": _f(test_s),
            "mean_batch_loss_mean": _f(mean_std(run.mean_batch_loss)[0]),
            "initial_train_loss_mean": _f(mean_std(run.train_loss[:, 0])[0]),
            "diverged_seeds": int(div.sum()), "diverged": bool(div.any()),
            "seeds": [int(s) for s in run.seeds]}


def seed_mean_curve(run: RunResult) -> np.ndarray:
    """The seed-mean train-loss curve ``[R]`` (non-finite where any seed is)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(run.train_loss, dtype=np.float64).mean(axis=0)


def speedup_curve(long: RunResult, report: RunResult | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, seed-mean curve)`` of a baseline's long run, with its report run's (finer)
    records up to the horizon where given: the same trajectories for a constant learning rate."""
    if report is None:
        return np.asarray(long.steps), seed_mean_curve(long)
    beyond = np.asarray(long.steps) > report.steps[-1]
    return (np.concatenate([report.steps, np.asarray(long.steps)[beyond]]),
            np.concatenate([seed_mean_curve(report), seed_mean_curve(long)[beyond]]))


def steps_to_reach(steps: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """Steps the curve (recorded at ``steps``) needs to reach ``target`` (≤), interpolated
    linearly between record points; ``None`` if it never does. Non-finite points never reach."""
    steps = np.asarray(steps, dtype=np.float64)
    curve = np.asarray(curve, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        hit = np.isfinite(curve) & (curve <= target)
    if not hit.any():
        return None
    i = int(np.argmax(hit))
    if i == 0:
        return float(steps[0])
    prev, cur = curve[i - 1], curve[i]
    if not np.isfinite(prev) or prev <= cur:
        return float(steps[i])
    frac = (prev - target) / (prev - cur)
    return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))


def speedup(baseline_steps: np.ndarray, baseline_curve: np.ndarray, target: float,
            horizon: int) -> dict[str, Any]:
    """Speedup of an optimizer whose final loss at ``horizon`` is ``target`` over a baseline whose
    (long) seed-mean curve is ``baseline_curve`` at ``baseline_steps`` (module docstring).

    Returns ``speedup``, ``speedup_reached`` (``False``: a lower bound, "≥") and
    ``baseline_steps_to_match``.
    """
    cap = float(np.asarray(baseline_steps)[-1]) / horizon
    if not math.isfinite(target):
        return {"speedup": 0.0, "speedup_reached": True, "baseline_steps_to_match": None}
    needed = steps_to_reach(baseline_steps, baseline_curve, target)
    if needed is None:
        return {"speedup": cap, "speedup_reached": False, "baseline_steps_to_match": None}
    return {"speedup": needed / horizon, "speedup_reached": True,
            "baseline_steps_to_match": needed}


def beats(learned: float | None, baseline: float | None, higher_is_better: bool) -> bool:
    """Whether the learned test metric is strictly better; a missing learned value loses and a
    missing baseline value (with a finite learned one) wins."""
    if learned is None or not math.isfinite(learned):
        return False
    if baseline is None or not math.isfinite(baseline):
        return True
    return learned > baseline if higher_is_better else learned < baseline


def ratio_value(learned: float | None, baseline: float | None) -> float:
    """``learned / baseline`` final train loss as a float: ``inf`` when the learned value is
    missing (diverged) or the baseline is 0 and the learned value is not, 0 when only the baseline
    is missing, 1 when both are 0."""
    if learned is None or not math.isfinite(learned):
        return math.inf
    if baseline is None or not math.isfinite(baseline):
        return 0.0
    if baseline == 0:
        return 1.0 if learned == 0 else math.inf
    return learned / baseline


def loss_ratio(learned: float | None, baseline: float | None) -> float | None:
    """``learned / baseline`` final train loss for JSON: :func:`ratio_value`, ``None`` if
    infinite."""
    return _f(ratio_value(learned, baseline))


def task_scores(task: str, horizon: int, higher_is_better: bool, learned: RunResult,
                baselines: Mapping[str, RunResult],
                long_runs: Mapping[str, RunResult]) -> dict[str, Any]:
    """One task's scores: a summary per optimizer and the learned optimizer against each
    baseline (``long_runs`` gives the baselines with a speedup)."""
    learned_sum = run_summary(learned)
    target = learned_sum["final_train_loss_mean"]
    target = math.nan if target is None else target
    summaries = {name: run_summary(run) for name, run in baselines.items()}
    vs: dict[str, Any] = {}
    for name, summ in summaries.items():
        entry = {"final_loss_ratio": loss_ratio(learned_sum["final_train_loss_mean"],
                                                summ["final_train_loss_mean"]),
                 "beats_on_test": beats(learned_sum["test_metric_mean"],
                                        summ["test_metric_mean"], higher_is_better)}
        if name in long_runs:
            steps, curve = speedup_curve(long_runs[name], baselines[name])
            entry.update(speedup(steps, curve, target, horizon))
        vs[name] = entry
    return {"task": task, "horizon": int(horizon), "higher_is_better": bool(higher_is_better),
            "learned": learned_sum, "baselines": summaries, "vs": vs}


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean after dropping ``floor(n / 4)`` values at each end (as
    ``scipy.stats.trim_mean(values, 0.25)``); NaN for no values."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        return math.nan
    cut = int(0.25 * v.size)
    return float(v[cut:v.size - cut].mean())


def suite_summary(scores: Sequence[Mapping[str, Any]], speedup_baselines: Sequence[str] = (
        "adam", "adam_default"), ratio_baseline: str = "adam") -> dict[str, Any]:
    """The suite summary of per-task scores (:func:`task_scores`); see the module docstring."""
    out: dict[str, Any] = {"tasks": len(scores)}
    for name in speedup_baselines:
        vals = [s["vs"][name]["speedup"] for s in scores
                if name in s["vs"] and "speedup" in s["vs"][name]]
        lower = sum(1 for s in scores if name in s["vs"]
                    and not s["vs"][name].get("speedup_reached", True))
        out[f"iqm_speedup_vs_{name}"] = _f(iqm(vals)) if vals else None
        out[f"speedup_lower_bounds_vs_{name}"] = lower
    names = sorted({n for s in scores for n in s["vs"]})
    out["fraction_beats_on_test"] = {
        n: sum(bool(s["vs"][n]["beats_on_test"]) for s in scores if n in s["vs"])
        / max(1, sum(1 for s in scores if n in s["vs"])) for n in names}
    ratios = [ratio_value(s["learned"]["final_train_loss_mean"],
                          s["baselines"][ratio_baseline]["final_train_loss_mean"])
              for s in scores if ratio_baseline in s["baselines"]]
    out[f"median_final_loss_ratio_vs_{ratio_baseline}"] = _f(np.median(ratios)) if ratios else None
    out["divergences"] = sum(1 for s in scores if s["learned"]["diverged"])
    out["diverged_tasks"] = [s["task"] for s in scores if s["learned"]["diverged"]]
    out["baseline_divergences"] = {
        n: sum(1 for s in scores if n in s["baselines"] and s["baselines"][n]["diverged"])
        for n in sorted({n for s in scores for n in s["baselines"]})}
    return out
