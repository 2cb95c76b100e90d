"""Score any optax transformation on a held-out suite: :func:`evaluate_on_suite`.

The optimizer under test is given as ``make(num_steps) -> optax.GradientTransformation`` (the
horizon is passed for learned optimizers and schedules), so the same entry point scores a
checkpoint (``as_gradient_transformation(lopt, theta, num_steps=n)``), a packaged pretrained
optimizer or a hand-designed baseline. Its runs use the report seeds ``0 .. seeds-1``: the same
initializations and batches as the baselines' report runs (seeds 0-4).

:func:`precompute_baselines` fills the baseline cache of a suite (``python -m l2o.suite``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optax

from l2o.suite.base import SuiteTask
from l2o.suite.baselines import (
    BaselineSettings,
    Log,
    baseline_runs,
    load_or_compute_baselines,
    print_log,
)
from l2o.suite.runner import fixed_optimizer, run_curves
from l2o.suite.scores import suite_summary, task_scores

Fingerprint = Callable[[SuiteTask], str]


def resolve_suite(suite: str | Sequence[SuiteTask], tasks: Sequence[str] | None = None,
                  version: str | None = None, fingerprint: Fingerprint | None = None
                  ) -> tuple[str, str, list[SuiteTask], Fingerprint]:
    """``(suite name, suite version, tasks, fingerprint function)``.

    A suite name is looked up in :mod:`l2o.suite.tasks`; a list of tasks is used as given (name
    ``"custom"``). ``tasks`` keeps only the named tasks, in the given order. ``version`` and
    ``fingerprint`` default to ``SUITE_VERSION`` and ``task_fingerprint``.
    """
    if isinstance(suite, str) or version is None or fingerprint is None:
        from l2o.suite import tasks as suite_tasks
    if isinstance(suite, str):
        name = suite
        if tasks:
            task_list = [suite_tasks.suite_task(suite, t) for t in tasks]
        else:
            task_list = list(suite_tasks.get_suite(suite))
    else:
        name, task_list = "custom", list(suite)
        if tasks:
            by_name = {st.name: st for st in task_list}
            missing = [t for t in tasks if t not in by_name]
            if missing:
                raise ValueError(f"unknown tasks {missing}; known: {sorted(by_name)}")
            task_list = [by_name[t] for t in tasks]
    version = suite_tasks.SUITE_VERSION if version is None else version
    fingerprint = suite_tasks.task_fingerprint if fingerprint is None else fingerprint
    return name, str(version), task_list, fingerprint


def precompute_baselines(suite: str | Sequence[SuiteTask] = "heldout", *,
                         tasks: Sequence[str] | None = None,
                         settings: BaselineSettings | None = None,
                         cache_dir: Path | None = None, refresh: bool = False,
                         version: str | None = None, fingerprint: Fingerprint | None = None,
                         log: Log = print_log) -> dict[str, dict[str, Any]]:
    """Compute (or load) and cache the baselines of every task of ``suite``; by task name."""
    name, version, task_list, fp = resolve_suite(suite, tasks, version, fingerprint)
    start = time.perf_counter()
    out = {}
    for i, st in enumerate(task_list, 1):
        log(f"[{i}/{len(task_list)}] {st.name} ({st.kind}, horizon {st.horizon})")
        out[st.name] = load_or_compute_baselines(st, settings, version=version,
                                                 fingerprint=fp(st), cache_dir=cache_dir,
                                                 refresh=refresh, log=log)
    log(f"suite {name} (version {version}): baselines of {len(task_list)} tasks in "
        f"{time.perf_counter() - start:.1f}s")
    return out


def evaluate_task(st: SuiteTask, make: Callable[[int], optax.GradientTransformation],
                  record: dict[str, Any], *, seeds: int = 5, label: str = "learned",
                  log: Log = print_log) -> dict[str, Any]:
    """Run ``make`` on ``st`` (seeds ``0 .. seeds-1``) and score it against the baselines
    ``record`` (:func:`~l2o.suite.baselines.load_or_compute_baselines`)."""
    run = run_curves(st, fixed_optimizer(make), [0.0] * seeds, list(range(seeds)))
    log(f"{st.name}: {label} in {run.seconds:.1f}s")
    reports, longs = baseline_runs(record, "report"), baseline_runs(record, "long")
    scores = task_scores(st.name, st.horizon, st.higher_is_better, run, reports, longs)
    return {**scores, "kind": st.kind, "metric": st.metric, "description": st.description,
            "fingerprint": record.get("fingerprint"), "label": label,
            "lrs": {n: {"lr": b["lr"], "lr_at_grid_edge": b["lr_at_grid_edge"],
                        "label": b["label"]} for n, b in record["baselines"].items()},
            "runs": {"learned": run.to_json(),
                     **{n: r.to_json() for n, r in reports.items()}},
            "long_runs": {n: r.to_json() for n, r in longs.items()},
            "tuning": {n: b["tuning"] for n, b in record["baselines"].items()}}


def evaluate_on_suite(make_learned: Callable[[int], optax.GradientTransformation],
                      suite: str | Sequence[SuiteTask] = "heldout", *,
                      tasks: Sequence[str] | None = None, seeds: int = 5,
                      out_dir: Path | None = None, label: str = "learned",
                      settings: BaselineSettings | None = None, cache_dir: Path | None = None,
                      version: str | None = None, fingerprint: Fingerprint | None = None,
                      log: Log = print_log) -> dict[str, Any]:
    """Score the optimizer ``make_learned(num_steps)`` on every task of ``suite`` against the
    cached tuned baselines (computed first where missing).

    Returns a JSON-able dict: ``suite``, ``suite_version``, ``label``, ``seeds``, per-task scores
    and runs under ``tasks`` (:func:`evaluate_task`) and the ``summary``
    (:func:`~l2o.suite.scores.suite_summary`). With ``out_dir``, writes ``report.md``,
    ``curves.png`` and ``suite.json`` there (:func:`~l2o.suite.report.write_report`).
    """
    if seeds < 1:
        raise ValueError(f"seeds must be positive, got {seeds}")
    name, version, task_list, fp = resolve_suite(suite, tasks, version, fingerprint)
    start = time.perf_counter()
    results = []
    for i, st in enumerate(task_list, 1):
        log(f"[{i}/{len(task_list)}] {st.name} ({st.kind}, horizon {st.horizon})")
        record = load_or_compute_baselines(st, settings, version=version, fingerprint=fp(st),
                                           cache_dir=cache_dir, log=log)
        results.append(evaluate_task(st, make_learned, record, seeds=seeds, label=label, log=log))
    result = assemble_suite_result(results, name, version, label, seeds, settings=settings,
                                   seconds=time.perf_counter() - start)
    if out_dir is not None:
        write_suite_report(result, out_dir)
    return result


def assemble_suite_result(task_results: Sequence[dict[str, Any]], suite: str, version: str,
                          label: str, seeds: int, *, settings: BaselineSettings | None = None,
                          seconds: float | None = None) -> dict[str, Any]:
    """The result of a suite evaluation from its per-task results (:func:`evaluate_task`, in
    report order), wherever they were computed: :func:`evaluate_on_suite` in this process, or
    one eval-pool job per task (``workers.eval_worker``). Adds the ``summary``
    (:func:`~l2o.suite.scores.suite_summary`)."""
    tasks = list(task_results)
    return {"suite": suite, "suite_version": str(version), "label": label,
            "seeds": list(range(int(seeds))),
            "baseline_settings": (settings or BaselineSettings()).to_json(),
            "tasks": tasks, "summary": suite_summary(tasks),
            "seconds": seconds}


def write_suite_report(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write ``report.md``, ``curves.png`` and ``suite.json`` of ``result`` to ``out_dir``
    (:func:`~l2o.suite.report.write_report`); records and returns the paths under ``files``."""
    from l2o.suite.report import write_report

    result["files"] = {k: str(v) for k, v in write_report(result, out_dir).items()}
    return result["files"]


def baseline_settings_from_json(data: dict[str, Any] | None) -> BaselineSettings | None:
    """The :class:`~l2o.suite.baselines.BaselineSettings` of ``BaselineSettings.to_json()``
    (``None`` for ``None``): ``to_json`` of the result equals ``data`` (the cache key)."""
    if data is None:
        return None
    return BaselineSettings(
        tuning_seeds=tuple(int(s) for s in data["tuning_seeds"]),
        report_seeds=tuple(int(s) for s in data["report_seeds"]),
        baselines=tuple(data["baselines"]),
        grids={b: tuple(float(v) for v in g) for b, g in data.get("grids", {}).items()},
        default_lr=float(data["default_lr"]), long_factor=int(data["long_factor"]))
