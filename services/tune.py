"""Population search with Ray Tune: ``l2o tune`` / ``python -m services.tune --config FILE``.

The config's ``tune:`` section (:class:`l2o.io.config.TuneConfig`) names a scheduler (``pbt``,
``pb2``, ``asha``, or ``none``: random search), a population and a search space over dotted config
fields. :func:`run_tune` starts (or, with ``resume``, restores: ``Tuner.restore``) one Tune
experiment under the run directory (``RUN_DIR/tune``) whose trials are :func:`trial_main`:

- **A trial is a learner with its own unroll workers.** ``trial_main`` drives a
  :class:`services.train.ServiceRun` (run id ``EXPERIMENT/TRIAL``, run directory
  ``RUN_DIR/trials/TRIAL``) whose learner and unroll workers are Ray actors created from inside the
  trial, so Tune's placement group (:func:`trial_resources`: one bundle for the trial's own
  process, one for the learner, one per unroll worker) captures them and trials cannot starve
  each other.
- **Scoring.** Every ``perturbation_interval`` meta-updates the trial pauses its unroll workers
  (run state ``paused``: the interval stays an interval), has its learner write a checkpoint (its
  eval job goes to the trial's Redis eval stream) and scores it with an
  :class:`workers.eval_worker.EvalWorker` running *in the trial's own process*: evaluation is per
  trial, not one pool for all. A trial must wait for its own score before it can report, so a
  shared pool would make every report queue behind the other trials' jobs; scored in the trial's
  bundle, evaluation is charged to the trial's resources. The tuned-Adam baseline is computed
  once by the driver and cached in Redis under the eval task's key. The result lands on the
  leaderboard as ``EXPERIMENT/TRIAL@VERSION``.
- **Report.** ``tune.report({"score", "interval", "meta_updates", …}, checkpoint=…)``: the
  score is the leaderboard's (learned / tuned-Adam final loss; lower is better) and the Tune
  checkpoint holds the learner's full checkpoint (θ and meta-optimizer state) plus
  ``trial.json``. Schedulers count time in reports (``interval``, carried over on an exploit),
  not in meta-updates: the workers stop a few updates past each interval's goal, by more on a
  fast machine, and PBT must see every report as one interval (:data:`TIME_ATTR`). Every trial
  reports ``ceil(max_updates_per_trial / perturbation_interval)`` times, so the population stays
  together until its last interval and a late trial still has live trials to exploit.
- **Exploit.** A trial started with a Tune checkpoint (``tune.get_checkpoint()``) adopts its θ and
  meta-optimizer state through the learner (``LearnerProcess.restore_theta``: a new generation,
  so a gradient computed on the old θ is refused as STALE_GENERATION), with the trial's new
  (perturbed) hyperparameters. When the checkpoint is another trial's (a PBT/PB2 exploit) the
  trial pushes one gradient stamped with its old generation to check it is refused and appends
  the event to ``trials/TRIAL/exploits.jsonl``.
- **Failures.** A trial whose learner restarted (killed: a new incarnation) raises, and Tune
  retries it from its last checkpoint (``FailureConfig(max_failures=tune.max_failures)``).

At the end :func:`summarize` writes ``tune_summary.json`` (the best trial, its hyperparameter
schedule and its best params checkpoint, which ``l2o eval`` and the optax bridge load), ``pbt.png``
(:func:`plot_population`) and returns what :func:`format_table` shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from l2o.io.config import ConfigError, TrainConfig, config_from_dict, set_dotted
from l2o.io.storage import is_remote

log = logging.getLogger(__name__)

#: In a Tune checkpoint: the trial's record and the learner's full checkpoint.
TRIAL_FILE = "trial.json"
FULL_FILE = "full.ckpt"
#: In a trial's run directory: one JSON line per exploit / per start of the trial.
EXPLOITS_FILE = "exploits.jsonl"
#: Every report of a trial, as it made it (Tune's own per-trial result files lose rows when a
#: paused or exploiting trial restarts, so the summary is built from these).
REPORTS_FILE = "reports.jsonl"
ATTEMPTS_FILE = "attempts.jsonl"
#: The experiment's name under the run directory (Tune's own files).
EXPERIMENT_DIR = "tune"
SUMMARY_FILE = "tune_summary.json"
PLOT_FILE = "pbt.png"
#: The schedulers' clock: a trial's reports so far (one per interval, its donor's on an exploit).
TIME_ATTR = "interval"

#: Metrics keys of the searched hyperparameters in a trial's reports.
HP_PREFIX = "hp_"
#: How long a trial waits for its checkpoint's score.
SCORE_TIMEOUT_S = 600.0


# ------------------------------------------------------------------------------------------------
# Search space and scheduler


def _domain(dim: Any) -> Any:
    """The Tune sampler of a :class:`~l2o.io.config.SearchDimension`."""
    from ray import tune

    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    return (tune.loguniform if dim.kind == "loguniform" else tune.uniform)(dim.low, dim.high)


def param_space(tc: Any) -> dict[str, Any]:
    """Tune's ``param_space``: one sampler per searched dotted field."""
    return {key: _domain(dim) for key, dim in tc.search_space.items()}


def make_scheduler(tc: Any) -> Any:
    """The trial scheduler of ``tc.scheduler`` (``None`` for ``none``: FIFO random search).

    Times are in intervals (:data:`TIME_ATTR`): every report may perturb, and ASHA's rungs are
    report counts. PB2 takes continuous bounds only: a ``choice`` is refused naming its field.
    """
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if tc.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr=TIME_ATTR, perturbation_interval=1,
            hyperparam_mutations=param_space(tc), quantile_fraction=tc.quantile_fraction,
            resample_probability=tc.resample_probability)
    if tc.scheduler == "pb2":
        from ray.tune.schedulers.pb2 import PB2

        bounds = {}
        for key, dim in tc.search_space.items():
            if dim.kind == "choice":
                raise ConfigError(f"tune.search_space.{key}: pb2 searches continuous ranges only "
                                  "(uniform or loguniform), not a choice")
            bounds[key] = [dim.low, dim.high]
        return PB2(time_attr=TIME_ATTR, perturbation_interval=1,
                   hyperparam_bounds=bounds, quantile_fraction=tc.quantile_fraction)
    if tc.scheduler == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=reports_per_trial(tc), grace_period=1,
                             reduction_factor=2)
    return None


def reports_per_trial(tc: Any) -> int:
    """How many times a trial reports: once per ``perturbation_interval`` meta-updates until
    ``max_updates_per_trial``."""
    return math.ceil(tc.max_updates_per_trial / tc.perturbation_interval)


def trial_resources(cfg: TrainConfig) -> Any:
    """The placement group of one trial: its own process, its learner, its unroll workers."""
    from ray import tune

    svc = cfg.service
    worker = {"CPU": svc.worker_num_cpus}
    if svc.worker_num_gpus > 0:
        worker["GPU"] = svc.worker_num_gpus
    return tune.PlacementGroupFactory(
        [{"CPU": cfg.tune.trial_cpus}, {"CPU": svc.worker_num_cpus},
         *([worker] * svc.num_unroll_workers)])


def experiment_cpus(cfg: TrainConfig) -> float:
    """Logical CPUs of the trials that run at once, plus one trial's worth: a trial restarting
    after an exploit starts at once instead of pending (PBT pauses the trials that report while
    another one pends)."""
    tc, svc = cfg.tune, cfg.service
    per_trial = tc.trial_cpus + (1 + svc.num_unroll_workers) * svc.worker_num_cpus
    return per_trial * (1 + min(tc.population, tc.max_concurrent_trials or tc.population))


# ------------------------------------------------------------------------------------------------
# One trial


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def trial_config(base: dict[str, Any], hparams: dict[str, Any], run_dir: Path,
                 trial_id: str) -> TrainConfig:
    """The config a trial trains: ``base`` with its sampled ``hparams`` (a float sampled for an
    integer field rounded), run directory ``run_dir/trial_id``, no eval pool of its own, and
    checkpoints only when the trial reports."""
    data = {k: v for k, v in base.items() if k != "tune"}
    for key, value in hparams.items():
        current = _get_dotted(data, key)
        if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
            value = round(value)
        data = set_dotted(data, key, value)
    data = set_dotted(data, "service.num_eval_workers", 0)
    data.update(run_dir=str(run_dir), run_name=trial_id, checkpoint_every=10**9,
                time_budget_s=None)
    return config_from_dict(data, f"trial {trial_id}")


def _append_jsonl(path: Path, entry: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The entries of a JSON-lines file (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _free_actor_names(run_id: str, roles: list[str], timeout_s: float = 30.0) -> None:
    """Kill actors of ``run_id`` left by an earlier start of the trial (a PBT restart or a retry
    may begin before Ray has reaped them), so their names can be taken again."""
    import ray

    from workers.ray_setup import actor_name

    deadline = time.monotonic() + timeout_s
    for role in roles:
        name = actor_name(run_id, role)
        while time.monotonic() < deadline:
            try:
                ray.kill(ray.get_actor(name), no_restart=True)
            except ValueError:  # no such actor (any more)
                break
            time.sleep(0.2)


def _probe_old_generation(run: Any, gen_before: int) -> str:
    """Push a zero gradient stamped with generation ``gen_before`` to the learner; the reason it
    gives (STALE_GENERATION after a new generation)."""
    import jax
    import numpy as np

    from l2o.training.build import learned_optimizer_from_config, theta_key
    from services.client import reason_name

    template = learned_optimizer_from_config(run.cfg.optimizer).init(theta_key(run.cfg.seed))
    fetched = run.client.fetch(have_version=-1, like=template)
    zeros = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.float32), template)
    incarnation = int(run.client.status()["incarnation"])
    ack = run.client.push_gradient(zeros, theta_version=int(fetched.version), gen_id=gen_before,
                                   incarnation=incarnation, worker_id="tune-probe", seq=0)
    return reason_name(ack)


def _placement_groups(run: Any) -> dict[str, Any]:
    """The Ray placement groups of the trial's own process, its learner and its unroll workers:
    all the trial's one (Tune's, which captures the actors the trial creates)."""
    import ray

    stats = ray.get([w.stats.remote() for w in run.unroll], timeout=60.0)
    return {"trial": ray.get_runtime_context().get_placement_group_id(),
            "learner": ray.get(run.learner.placement_group_id.remote(), timeout=60.0),
            "unroll": [s["placement_group_id"] for s in stats]}


def _unpack(checkpoint: Any, trial_dir: Path) -> tuple[dict[str, Any], Path]:
    """The Tune ``checkpoint``'s trial record, and its full checkpoint copied into
    ``trial_dir/incoming`` (where the learner actor can read it)."""
    with checkpoint.as_directory() as d:
        info = json.loads((Path(d) / TRIAL_FILE).read_text())
        incoming = trial_dir / "incoming"
        incoming.mkdir(exist_ok=True)
        local = incoming / f"{info['trial_id']}_v{info['version']:08d}.ckpt"
        shutil.copyfile(Path(d) / FULL_FILE, local)
    return info, local


def _adopt(run: Any, info: dict[str, Any], local: Path, trial_id: str, trial_dir: Path) -> None:
    """Adopt the full checkpoint ``local`` (θ and meta-optimizer state; ``info`` its trial
    record) as a new generation of the trial's learner; log it as an exploit when it is another
    trial's."""
    import ray

    gen_before = int(run.client.status()["gen_id"])
    got = ray.get(run.learner.restore_theta.remote(str(local)), timeout=120.0)
    if info["trial_id"] != trial_id:
        _append_jsonl(trial_dir / EXPLOITS_FILE, {
            "meta_updates": info["meta_updates"], "donor": info["trial_id"],
            "donor_version": info["version"], "donor_checkpoint": str(local),
            "gen_before": gen_before, "gen_after": got["gen_id"],
            "version_after": got["version"], "params_after": got["checkpoint"],
            "old_generation_push": _probe_old_generation(run, gen_before),
            "time": time.time()})


def _score(run: Any, evaluator: Any, version: int) -> dict[str, Any]:
    """Score θ ``version`` (its eval job is queued) with the trial's evaluator; the result."""
    deadline = time.monotonic() + SCORE_TIMEOUT_S
    while (result := run.registry.eval_result(version)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"θ version {version} of {run.run_id} was not scored within "
                               f"{SCORE_TIMEOUT_S:.0f} s")
        evaluator.run(until_drained=False, max_jobs=1)
    return result


def _report(run: Any, params_path: str, record: dict[str, Any], metrics: dict[str, Any]) -> None:
    """``tune.report`` the metrics with a checkpoint of the learner's full state."""
    from ray import tune

    from l2o.io.checkpoints import checkpoint_path

    full = checkpoint_path(run.run_dir, "full", record["version"])
    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(full, Path(d) / FULL_FILE)
        (Path(d) / TRIAL_FILE).write_text(json.dumps({**record, "params": params_path}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _share_compilation_cache(path: str) -> None:
    """Use the persistent JAX compilation cache at ``path`` here and in the actors this process
    starts (``workers.ray_setup.jax_env`` passes it on), unless one is set already: a trial
    restarted by an exploit or a retry then loads its programs instead of compiling them."""
    import jax

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", path)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def trial_main(hparams: dict[str, Any], *, base: dict[str, Any], experiment_id: str,
               trials_dir: str, redis_url: str | None) -> None:
    """A Tune function trainable: one learner and its unroll workers meta-train ``base`` with
    ``hparams``, reporting the eval score every ``tune.perturbation_interval`` meta-updates
    until ``tune.max_updates_per_trial`` (or ``tune.time_budget_s``)."""
    import ray
    from ray import tune

    from l2o.io.checkpoints import read_checkpoint
    from services.registry import PAUSED
    from services.train import ServiceRun
    from workers.eval_worker import EvalWorker

    tc = TrainConfig.model_validate(base).tune
    _share_compilation_cache(str(Path(trials_dir).parent / "jax_cache"))
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, hparams, Path(trials_dir), trial_id)
    run_id = f"{experiment_id}/{trial_id}"
    trial_dir = cfg.run_path().resolve()
    trial_dir.mkdir(parents=True, exist_ok=True)
    _free_actor_names(run_id, ["learner", *(f"unroll-{i}" for i in
                                            range(cfg.service.num_unroll_workers))])
    checkpoint = tune.get_checkpoint()
    info, local = _unpack(checkpoint, trial_dir) if checkpoint is not None else (None, None)
    run = ServiceRun(cfg, redis_url, run_id=run_id)
    try:
        run.start()
        _append_jsonl(trial_dir / ATTEMPTS_FILE, {
            "time": time.time(), "hparams": hparams,
            "checkpoint_of": info["trial_id"] if info else None,
            "placement_groups": _placement_groups(run)})
        meta_updates = interval = 0
        if info is not None:
            _adopt(run, info, local, trial_id, trial_dir)
            # a started trial always reports again: one taken over at a donor's last interval
            # scores what it adopted after one more interval of its own hyperparameters
            meta_updates = int(info["meta_updates"])
            interval = min(int(info.get("interval", 0)), reports_per_trial(tc) - 1)
        evaluator = EvalWorker(run_id, run.url, "trial")
        incarnation = run.client.status()["incarnation"]

        def same_learner(status: dict[str, Any]) -> None:
            if status.get("incarnation") != incarnation:
                raise RuntimeError(f"the learner of trial {trial_id} restarted; Tune retries the "
                                   "trial from its last checkpoint")

        t0 = time.monotonic()
        exploits = len(read_jsonl(trial_dir / EXPLOITS_FILE))
        # a trial's meta-updates: the adopted checkpoint's plus its learner's since this start,
        # counted at each reported checkpoint (an interval may overshoot by a few)
        adopted, updates0 = meta_updates, int(run.client.status()["updates"])
        while interval < reports_per_trial(tc):
            goal = meta_updates + tc.perturbation_interval
            interval += 1
            run.cfg = cfg.model_copy(update={"meta_steps": updates0 + goal - adopted})
            run.loop(same_learner, poll_s=0.1)
            run.registry.set_status(PAUSED)  # the unroll workers wait while θ is scored
            params_path = ray.get(run.learner.checkpoint.remote(), timeout=120.0)
            meta = read_checkpoint(params_path)[1]
            version = int(meta["version"])
            meta_updates = adopted + int(meta["updates"]) - updates0
            result = _score(run, evaluator, version)
            status = run.client.status()
            record = {"trial_id": trial_id, "run_id": run_id, "version": version,
                      "gen_id": int(status["gen_id"]), "meta_updates": meta_updates,
                      "interval": interval,
                      "score": float(result["score"]), "hparams": hparams}
            metrics = {"score": float(result["score"]), TIME_ATTR: interval,
                       "meta_updates": meta_updates,
                       "version": version, "gen_id": int(status["gen_id"]),
                       "exploits": exploits, "meta_loss": float(status["last_meta_loss"]),
                       **{HP_PREFIX + k: v for k, v in hparams.items()}}
            run.registry.set_status(None, meta_updates=meta_updates, score=metrics["score"])
            _append_jsonl(trial_dir / REPORTS_FILE, {"time": time.time(), **metrics})
            _report(run, params_path, record, metrics)
            run.registry.set_status("running")
            if tc.time_budget_s is not None and time.monotonic() - t0 > tc.time_budget_s:
                break
        run.registry.set_status("done")
    except BaseException as e:
        run.mark_failed(e)
        raise
    finally:
        run.close()


# ------------------------------------------------------------------------------------------------
# The experiment


def run_tune(cfg: TrainConfig, *, resume: bool = False, address: str | None = None,
             verbose: int = 1) -> dict[str, Any]:
    """Run (or with ``resume`` continue) the population search of ``cfg.tune``; the summary
    (also written to ``RUN_DIR/tune_summary.json``, with ``pbt.png``)."""
    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from l2o.training.job import is_unsupervised
    from services import redis_server
    from services.registry import Registry, run_id_for
    from workers.eval_worker import cached_adam_baseline
    from workers.ray_setup import connect_ray

    tc = cfg.tune
    if tc is None:
        raise ConfigError("the config has no tune: section (see `l2o tune --help`)")
    if not tc.search_space:
        raise ConfigError("tune.search_space: list at least one field to search")
    if is_remote(cfg.run_dir):  # Tune's trial directories and checkpoints are local files
        raise ConfigError("run_dir: a population search keeps its experiment in a local (or "
                          "shared, mounted) directory, not a storage URL")
    scheduler = make_scheduler(tc)  # refuses what the scheduler cannot search, before starting
    run_dir = cfg.run_path().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    experiment_id = run_id_for(run_dir, cfg.run_name)
    client, url, started_redis = redis_server.owned_connection(
        cfg.service.redis_url, data=redis_server.run_data_dir(run_dir))
    embedded = url in redis_server.embedded_urls()
    # every trial scores against the same tuned-Adam sweep: computed once, here, not by the
    # first trial of each while its learner trains on
    if not is_unsupervised(cfg):
        cached_adam_baseline(cfg, Registry(client, experiment_id))
    started_ray = connect_ray(experiment_cpus(cfg), address)
    base = cfg.model_dump(mode="json")
    trainable = tune.with_resources(
        tune.with_parameters(trial_main, base=base, experiment_id=experiment_id,
                             trials_dir=str(run_dir / "trials"),
                             # an embedded server's socket; otherwise each trial reads its URL
                             # from the config or $REDIS_URL (a password stays out of Tune's state)
                             redis_url=url if embedded else None),
        trial_resources(cfg))
    path = run_dir / EXPERIMENT_DIR
    try:
        if resume and tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
        else:
            if resume:
                log.warning("no experiment to resume in %s; starting one", path)
            tuner = tune.Tuner(
                trainable, param_space=param_space(tc),
                tune_config=tune.TuneConfig(
                    metric="score", mode="min", scheduler=scheduler, num_samples=tc.population,
                    # the same seed samples the same starting population, whatever the scheduler;
                    # the generator itself limits concurrency (Tune ignores TuneConfig's
                    # max_concurrent_trials when it is given a generator)
                    search_alg=BasicVariantGenerator(
                        random_state=tc.seed, max_concurrent=tc.max_concurrent_trials or 0)),
                run_config=tune.RunConfig(
                    name=EXPERIMENT_DIR, storage_path=str(run_dir), verbose=verbose,
                    failure_config=tune.FailureConfig(max_failures=tc.max_failures)))
        results = tuner.fit()
        return summarize(cfg, results, client, experiment_id, run_dir)
    finally:
        if started_ray:
            ray.shutdown()
        if started_redis:
            redis_server.shutdown_embedded(url)


def _trial_rows(results: Any, run_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: its reports (from ``trials/TRIAL/reports.jsonl``), exploits, starts,
    final and best score."""
    keep = ("score", TIME_ATTR, "meta_updates", "version", "gen_id")
    rows = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_of(Path(result.path))
        trial_dir = run_dir / "trials" / trial_id
        reports = [{k: v for k, v in r.items() if k in keep or k.startswith(HP_PREFIX)}
                   for r in read_jsonl(trial_dir / REPORTS_FILE)]
        scores = [r["score"] for r in reports if r.get("score") is not None]
        rows.append({
            "trial_id": trial_id, "hparams": result.config,
            "final_score": scores[-1] if scores else None,
            "best_score": min(scores) if scores else None,
            "meta_updates": reports[-1]["meta_updates"] if reports else 0,
            "exploits": read_jsonl(trial_dir / EXPLOITS_FILE),
            "starts": len(read_jsonl(trial_dir / ATTEMPTS_FILE)),
            "error": str(result.error) if result.error else None,
            "reports": reports})
    return sorted(rows, key=lambda r: r["trial_id"])


def _trial_id_of(trial_path: Path) -> str:
    """The trial id in Tune's trial directory name ``trial_main_<exp>_<index>_...``."""
    return "_".join(trial_path.name.split("_")[2:4])


def summarize(cfg: TrainConfig, results: Any, client: Any, experiment_id: str,
              run_dir: Path) -> dict[str, Any]:
    """Write ``tune_summary.json`` and ``pbt.png`` for a finished experiment; the summary.

    The best trial is the one whose report had the lowest score; its best params checkpoint is
    the one that report scored (its leaderboard row ``EXPERIMENT/TRIAL@VERSION``).
    """
    from l2o.io.atomic import write_json
    from services.registry import Registry

    rows = _trial_rows(results, run_dir)
    reported = [(r["score"], row["trial_id"], int(r["version"])) for row in rows
                for r in row["reports"] if r.get("score") is not None]
    _, best_trial, best_version = min(reported) if reported else (None, None, None)
    best_row = (Registry(client, f"{experiment_id}/{best_trial}").eval_result(best_version)
                if best_trial else None)
    best = next((r for r in rows if r["trial_id"] == best_trial), None)
    summary = {
        "experiment": experiment_id, "scheduler": cfg.tune.scheduler,
        "population": cfg.tune.population, "metric": "score (learned / tuned-Adam final loss; "
                                                      "lower is better)",
        "experiment_dir": str(run_dir / EXPERIMENT_DIR),
        "best_trial": best_trial,
        "best_score": best_row["score"] if best_row else None,
        "best_version": best_row["version"] if best_row else None,
        "best_checkpoint": best_row.get("checkpoint") if best_row else None,
        "best_hparams": best["hparams"] if best else None,
        "best_schedule": ([{"meta_updates": r["meta_updates"],
                            **{k.removeprefix(HP_PREFIX): v for k, v in r.items()
                               if k.startswith(HP_PREFIX)}} for r in best["reports"]]
                          if best else []),
        "exploits": sum(len(r["exploits"]) for r in rows),
        "trials": rows,
    }
    write_json(run_dir / SUMMARY_FILE, summary)
    plot_population(summary, run_dir / PLOT_FILE)
    return summary


def plot_population(summary: dict[str, Any], path: Path) -> None:
    """``pbt.png``: every trial's score over meta-updates (exploits marked ×) and, below, the
    best trial's hyperparameter schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedule = summary["best_schedule"]
    keys = sorted({k for s in schedule for k in s if k != "meta_updates"})
    fig, axes = plt.subplots(1 + len(keys), 1, figsize=(8, 3.2 * (1 + len(keys))), squeeze=False)
    ax = axes[0][0]
    for row in summary["trials"]:
        pts = [(r["meta_updates"], r["score"]) for r in row["reports"]
               if r.get("score") is not None]
        if not pts:
            continue
        (line,) = ax.plot(*zip(*pts, strict=True), marker=".", label=row["trial_id"])
        for event in row["exploits"]:
            after = [s for m, s in pts if m > event["meta_updates"]]
            if after:
                ax.plot(event["meta_updates"], after[0], "x", color=line.get_color(),
                        markersize=10)
    ax.set_xlabel("meta-updates")
    ax.set_ylabel("score (learned / tuned Adam)")
    if all(r["score"] > 0 for row in summary["trials"] for r in row["reports"]
           if r.get("score") is not None):
        ax.set_yscale("log")
    ax.set_title(f"{summary['scheduler']} population ({summary['exploits']} exploits, ×)")
    ax.legend(fontsize=7)
    for i, key in enumerate(keys, start=1):
        a = axes[i][0]
        pts = [(s["meta_updates"], s[key]) for s in schedule if s.get(key) is not None]
        if pts:
            a.step(*zip(*pts, strict=True), where="post", marker=".")
        a.set_ylabel(key, fontsize=8)
        a.set_xlabel(f"meta-updates (best trial {summary['best_trial']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(summary: dict[str, Any]) -> Any:
    """A rich table of the trials: scores, hyperparameters, exploits, starts."""
    from rich.table import Table

    table = Table(title=f"{summary['experiment']} ({summary['scheduler']}): best "
                        f"{summary['best_trial']} score {summary['best_score']}")
    for col in ("trial", "final score", "best score", "meta-updates", "exploits", "starts",
                "hyperparameters"):
        table.add_column(col)
    for row in summary["trials"]:
        hp = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row["hparams"].items())
        mark = " *" if row["trial_id"] == summary["best_trial"] else ""
        table.add_row(row["trial_id"] + mark, _fmt(row["final_score"]), _fmt(row["best_score"]),
                      str(row["meta_updates"]), str(len(row["exploits"])), str(row["starts"]),
                      hp)
    return table


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


# ------------------------------------------------------------------------------------------------
# Configs and the command line

#: The embedded default of ``l2o tune`` (the ``tune-quadratic`` preset).
DEFAULT_PRESET = "tune-quadratic"


def tune_config(config: Path | None = None, preset_name: str | None = None,
                overrides: list[str] | None = None) -> TrainConfig:
    """The experiment's config: ``preset_name`` (default :data:`DEFAULT_PRESET` when no file is
    given), the YAML ``config`` merged over it, then ``KEY=VALUE`` overrides."""
    from l2o.io.config import apply_overrides, deep_merge, load_config, preset

    name = preset_name or (None if config else DEFAULT_PRESET)
    base = preset(name).model_dump(mode="json", exclude_unset=False) if name else {}
    if config is not None:
        base = deep_merge(base, load_config(config).model_dump(mode="json", exclude_unset=True))
    cfg = config_from_dict(base, str(config or f"preset {name}"))
    cfg = apply_overrides(cfg, overrides) if overrides else cfg
    if cfg.tune is None:
        raise ConfigError(f"{config or name}: no tune: section (a population search needs one)")
    from workers.ray_setup import job_run_dir_problem

    for problem in [*cfg.service.missing_files(), job_run_dir_problem(cfg.run_dir)]:
        if problem:
            raise ConfigError(problem)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """``python -m services.tune --config FILE [--preset NAME] [--set K=V] [--resume]``."""
    from rich.console import Console

    p = argparse.ArgumentParser(prog="python -m services.tune",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="YAML config with a tune: section")
    p.add_argument("--preset", help=f"named preset (default {DEFAULT_PRESET} without --config)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="KEY=VALUE override of any dotted field")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local instance)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = tune_config(args.config, args.preset, args.overrides)
        summary = run_tune(cfg, resume=args.resume, address=args.address)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    Console().print(format_table(summary))
    run_dir = cfg.run_path().resolve()
    print(f"results in {run_dir} ({SUMMARY_FILE}, {PLOT_FILE}, trials/, tune/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
