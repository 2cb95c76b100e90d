"""The report of a suite evaluation: ``report.md``, ``curves.png`` and ``suite.json``.

:func:`write_report` takes the dict returned by :func:`~l2o.suite.evaluate.evaluate_on_suite`.
The markdown holds the suite version, a per-task table (mean ± std over seeds of the final train
loss and the test metric of the learned optimizer and every baseline, the tuned learning rates, the
speedups), a table of the learned optimizer against the baselines and the suite summary. The PNG
has one panel per task: seed-mean train loss (log scale) against steps, the learned optimizer and
the baselines, test metrics in the legend.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from l2o.evaluation.plots import save_png
from l2o.io.atomic import write_json
from l2o.suite.runner import RunResult, json_safe
from l2o.suite.scores import seed_mean_curve

#: Baselines in report order.
BASELINE_ORDER = ("adam", "adamw_cosine", "sgdm", "adam_default")


def fmt(x: float | None, digits: int = 4) -> str:
    """A number for the report; ``None`` (non-finite) prints as ``nan``."""
    return "nan" if x is None else f"{x:.{digits}g}"


def fmt_pm(mean: float | None, std: float | None) -> str:
    """``mean ± std``; ``nan`` when the mean is missing (a diverged seed)."""
    return "nan" if mean is None else f"{mean:.4g} ± {fmt(std, 2)}"


def fmt_speedup(vs: Mapping[str, Any]) -> str:
    """A speedup, with ``≥`` when the baseline never reached the target (a lower bound)."""
    if vs.get("speedup") is None:
        return "–"
    return ("" if vs.get("speedup_reached", True) else "≥") + f"{vs['speedup']:.3g}"


def _baselines(task: Mapping[str, Any]) -> list[str]:
    names = list(task["baselines"])
    return [n for n in BASELINE_ORDER if n in names] + [n for n in names
                                                        if n not in BASELINE_ORDER]


def _lr_cell(task: Mapping[str, Any], name: str) -> str:
    info = task["lrs"].get(name, {})
    edge = info.get("lr_at_grid_edge")
    cell = fmt(info.get("lr"), 3)
    if ((task.get("tuning") or {}).get(name) or {}).get("all_diverged"):
        cell += " (all lrs diverged)"
    return cell + (f" (grid edge: {edge})" if edge else "")


def task_rows(task: Mapping[str, Any]) -> list[str]:
    """The per-task table rows: the learned optimizer, then each baseline."""
    label = task.get("label", "learned")
    rows = []
    lrn = task["learned"]
    div = f" (diverged {lrn['diverged_seeds']})" if lrn["diverged"] else ""
    rows.append(f"| {task['task']} | {task['horizon']} | {task['metric']} | **{label}**{div} | – "
                f"| {fmt_pm(lrn['final_train_loss_mean'], lrn['final_train_loss_std'])} "
                f"| {fmt_pm(lrn['test_metric_mean'], lrn['test_metric_std'])} | – |")
    for name in _baselines(task):
        b, vs = task["baselines"][name], task["vs"][name]
        lbl = task["lrs"].get(name, {}).get("label", name)
        rows.append(f"| | | | {lbl} | {_lr_cell(task, name)} "
                    f"| {fmt_pm(b['final_train_loss_mean'], b['final_train_loss_std'])} "
                    f"| {fmt_pm(b['test_metric_mean'], b['test_metric_std'])} "
                    f"| {fmt_speedup(vs)} |")
    return rows


def markdown(result: Mapping[str, Any]) -> str:
    """The markdown report of an :func:`~l2o.suite.evaluate.evaluate_on_suite` result."""
    label, tasks, summ = result["label"], result["tasks"], result["summary"]
    settings = result.get("baseline_settings", {})
    lines = [f"# Suite `{result['suite']}`: {label}", "",
             f"Suite version `{result['suite_version']}`, {len(tasks)} tasks. "
             f"`{label}` ran seeds {result['seeds']}; the baselines ran the report seeds "
             f"{settings.get('report_seeds')} after tuning on seeds "
             f"{settings.get('tuning_seeds')} (lowest mean final train loss over a log grid of "
             "learning rates). Speedup: steps the baseline (run to "
             f"{settings.get('long_factor', 10)}·N) needs to reach `{label}`'s final train loss "
             "at N, divided by N; ≥ marks a baseline that never reached it.", "",
             "## Per task", "",
             "| task | N | test metric | optimizer | lr | final train loss | test metric "
             f"| speedup of {label} |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for t in tasks:
        lines += task_rows(t)
    names = [n for n in BASELINE_ORDER if any(n in t["vs"] for t in tasks)]
    lines += ["", f"## {label} against the baselines", "",
              "| task | speedup vs tuned Adam | speedup vs default Adam | loss ratio vs tuned Adam "
              + "".join(f"| beats {n} on test " for n in names) + "| diverged |",
              "|---|---:|---:|---:" + "|:-:" * len(names) + "|:-:|"]
    for t in tasks:
        vs = t["vs"]
        cells = [t["task"], fmt_speedup(vs.get("adam", {})),
                 fmt_speedup(vs.get("adam_default", {})),
                 fmt((vs.get("adam") or {}).get("final_loss_ratio"), 3)]
        cells += ["yes" if vs[n]["beats_on_test"] else "no" if n in vs else "–" for n in names]
        cells.append("yes" if t["learned"]["diverged"] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    beats = summ.get("fraction_beats_on_test", {})
    lines += ["", "## Summary", "",
              f"- IQM speedup over tuned Adam: {fmt(summ.get('iqm_speedup_vs_adam'), 3)} "
              f"({summ.get('speedup_lower_bounds_vs_adam', 0)} tasks at the ≥ cap)",
              f"- IQM speedup over default Adam (lr 1e-3, against its own "
              f"{settings.get('long_factor', 10)}·N run): "
              f"{fmt(summ.get('iqm_speedup_vs_adam_default'), 3)} "
              f"({summ.get('speedup_lower_bounds_vs_adam_default', 0)} tasks at the ≥ cap)",
              f"- median final-loss ratio vs tuned Adam ({label} / Adam): "
              f"{fmt(summ.get('median_final_loss_ratio_vs_adam'), 3)}"]
    lines += [f"- beats {n} on the test metric: {beats[n]:.0%} of tasks" for n in names
              if n in beats]
    diverged = summ.get("diverged_tasks") or []
    lines.append(f"- divergences: {summ.get('divergences', 0)}"
                 + (f" ({', '.join(diverged)})" if diverged else ""))
    return "\n".join(lines) + "\n"


def plot_curves(result: Mapping[str, Any], path: Path) -> Path:
    """One panel per task: seed-mean train loss (log y) against steps for the learned optimizer
    and the baselines (to N), test metric in the legend; written atomically to ``path``."""
    tasks = result["tasks"]
    n = max(1, len(tasks))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.3 * rows))
    for i, t in enumerate(tasks):
        ax = fig.add_subplot(rows, cols, i + 1)
        label = t.get("label", "learned")
        names = ["learned", *_baselines(t)]
        for name in names:
            run = RunResult.from_json(t["runs"][name])
            summ = t["learned"] if name == "learned" else t["baselines"][name]
            shown = label if name == "learned" else t["lrs"].get(name, {}).get("label", name)
            curve = seed_mean_curve(run)
            curve = np.where(curve > 0, curve, np.nan)  # log scale: drop non-positive values
            ax.plot(run.steps, curve, lw=2.0 if name == "learned" else 1.2,
                    color="black" if name == "learned" else None,
                    label=f"{shown}: {t['metric']} {fmt(summ['test_metric_mean'], 3)}")
        ax.set_yscale("log")
        sp = fmt_speedup(t["vs"].get("adam", {}))
        ax.set_title(f"{t['task']} (speedup vs tuned Adam {sp})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("train loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(f"suite {result['suite']} ({result['suite_version']}): {result['label']}")
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def write_report(result: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``report.md``, ``curves.png`` and ``suite.json`` (the whole result) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.md", "curves": out / "curves.png", "json": out / "suite.json"}
    data = json_safe(dict(result))
    write_json(paths["json"], json_safe(data), indent=1)
    text = markdown(data)
    fd, tmp = tempfile.mkstemp(prefix=".report.md.", suffix=".tmp", dir=out)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, paths["report"])
    plot_curves(data, paths["curves"])
    return paths


def comparison(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table comparing several optimizers' suite results (label → result of
    ``evaluate_on_suite`` on the same suite): per task the speedup over tuned Adam (test metric
    in brackets, tuned Adam's beside it), then each optimizer's suite summary."""
    labels = list(results)
    first = next(iter(results.values()))
    tasks = [t["task"] for t in first["tasks"]]
    by = {lab: {t["task"]: t for t in r["tasks"]} for lab, r in results.items()}
    lines = [f"Suite `{first['suite']}` ({first['suite_version']}): speedup over tuned Adam "
             "(test metric of the optimizer / of tuned Adam); ≥: Adam never reached it in 10·N.",
             "", "| task | N | metric | " + " | ".join(labels) + " |",
             "|---|---:|---|" + "---:|" * len(labels)]
    for name in tasks:
        ref = by[labels[0]][name]
        cells = [name, str(ref["horizon"]), ref["metric"]]
        for lab in labels:
            t = by[lab].get(name)
            if t is None:
                cells.append("–")
                continue
            adam_test = t["baselines"]["adam"]["test_metric_mean"]
            div = " (diverged)" if t["learned"]["diverged"] else ""
            test = fmt(t["learned"]["test_metric_mean"], 3)
            cells.append(f"{fmt_speedup(t['vs']['adam'])} ({test} / {fmt(adam_test, 3)}){div}")
        lines.append("| " + " | ".join(cells) + " |")
    rows = [("IQM speedup vs tuned Adam", lambda s: fmt(s.get("iqm_speedup_vs_adam"), 3)),
            ("IQM speedup vs default Adam",
             lambda s: fmt(s.get("iqm_speedup_vs_adam_default"), 3)),
            ("median final-loss ratio vs tuned Adam",
             lambda s: fmt(s.get("median_final_loss_ratio_vs_adam"), 3)),
            *((f"beats {n} on test", lambda s, n=n: f"{s['fraction_beats_on_test'].get(n, 0):.0%}")
              for n in BASELINE_ORDER),
            ("divergences", lambda s: str(s.get("divergences", 0)))]
    for title, cell in rows:
        lines.append(f"| **{title}** | | | " + " | ".join(cell(r["summary"]) for r in
                                                            results.values()) + " |")
    return "\n".join(lines) + "\n"
