"""The ``l2o`` command line: train, evaluate, inspect.

``l2o train`` with no arguments runs the default job (the L2L LSTM meta-trained on digits MLPs).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from l2o.io.config import PRESETS, ConfigError, TrainConfig, apply_overrides, load_config, preset

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
        cfg = cfg.model_copy(update={k: v for k, v in overrides.items() if v is not None})
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


@app.command()
def train(
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    preset_name: Annotated[str | None, typer.Option("--preset", help="Named preset.")] = None,
    run_name: Annotated[str | None, typer.Option(help="Override run_name.")] = None,
    run_dir: Annotated[str | None, typer.Option(help="Override run_dir.")] = None,
    meta_steps: Annotated[int | None, typer.Option(help="Override meta_steps.")] = None,
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
    from l2o.io.checkpoints import CheckpointError

    if fresh and cfg.run_path().exists():
        aside = cfg.run_path().with_name(f"{cfg.run_name}.{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.run_path().rename(aside)
        console.print(f"moved the previous run dir to {aside}")
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
                from services.train import run_service

                summary = run_service(cfg, progress=lambda s: show(
                    int(s.get("updates", 0)),
                    f"update {s.get('updates', 0)} meta-loss {s.get('last_meta_loss', 0):.4g} "
                    f"{s.get('gradients_per_second', 0):.1f} grads/s, "
                    f"staleness {s.get('staleness_mean', 0):.2f}"))
        except CheckpointError as e:  # e.g. no intact checkpoint to resume from
            # from the learner actor it is a RayTaskError too, its text a traceback; .cause is it
            cause = getattr(e, "cause", None) or e
            _fail(f"{cause} (the files are left as they are; --fresh starts the run over)")
    console.print(_summary_table(summary))
    if (summary.get("eval") or {}).get("kind") == "unsupervised_rule":
        from l2o.unsupervised.evaluation import format_result

        console.print(format_result(summary["eval"]), markup=False)
    console.print(f"wrote {cfg.run_path() / 'summary.json'}")


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A params or full checkpoint file.")],
    task: Annotated[str, typer.Option(help="Task name (see `l2o tasks`).")] = "digits_mlp",
    steps: Annotated[int, typer.Option(help="Inner steps.")] = 100,
    seeds: Annotated[int, typer.Option(help="Fresh initializations.")] = 5,
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
        help="With --suite heldout: shard the tasks over this many eval workers (Ray actors, "
             "one job per task on a Redis stream; local Ray and the embedded Redis unless "
             "$RAY_ADDRESS / $REDIS_URL). 0: score them in this process.")] = 0,
) -> None:
    """Score a checkpoint's optimizer on a task (or a suite of tasks) against tuned Adam."""
    import jax

    if pool < 0:
        _fail("--pool must be 0 or more")
    if pool and suite in (None, "l2o-scale"):
        _fail("--pool shards a held-out suite: give --suite heldout")
    if suite == "l2o-scale":
        _eval_suite(checkpoint, suite, offline, steps, seeds, out)
        return
    if suite is not None:
        _eval_heldout(checkpoint, suite, seeds, out, _split_names(tasks), pool)
        return

    from l2o.evaluation.comparison import evaluate
    from l2o.io.checkpoints import CheckpointError
    from l2o.io.config import TaskConfig
    from l2o.training.build import task_family_from_config
    from l2o.training.job import load_theta

    try:
        lopt, theta, meta = load_theta(checkpoint)
        if lopt.name == "unsupervised_rule":  # scored by its features, not against Adam
            _eval_unsupervised(checkpoint, lopt, theta, meta, steps, seeds, out)
            return
        family = task_family_from_config(TaskConfig(name=task))
    except (CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        _fail(str(e))
        return
    k_task, k_run = jax.random.split(jax.random.PRNGKey(0))
    result = evaluate(family.sample_task(k_task), lopt, theta, steps=steps, seeds=seeds,
                      key=k_run, adam_learning_rates=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                      adam_steps=5 * steps)
    summary = {"run": str(checkpoint), "eval": {k: v for k, v in result.items()
                                                 if not isinstance(v, list | dict)}}
    console.print(_summary_table(summary))
    if out is not None:
        from l2o.training.job import write_outputs

        write_outputs(out, summary, result)
        console.print(f"wrote {out / 'summary.json'}")


def _eval_unsupervised(checkpoint: Path, lopt: Any, theta: Any, meta: dict[str, Any], steps: int,
                       seeds: int, out: Path | None) -> None:
    """``l2o eval`` of an unsupervised-rule checkpoint: its run's base model and data, rule
    features vs random-init vs supervised (``l2o.unsupervised.evaluation``)."""
    from l2o.io.checkpoints import CheckpointError, latest_checkpoint, read_checkpoint
    from l2o.io.config import TrainConfig
    from l2o.training.job import evaluate_theta
    from l2o.unsupervised.evaluation import format_result

    config = meta.get("config")
    if config is None:  # a params checkpoint: the run's config is in a full one beside it
        full = latest_checkpoint(checkpoint.resolve().parent.parent, "full")
        config = read_checkpoint(full)[1].get("config") if full is not None else None
    if config is None:
        raise CheckpointError(f"{checkpoint}: the unsupervised rule needs its run's base model "
                              "and data; give a full checkpoint or one inside its run directory")
    cfg = TrainConfig.model_validate(config)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"steps": steps,
                                                                     "seeds": seeds})})
    figures = out if out is not None else checkpoint.resolve().parent
    result = evaluate_theta(cfg, lopt, theta, figures_dir=figures)
    console.print(format_result(result))
    if out is not None:
        from l2o.io.atomic import write_json

        write_json(out / "summary.json", {"run": str(checkpoint), "eval": result})
        console.print(f"wrote {out / 'summary.json'}")


def _eval_suite(checkpoint: Path, suite: str, offline: bool, steps: int, seeds: int,
                out: Path | None) -> None:
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
        lopt, theta, _ = load_theta(checkpoint)
    except (CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        _fail(str(e))
        return
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
                       key=k_run, adam_learning_rates=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                       adam_steps=5 * steps)
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


def _eval_heldout(checkpoint: Path, suite: str, seeds: int, out: Path | None,
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
    try:
        if pool:
            from workers.eval_worker import evaluate_on_suite_with_pool

            result = evaluate_on_suite_with_pool(checkpoint, suite, pool, tasks=names,
                                                 seeds=seeds, out_dir=out, label=checkpoint.name,
                                                 log_line=_suite_log)
        else:
            result = evaluate_on_suite(
                lambda n: as_gradient_transformation(lopt, theta, num_steps=n), suite,
                tasks=names, seeds=seeds, out_dir=out, label=checkpoint.name, log=_suite_log)
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
    table = Table("preset", "overrides")
    for name, over in sorted(PRESETS.items()):
        table.add_row(name, json.dumps(over) if over else "(the default job)")
    console.print(table)


def _registry_client(redis_url: str | None):
    from services.redis_server import redis_connection  # after _require_service: needs redis

    try:
        client, _ = redis_connection(redis_url, reuse_running=True)
    except ConnectionError as e:
        _fail(str(e))
    return client


@app.command()
def status(
    run: Annotated[str | None, typer.Argument(help="Run id; omit to list runs.")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (default: $REDIS_URL, "
                                                        "else the embedded server).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A run's state, counters, checkpoints and latest evaluation, from the registry."""
    _require_service("l2o status", REGISTRY_MODULES)
    from l2o.io.secrets import redacted_config
    from services.registry import list_runs, run_status

    client = _registry_client(redis_url)
    if run is None:
        table = Table("run", "state", "created")
        for r in list_runs(client):
            table.add_row(r["run_id"], str(r["state"]), time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])))
        console.print(table)
        return
    try:
        # redacted again: a manifest written before redaction may hold the Redis password
        info = redacted_config(run_status(client, run))
    except KeyError as e:
        _fail(str(e.args[0]))
        return
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    table = Table("figure", "value", title=f"run {run}")
    for key in ("state", "learner_address", "checkpoints", "evals", "eval_backlog",
                "dead_letters"):
        table.add_row(key, str(info.get(key)))
    for key, value in sorted((info.get("status") or {}).items()):
        if key != "state":
            table.add_row(f"status.{key}", str(value))
    if info.get("latest_eval"):
        for key in ("version", "learned_final_loss", "adam_final_loss", "speedup"):
            table.add_row(f"latest_eval.{key}", str(info["latest_eval"].get(key)))
    console.print(table)


@app.command("leaderboard")
def leaderboard_cmd(
    top: Annotated[int, typer.Option(help="Rows to show.")] = 10,
    run: Annotated[str | None, typer.Option(help="Only this run.")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (default: $REDIS_URL, "
                                                        "else the embedded server).")] = None,
) -> None:
    """The best scored checkpoints (learned / tuned-Adam final loss; lower is better)."""
    _require_service("l2o leaderboard", REGISTRY_MODULES)
    from services.registry import leaderboard

    rows = leaderboard(_registry_client(redis_url), top=top, run_id=run)
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
