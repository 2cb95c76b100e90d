"""The ``l2o`` command line: train, evaluate, inspect.

``l2o train`` with no arguments runs the default job (the L2L LSTM meta-trained on digits MLPs).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from l2o.io.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_config,
    preset,
    preset_description,
    replace_fields,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Meta-train learned optimizers, evaluate them, inspect runs.")
console = Console()


def _fail(message: str) -> None:
    # escaped: a message's brackets (e.g. 'l2o[service]') are text, not markup; one line in logs
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


# What the distributed service imports (installed by ``pip install 'l2o[service]'``): checked
# before a service command starts, so a library-only install gets the hint, not a traceback.
SERVICE_MODULES = ("ray", "grpc", "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection",
                   "google.protobuf", "redis")
REGISTRY_MODULES = ("redis",)


def _require_service(what: str, modules: tuple[str, ...]) -> None:
    """Fail with the install hint unless ``modules`` import."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            _fail(f"{what} needs the service dependencies ({e}): pip install 'l2o[service]'")


def _load(config: Path | None, preset_name: str | None, overrides: dict[str, Any],
          assignments: list[str] | None = None) -> TrainConfig:
    if config is not None and preset_name is not None:
        _fail("give --config or --preset, not both")
    try:
        cfg = load_config(config) if config is not None else preset(preset_name or "default")
        cfg = replace_fields(cfg, overrides, "command line")
        return apply_overrides(cfg, assignments) if assignments else cfg
    except ConfigError as e:
        _fail(str(e))
        raise  # unreachable


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"run {summary.get('run', '')}", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [(k, summary[k]) for k in ("mode", "meta_steps", "updates", "meta_loss_first",
                                       "meta_loss_last", "wall_seconds") if k in summary]
    rows += [(f"eval.{k}", v) for k, v in (summary.get("eval") or {}).items()]
    for name, value in rows:
        table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
    return table


def _set_aside(cfg: TrainConfig) -> None:
    """``--fresh``: rename the run directory aside (``RUN.TIMESTAMP``), and its local directory
    when the run directory is on object storage (a copy of each object, then the old removed)."""
    from l2o.io.storage import fresh, move_tree

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in dict.fromkeys([cfg.run_path(), cfg.local_path()]):
        if fresh(path).exists():
            aside = path.with_name(f"{cfg.run_name}.{stamp}")
            move_tree(path, aside)
            console.print(f"moved the previous run dir to {aside}")


@app.command()
def train(
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    preset_name: Annotated[str | None, typer.Option("--preset", help="Named preset.")] = None,
    run_name: Annotated[str | None, typer.Option(help="Override run_name.")] = None,
    run_dir: Annotated[str | None, typer.Option(help="Override run_dir.")] = None,
    meta_steps: Annotated[int | None, typer.Option(min=1, help="Override meta_steps.")] = None,
    local: Annotated[bool, typer.Option(help="One process instead of the service (Ray, gRPC, "
                                              "Redis).")] = False,
    fresh: Annotated[bool, typer.Option(help="Start over: an existing run dir is renamed "
                                              "aside (RUN.TIMESTAMP), not deleted.")] = False,
    assignments: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE override of any config field, dotted and YAML-valued "
                      "(e.g. --set estimator.num_tasks=8 --set time_budget_s=60); "
                      "repeatable.")] = None,
) -> None:
    """Meta-train a learned optimizer, evaluate it against tuned Adam, write summary.json."""
    cfg = _load(config, preset_name,
                {"run_name": run_name, "run_dir": run_dir, "meta_steps": meta_steps},
                assignments)
    if not local:
        _require_service("l2o train (without --local)", SERVICE_MODULES)
        for problem in cfg.service.missing_files():
            _fail(problem)
    from workers.ray_setup import job_run_dir_problem

    if (problem := job_run_dir_problem(cfg.run_dir)) is not None:  # in a `ray job submit` job
        _fail(problem)
    from l2o.io.checkpoints import CheckpointError
    from l2o.io.storage import is_remote

    if local and is_remote(cfg.run_dir):
        _fail("l2o train --local writes a local run directory; for run_dir on object storage "
              "train through the service (without --local)")
    if fresh:
        _set_aside(cfg)
    console.print(f"run dir: [bold]{cfg.run_path()}[/]  task: {cfg.task.name}  "
                  f"optimizer: {cfg.optimizer.name}  estimator: {cfg.estimator.name}")
    with Progress(TextColumn("[bold]meta-train"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("", total=cfg.meta_steps)
        last_printed = [-1]

        def show(step: int, line: str) -> None:
            progress.update(bar, completed=step, description=line)
            # no live bar in a log file: print a line every log_every steps instead
            if not console.is_terminal and step // cfg.log_every != last_printed[0]:
                last_printed[0] = step // cfg.log_every
                console.print(line)

        try:
            if local:
                from l2o.training.job import run_local

                summary = run_local(cfg, on_log=lambda e: show(
                    e["step"], f"step {e['step']} meta-loss {e['meta_loss']:.4g} "
                               f"{e['inner_steps_per_s']:.0f} inner steps/s"))
            else:
                from services.retry import RedisUnavailable
                from services.train import run_service

                try:
                    summary = run_service(cfg, progress=lambda s: show(
                        int(s.get("updates", 0)),
                        f"update {s.get('updates', 0)} meta-loss "
                        f"{s.get('last_meta_loss', 0):.4g} "
                        f"{s.get('gradients_per_second', 0):.1f} grads/s, "
                        f"staleness {s.get('staleness_mean', 0):.2f}"))
                # one line naming Redis (a bad or unreachable URL, an outage), not a traceback
                except (RedisUnavailable, ConnectionError) as e:
                    _fail(str(e))
                    return
        except CheckpointError as e:  # e.g. no intact checkpoint to resume from
            # from the learner actor it is a RayTaskError too, its text a traceback; .cause is it
            cause = getattr(e, "cause", None) or e
            _fail(f"{cause} (the files are left as they are; --fresh starts the run over)")
    console.print(_summary_table(summary))
    if (summary.get("eval") or {}).get("kind") == "unsupervised_rule":
        from l2o.unsupervised.evaluation import format_result

        console.print(format_result(summary["eval"]), markup=False)
    # the last line: the absolute location of the results (a Ray job's log ends with it)
    console.print(f"wrote {cfg.run_path().resolve() / 'summary.json'}", soft_wrap=True)


@app.command()
def tune(
    config: Annotated[Path | None, typer.Option(help="YAML config with a tune: section.")] = None,
    preset_name: Annotated[str | None, typer.Option(
        "--preset", help="Named preset (default: tune-quadratic, the embedded default).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted experiment in the run "
                                               "directory (Tune's restore).")] = False,
    assignments: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE override of any config field, dotted (e.g. --set "
                      "tune.population=8 --set tune.scheduler=pb2); repeatable.")] = None,
) -> None:
    """Population search (Ray Tune PBT / PB2 / ASHA / random) over meta-hyperparameters: each
    trial a learner with its own unroll workers; writes tune_summary.json and pbt.png."""
    _require_service("l2o tune", SERVICE_MODULES)
    from services.tune import format_table, run_tune, tune_config

    try:
        cfg = tune_config(config, preset_name, assignments)
        console.print(f"run dir: [bold]{cfg.run_path()}[/]  scheduler: {cfg.tune.scheduler}  "
                      f"population: {cfg.tune.population}")
        summary = run_tune(cfg, resume=resume)
    except ConfigError as e:
        _fail(str(e))
        return
    console.print(format_table(summary))
    console.print(f"wrote {cfg.run_path() / 'tune_summary.json'} and "
                  f"{cfg.run_path() / 'pbt.png'}")


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[str, typer.Argument(
        help="A params or full checkpoint file: a path, file://… or a storage URL (s3://…).")],
    task: Annotated[str | None, typer.Option(
        help="Task name (see `l2o tasks`); default: the run's eval task (digits_mlp without "
             "one).")] = None,
    steps: Annotated[int | None, typer.Option(
        min=1, help="Inner steps; default: the run's eval.steps.")] = None,
    seeds: Annotated[int | None, typer.Option(
        min=1, help="Fresh initializations; default: the run's eval.seeds.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the result JSON and a PNG here.")] = None,
    suite: Annotated[str | None, typer.Option(
        help="'l2o-scale': every L2O-Scale evaluation problem in turn (instead of --task); "
             "see docs/l2o_scale.md. 'heldout': the held-out suite, each task at its own "
             "horizon against cached tuned baselines (--steps is ignored); writes report.md, "
             "curves.png and suite.json to --out (default: <checkpoint dir>/suite-heldout).")
    ] = None,
    offline: Annotated[bool, typer.Option(
        help="With --suite l2o-scale: the digits stand-ins instead of MNIST / CIFAR-10.")
    ] = False,
    tasks: Annotated[str | None, typer.Option(
        help="With --suite heldout: only these tasks (comma-separated names).")] = None,
    pool: Annotated[int, typer.Option(
        min=0, help="With --suite heldout: shard the tasks over this many eval workers (Ray "
             "actors, one job per task on a Redis stream; local Ray and the embedded Redis "
             "unless $RAY_ADDRESS / $REDIS_URL). 0: score them in this process.")] = 0,
) -> None:
    """Score a checkpoint's optimizer on a task (or a suite of tasks) against tuned Adam.

    Without --task, --steps and --seeds the evaluation is the run's own (its config is read from
    the checkpoint, or from a full checkpoint beside it): the result is the ``eval`` block of the
    run's summary.json. Without a run config, the default job's evaluation settings apply.
    """
    from l2o.io.storage import as_path

    checkpoint = as_path(checkpoint)

    if pool and suite in (None, "l2o-scale"):
        _fail("--pool shards a held-out suite: give --suite heldout")
    if suite == "l2o-scale":
        _eval_suite(checkpoint, suite, offline, steps, seeds, out)
        return
    if suite is not None:
        _eval_heldout(checkpoint, suite, seeds, out, _split_names(tasks), pool)
        return

    from l2o.io.checkpoints import CheckpointError
    from l2o.training.job import EVAL_SUMMARY_KEYS, evaluate_theta, load_theta, write_outputs

    try:
        lopt, theta, meta = load_theta(checkpoint)
        cfg = _eval_config(checkpoint, meta, task, steps, seeds,
                           needs_run=lopt.name == "unsupervised_rule")
    except (CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        _fail(str(e))
        return
    # the unsupervised rule is scored by its features (its PNGs go here), not against Adam
    result = evaluate_theta(cfg, lopt, theta,
                            figures_dir=out if out is not None else checkpoint.resolve().parent)
    summary = {"run": str(checkpoint),
               "eval": {k: result[k] for k in EVAL_SUMMARY_KEYS if k in result}}
    if result.get("kind") == "unsupervised_rule":
        from l2o.unsupervised.evaluation import format_result

        console.print(format_result(result))
    else:
        console.print(_summary_table(summary))
    if out is not None:
        write_outputs(out, summary, result)
        console.print(f"wrote {out / 'summary.json'}")


def _run_config(checkpoint: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The config of the run ``checkpoint`` belongs to: in its metadata (a full checkpoint) or in
    the latest full checkpoint of its run directory (a params checkpoint); None if neither."""
    from l2o.io.checkpoints import latest_checkpoint, read_checkpoint

    if meta.get("config") is not None:
        return meta["config"]
    full = latest_checkpoint(checkpoint.resolve().parent.parent, "full")
    return read_checkpoint(full)[1].get("config") if full is not None else None


def _eval_config(checkpoint: Path, meta: dict[str, Any], task: str | None, steps: int | None,
                 seeds: int | None, needs_run: bool = False) -> TrainConfig:
    """The config whose evaluation ``l2o eval`` runs: the checkpoint's run config (the default
    job's without one) with the options given. ``needs_run``: CheckpointError without a run."""
    from l2o.io.checkpoints import CheckpointError
    from l2o.io.config import TaskConfig

    config = _run_config(checkpoint, meta)
    if config is None and needs_run:
        raise CheckpointError(f"{checkpoint}: the unsupervised rule needs its run's base model "
                              "and data; give a full checkpoint or one inside its run directory")
    cfg = TrainConfig.model_validate(config) if config is not None else TrainConfig()
    update: dict[str, Any] = {k: v for k, v in (("steps", steps), ("seeds", seeds))
                              if v is not None}
    if task is not None:
        update["task"] = TaskConfig(name=task)
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update=update)})


def _eval_suite(checkpoint: Path, suite: str, offline: bool, steps: int | None,
                seeds: int | None, out: Path | None) -> None:
    """``l2o eval --suite``: each problem of the suite; a missing dataset skips its problem."""
    import jax

    from l2o.evaluation.comparison import evaluate
    from l2o.io.atomic import write_json
    from l2o.io.checkpoints import CheckpointError
    from l2o.io.config import TaskConfig
    from l2o.tasks.datasets import DataNotFoundError
    from l2o.tasks.registry import L2O_SCALE_EVAL_TASKS
    from l2o.training.build import task_family_from_config
    from l2o.training.job import load_theta

    if suite != "l2o-scale":
        _fail(f"unknown suite {suite!r}; known: l2o-scale")
    try:
        lopt, theta, meta = load_theta(checkpoint)
        ev = _eval_config(checkpoint, meta, None, steps, seeds).eval
    except (CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        _fail(str(e))
        return
    steps, seeds = ev.steps, ev.seeds
    results: dict[str, Any] = {}
    table = Table("problem", "task", "learned", "tuned Adam", "speedup", title=f"{suite} suite")
    for label, (real, standin) in L2O_SCALE_EVAL_TASKS.items():
        name = standin if offline else real
        try:
            family = task_family_from_config(TaskConfig(name=name))
        except DataNotFoundError as e:
            console.print(f"[yellow]skipped {label}:[/] {e}")
            results[label] = {"task_name": name, "error": str(e)}
            continue
        k_task, k_run = jax.random.split(jax.random.PRNGKey(0))
        res = evaluate(family.sample_task(k_task), lopt, theta, steps=steps, seeds=seeds,
                       key=k_run, adam_learning_rates=tuple(ev.adam_learning_rates),
                       adam_steps=ev.adam_steps_factor * steps)
        results[label] = {"task_name": name, **{k: v for k, v in res.items()
                                                if not isinstance(v, list | dict)}}
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        table.add_row(label, name, fmt(res.get("learned_final_loss")),
                      fmt(res.get("adam_final_loss")), fmt(res.get("speedup")))
    console.print(table)
    if all("error" in r for r in results.values()):
        _fail("no problem of the suite could be built (see above); --offline uses the digits "
              "stand-ins")
    if out is not None:
        write_json(Path(out) / "suite.json", {"checkpoint": str(checkpoint), "suite": suite,
                                              "steps": steps, "seeds": seeds,
                                              "results": results})
        console.print(f"wrote {Path(out) / 'suite.json'}")


def _split_names(names: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]``; ``None`` or empty -> ``None``."""
    out = [n.strip() for n in (names or "").split(",") if n.strip()]
    return out or None


def _suite_log(line: str) -> None:
    console.print(line, markup=False, highlight=False)


def _heldout_table(result: dict[str, Any]) -> Table:
    """The rich table of an ``evaluate_on_suite`` result."""
    from l2o.suite.report import fmt, fmt_pm, fmt_speedup

    table = Table("task", "metric", f"{result['label']} train loss", "tuned Adam train loss",
                  f"{result['label']} test", "tuned Adam test", "speedup vs Adam",
                  "vs default Adam", title=f"suite {result['suite']} "
                                           f"({result['suite_version']})")
    for t in result["tasks"]:
        lrn, adam = t["learned"], t["baselines"]["adam"]
        table.add_row(t["task"], t["metric"],
                      fmt_pm(lrn["final_train_loss_mean"], lrn["final_train_loss_std"]),
                      fmt_pm(adam["final_train_loss_mean"], adam["final_train_loss_std"]),
                      fmt_pm(lrn["test_metric_mean"], lrn["test_metric_std"]),
                      fmt_pm(adam["test_metric_mean"], adam["test_metric_std"]),
                      fmt_speedup(t["vs"]["adam"]), fmt_speedup(t["vs"].get("adam_default", {})))
    s = result["summary"]
    table.caption = (f"IQM speedup vs tuned Adam {fmt(s.get('iqm_speedup_vs_adam'), 3)}, "
                     f"vs default Adam {fmt(s.get('iqm_speedup_vs_adam_default'), 3)}; "
                     f"median loss ratio vs tuned Adam "
                     f"{fmt(s.get('median_final_loss_ratio_vs_adam'), 3)}; beats on test: "
                     + ", ".join(f"{k} {v:.0%}" for k, v in s["fraction_beats_on_test"].items())
                     + f"; divergences {s['divergences']}")
    return table


def _eval_heldout(checkpoint: Path, suite: str, seeds: int | None, out: Path | None,
                  names: list[str] | None, pool: int = 0) -> None:
    """``l2o eval --suite heldout``: the checkpoint's optimizer (as an optax transformation) on
    the held-out suite (``l2o.suite.evaluate.evaluate_on_suite``; with ``pool``, sharded over
    that many eval workers: ``workers.eval_worker.evaluate_on_suite_with_pool``)."""
    from l2o.io.checkpoints import CheckpointError
    from l2o.optimizers.optax_bridge import as_gradient_transformation
    from l2o.suite.evaluate import evaluate_on_suite
    from l2o.training.job import load_theta

    if pool:
        _require_service("l2o eval --pool", SERVICE_MODULES)
    try:
        lopt, theta, _ = load_theta(checkpoint)
    except (CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        _fail(str(e))
        return
    out = out if out is not None else checkpoint.resolve().parent / f"suite-{suite}"
    given = {} if seeds is None else {"seeds": seeds}  # else the suite's own number of seeds
    try:
        if pool:
            from workers.eval_worker import evaluate_on_suite_with_pool

            result = evaluate_on_suite_with_pool(checkpoint, suite, pool, tasks=names,
                                                 out_dir=out, label=checkpoint.name,
                                                 log_line=_suite_log, **given)
        else:
            result = evaluate_on_suite(
                lambda n: as_gradient_transformation(lopt, theta, num_steps=n), suite,
                tasks=names, out_dir=out, label=checkpoint.name, log=_suite_log, **given)
    except ValueError as e:  # an unknown suite or task name
        _fail(f"{e} (l2o eval also knows the suite l2o-scale)")
        return
    except RuntimeError as e:  # a pool's failed tasks
        _fail(str(e))
        return
    console.print(_heldout_table(result))
    console.print(f"wrote {out / 'report.md'}, {out / 'curves.png'} and {out / 'suite.json'}")


def _tuned_lr(baselines: dict[str, Any], name: str) -> str:
    """A tuned learning rate for a table, with its grid-edge flag."""
    if name not in baselines:
        return "–"
    b = baselines[name]
    edge = f" ({b['lr_at_grid_edge']} edge)" if b.get("lr_at_grid_edge") else ""
    return f"{b['lr']:.3g}{edge}"


@app.command("select")
def select_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (its checkpoints/).")],
    last: Annotated[int, typer.Option(min=1, help="Score the last N params checkpoints.")] = 10,
    average: Annotated[int, typer.Option(
        min=0, help="Also score the average θ of the last N checkpoints (0 or 1: none).")] = 5,
    num_tasks: Annotated[int, typer.Option(
        min=1, help="Validation tasks drawn from the run's evaluation family.")] = 6,
    steps: Annotated[int | None, typer.Option(
        min=1, help="Inner steps per validation run; default: the run's eval.steps.")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Initializations per task.")] = 4,
    out: Annotated[Path | None, typer.Option(
        help="The chosen θ's params checkpoint; default: RUN_DIR/selected.ckpt.")] = None,
) -> None:
    """Choose the θ to ship from a run's last checkpoints and their average, on validation
    tasks from the run's evaluation family (never the held-out suite)."""
    from l2o.evaluation.selection import select_theta, write_selection
    from l2o.io.checkpoints import list_checkpoints, read_checkpoint

    found = [p for _, p in list_checkpoints(run_dir, "params")]
    config = _run_config(found[-1], read_checkpoint(found[-1])[1]) if found else None
    if config is None:
        _fail(f"{run_dir}: needs params checkpoints and its run's config (a full checkpoint)")
        return
    cfg = TrainConfig.model_validate(config)
    result = select_theta(found, cfg.eval_task(), last=last, average=average,
                          num_tasks=num_tasks, steps=steps or cfg.eval.steps, seeds=seeds,
                          adam_learning_rates=cfg.eval.adam_learning_rates, log=console.print)
    table = Table("candidate", "versions", "geometric-mean loss ratio (lower is better)",
                  title=f"validation on {num_tasks} tasks of {cfg.eval_task().name}")
    for row in result["candidates"]:
        table.add_row(row["candidate"], ",".join(map(str, row["versions"])), f"{row['score']:.4f}")
    console.print(table)
    path = write_selection(result, out or run_dir / "selected.ckpt")
    console.print(f"chose {result['chosen']}: wrote {path}")


@app.command("suite-baselines")
def suite_baselines(
    suite: Annotated[str, typer.Option(help="The suite (see l2o.suite.tasks).")] = "heldout",
    tasks: Annotated[str | None, typer.Option(
        help="Only these tasks (comma-separated names).")] = None,
    refresh: Annotated[bool, typer.Option(help="Recompute even what is cached.")] = False,
) -> None:
    """Tune and run the baselines of a held-out suite and cache them ($L2O_CACHE_DIR)."""
    from l2o.suite.evaluate import precompute_baselines

    try:
        records = precompute_baselines(suite, tasks=_split_names(tasks), refresh=refresh,
                                       log=_suite_log)
    except ValueError as e:
        _fail(str(e))
        return
    table = Table("task", "N", "Adam lr", "AdamW cosine lr", "SGDm lr", "seconds", "cache",
                  title=f"baselines of suite {suite}")
    for name, r in records.items():
        lrs = [_tuned_lr(r["baselines"], k) for k in ("adam", "adamw_cosine", "sgdm")]
        table.add_row(name, str(r["horizon"]), *lrs, f"{r.get('seconds', 0.0):.1f}",
                      "hit" if r["from_cache"] else "computed")
    console.print(table)


@app.command()
def tasks() -> None:
    """List the task families."""
    from l2o.tasks.registry import describe_tasks

    table = Table("task", "description")
    for name, desc in describe_tasks():
        table.add_row(name, desc)
    console.print(table)


@app.command()
def presets() -> None:
    """List the presets of ``l2o train --preset``."""
    table = Table("preset", "description")
    for name in sorted(PRESETS):
        table.add_row(name, preset_description(name))
    console.print(table)


RunDirOption = Annotated[Path | None, typer.Option(
    help="A run directory (RUN_DIR/RUN_NAME) whose embedded Redis to read; default: every run "
         "directory under the default run_dir that has one. Ignored with a Redis URL.")]
RedisUrlOption = Annotated[str | None, typer.Option(
    help="Redis URL (default: $REDIS_URL, else the runs' embedded servers).")]


def _registry_clients(redis_url: str | None, run_dir: Path | None) -> Iterator[Any]:
    """Clients of the Redis servers to read: ``redis_url`` / ``$REDIS_URL``, else the embedded
    server of ``run_dir``, else of every run directory under the default ``run_dir`` that has
    embedded Redis data. A run's live server is read through its advertised socket; a stopped
    run's data are read by a server this process starts and stops again."""
    from services import redis_server  # after _require_service: needs redis

    url = redis_url or os.environ.get("REDIS_URL")
    if url:
        dirs: list[Path | None] = [None]
    elif run_dir is not None:
        dirs = [redis_server.run_data_dir(run_dir)]
        if not dirs[0].is_dir():
            _fail(f"{run_dir} holds no embedded Redis data ({dirs[0]})")
    else:
        dirs = sorted(p for p in Path(TrainConfig().run_dir).glob("*/redis") if p.is_dir())
    for data in dirs:
        client, server_url, started = _reader_connection(url, data)
        try:
            yield client
        finally:
            if started:  # a server this process started to read a stopped run's data
                redis_server.shutdown_embedded(server_url)


def _reader_connection(url: str | None, data: Path | None) -> tuple[Any, str, bool]:
    """:func:`services.redis_server.owned_connection` for a reader; a one-line error if none."""
    from services.redis_server import owned_connection

    try:
        return owned_connection(url, data=data, reuse_running=True)
    except (ConnectionError, ValueError) as e:
        _fail(str(e))
        raise  # unreachable


@app.command()
def status(
    run: Annotated[str | None, typer.Argument(help="Run id; omit to list runs.")] = None,
    redis_url: RedisUrlOption = None,
    run_dir: RunDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A run's state, counters, checkpoints and latest evaluation, from the registry.

    A run shown ``failed`` whose stored state is live (``status.state``) lost its driver: no
    heartbeat came for several intervals (see ``services.registry.shown_state``).
    """
    _require_service("l2o status", REGISTRY_MODULES)
    from l2o.io.secrets import redacted_config
    from services.registry import list_runs, run_status

    if run is None:
        table = Table("run", "state", "created")
        rows = [r for client in _registry_clients(redis_url, run_dir) for r in list_runs(client)]
        for r in sorted(rows, key=lambda r: -r["created_at"]):
            table.add_row(r["run_id"], str(r["state"]), time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])))
        console.print(table)
        return
    info = None
    for client in _registry_clients(redis_url, run_dir):
        try:
            # redacted again: a manifest written before redaction may hold the Redis password
            info = redacted_config(run_status(client, run))
            break
        except KeyError:
            continue
    if info is None:
        _fail(f"no run {run!r} in the registry (give --run-dir or --redis-url)")
        return
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    table = Table("figure", "value", title=f"run {run}")
    for key in ("state", "learner_address", "checkpoints", "evals", "eval_backlog",
                "dead_letters", "heartbeat_age_s"):
        table.add_row(key, str(info.get(key)))
    for key, value in sorted((info.get("status") or {}).items()):
        table.add_row(f"status.{key}", str(value))
    if info.get("latest_eval"):
        for key in ("version", "learned_final_loss", "adam_final_loss", "speedup"):
            table.add_row(f"latest_eval.{key}", str(info["latest_eval"].get(key)))
    console.print(table)


@app.command("leaderboard")
def leaderboard_cmd(
    top: Annotated[int, typer.Option(min=1, help="Rows to show.")] = 10,
    run: Annotated[str | None, typer.Option(help="Only this run (its id).")] = None,
    redis_url: RedisUrlOption = None,
    run_dir: RunDirOption = None,
) -> None:
    """The best scored checkpoints (learned / tuned-Adam final loss; lower is better)."""
    _require_service("l2o leaderboard", REGISTRY_MODULES)
    from services.registry import leaderboard

    rows = sorted((r for client in _registry_clients(redis_url, run_dir)
                   for r in leaderboard(client, top=top, run_id=run)),
                  key=lambda r: r["score"])[:top]
    table = Table("#", "run", "version", "score", "learned", "adam", "speedup", "task")
    for i, r in enumerate(rows, 1):
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        table.add_row(str(i), r["run_id"], fmt(r.get("version")),
                      fmt(r.get("score")), fmt(r.get("learned_final_loss")),
                      fmt(r.get("adam_final_loss")), fmt(r.get("speedup")), str(r.get("task")))
    console.print(table)


def main() -> None:
    """Entry point for ``python -m services.cli``."""
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
