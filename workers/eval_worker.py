"""``EvalWorker``: scores params checkpoints from the run's eval queue, as a Ray actor.

Loop: claim a job from the Redis stream's consumer group (a job left idle by a dead worker is
reclaimed first, see :meth:`services.registry.Registry.claim_eval`) → load the params checkpoint →
score it on the held-out eval task of the run's config (learned optimizer vs Adam tuned over the
config's learning-rate grid; the sweep is cached in Redis per task key, so it runs once per run
config, not once per checkpoint) → store the result and its leaderboard entry → acknowledge.

A job that raises is re-queued and, after ``eval_max_deliveries`` deliveries, moved to the
dead-letter stream. While a job is being scored a heartbeat thread keeps it from looking idle, so
only a job whose worker really died is reclaimed by another.

The score matches ``l2o.training.job.evaluate_theta`` (the single-machine summary): the eval task is
sampled from ``eval_key(seed)`` and the runs use the same keys, so the learned-optimizer and Adam
numbers of the final checkpoint equal the ones in ``summary.json``.

**Suite-task jobs.** The same queue also carries jobs of kind ``suite_task``
(:meth:`services.registry.Registry.enqueue_suite_eval`): score a checkpoint on *one* task of a
held-out suite (:func:`score_suite_task`: ``l2o.suite.evaluate.evaluate_task`` against the
baselines of the on-disk cache, computed and written atomically there when missing). A suite
evaluation is one such job per task, so any worker of the pool takes any task. Once every task's
result is in, anyone assembles the suite result from Redis (:func:`assemble_from_registry`, via
``l2o.suite.evaluate.assemble_suite_result`` like the in-process ``evaluate_on_suite``).
:func:`evaluate_on_suite_with_pool` does it all with a pool of its own (``l2o eval CKPT --suite
heldout --pool N``). A job that cannot succeed (unknown suite or task, another suite version,
unreadable checkpoint: :class:`BadJob`) is dead-lettered at once with a message saying why.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from l2o.io.secrets import SecretFile, redact_url
from services.redis_server import RedisUnavailable
from workers.ray_setup import (
    actor_name,
    actor_options,
    connect_ray,
    node_of_this_process,
    placement,
    ships_code,
)

if TYPE_CHECKING:
    from l2o.suite.baselines import BaselineSettings

log = logging.getLogger(__name__)


class BadJob(Exception):
    """A job that can never succeed (an unknown suite or task, another suite version, an
    unreadable checkpoint, a kind this worker cannot do): dead-lettered at its first delivery,
    with this message as its error."""


def score_checkpoint(cfg: Any, path: str, registry: Any | None = None) -> dict[str, Any]:
    """Score the params checkpoint at ``path`` on ``cfg``'s eval task against tuned Adam.

    ``cfg`` is a :class:`~l2o.io.config.TrainConfig`. The evaluation is the single-machine job's
    (:func:`l2o.training.job.evaluate_theta`); with ``registry`` the tuned-Adam baseline is read
    from (or
    written to) its cache. Returns the dict of ``l2o.evaluation.comparison.evaluate`` (curves
    included) plus
    ``checkpoint``, ``checkpoint_version``, ``adam_task_key``, ``adam_cached``, ``eval_seconds``.
    """
    from l2o.training.job import evaluate_theta, is_unsupervised, load_theta

    t0 = time.monotonic()
    lopt, theta, meta = load_theta(path)
    if is_unsupervised(cfg):  # no Adam sweep: rule vs random-init vs supervised features;
        # PNGs in RUN_DIR/figures/version_N (the checkpoint sits in RUN_DIR/checkpoints)
        version = int(meta.get("version", -1))
        figures = Path(path).resolve().parent.parent / "figures" / f"version_{version:08d}"
        result = evaluate_theta(cfg, lopt, theta, figures_dir=figures)
        return {**result, "checkpoint": str(path), "checkpoint_version": version,
                "eval_seconds": round(time.monotonic() - t0, 3)}
    key, baseline, cached = cached_adam_baseline(cfg, registry)
    result = evaluate_theta(cfg, lopt, theta, baseline=baseline)
    return {
        **result,
        "checkpoint": str(path),
        "checkpoint_version": int(meta.get("version", -1)),
        "adam_task_key": key,
        "adam_cached": cached,
        "eval_seconds": round(time.monotonic() - t0, 3),
    }


def cached_adam_baseline(cfg: Any, registry: Any | None = None) -> tuple[str, dict, bool]:
    """``(key, sweep, cached)``: the tuned-Adam sweep of ``cfg``'s eval task, read from
    ``registry``'s cache under its task key, else computed (and cached when there is a
    registry)."""
    from l2o.training.job import adam_baseline_for
    from services.registry import task_key

    ev = cfg.eval
    key = task_key(cfg.eval_task().model_dump(mode="json"), ev.steps, ev.seeds,
                   [float(x) for x in ev.adam_learning_rates],
                   extra={"seed": cfg.seed, "adam_steps_factor": ev.adam_steps_factor})
    baseline = registry.get_adam_sweep(key) if registry is not None else None
    if baseline is not None:
        return key, baseline, True
    baseline = adam_baseline_for(cfg)
    if registry is not None:
        registry.set_adam_sweep(key, baseline)
    return key, baseline, False


@dataclass(frozen=True)
class SuiteJobSpec:
    """What a suite-task job asks for (its stream fields, parsed; see ``services.registry``)."""

    path: str
    checkpoint_id: str
    suite: str
    suite_version: str
    task: str
    seeds: int
    label: str
    settings: dict[str, Any] | None
    cache_dir: str | None

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> SuiteJobSpec:
        """Parse a job's fields; :class:`BadJob` naming what is missing or malformed."""
        from services.registry import checkpoint_id

        missing = [k for k in ("path", "suite", "suite_version", "task") if not fields.get(k)]
        if missing:
            raise BadJob(f"suite-task job without {', '.join(missing)}")
        try:
            seeds = int(fields.get("seeds") or 5)
            settings = json.loads(fields["settings"]) if fields.get("settings") else None
            version = int(fields.get("version") or -1)
        except ValueError as e:
            raise BadJob(f"malformed suite-task job for task {fields['task']!r}: {e}") from e
        if seeds < 1:
            raise BadJob(f"suite-task job for task {fields['task']!r}: seeds must be positive")
        return cls(path=fields["path"],
                   checkpoint_id=fields.get("checkpoint_id") or checkpoint_id(fields["path"],
                                                                              version),
                   suite=fields["suite"], suite_version=fields["suite_version"],
                   task=fields["task"], seeds=seeds, label=fields.get("label") or "learned",
                   settings=settings, cache_dir=fields.get("cache_dir") or None)


def _log_line(line: str) -> None:
    log.info("%s", line)


def _suite_task(spec: SuiteJobSpec) -> tuple[Any, str, str]:
    """``(suite task, suite version, task fingerprint)`` of the job; :class:`BadJob` for an
    unknown suite or task, or a suite version other than this worker's."""
    from l2o.suite.evaluate import resolve_suite

    try:
        _, version, (st,), fingerprint = resolve_suite(spec.suite, [spec.task])
    except ValueError as e:
        raise BadJob(f"task {spec.task!r} of suite {spec.suite!r}: {e}") from e
    if version != spec.suite_version:
        raise BadJob(f"task {spec.task!r}: the job asks for suite version "
                     f"{spec.suite_version!r}, this worker has {version!r}")
    return st, version, fingerprint(st)


def _load_optimizer(path: str) -> tuple[Any, Any]:
    """``(learned optimizer, θ)`` of the checkpoint at ``path``; :class:`BadJob` if unreadable."""
    from l2o.io.checkpoints import CheckpointError
    from l2o.training.job import load_theta

    try:
        lopt, theta, _ = load_theta(path)
    except (CheckpointError, OSError, ValueError, TypeError, KeyError) as e:
        raise BadJob(f"checkpoint {path} is unreadable: {type(e).__name__}: {e}") from e
    return lopt, theta


def score_suite_task(fields: dict[str, str]) -> dict[str, Any]:
    """Score the checkpoint of a suite-task job (its stream ``fields``) on the job's task.

    The baselines come from the on-disk cache (``cache_dir`` of the job, else
    ``$L2O_CACHE_DIR``), computed and written there (atomically) when missing. Returns
    ``{"result": evaluate_task(...), "job": what was scored, how and how long}``.
    """
    from l2o.optimizers.optax_bridge import as_gradient_transformation
    from l2o.suite.baselines import load_or_compute_baselines
    from l2o.suite.evaluate import baseline_settings_from_json, evaluate_task

    t0 = time.monotonic()
    spec = SuiteJobSpec.from_fields(fields)
    st, version, fingerprint = _suite_task(spec)
    lopt, theta = _load_optimizer(spec.path)
    try:
        settings = baseline_settings_from_json(spec.settings)
    except (KeyError, TypeError, ValueError) as e:
        raise BadJob(f"task {spec.task!r}: bad baseline settings: {e}") from e
    record = load_or_compute_baselines(st, settings, version=version, fingerprint=fingerprint,
                                       cache_dir=spec.cache_dir, log=_log_line)
    result = evaluate_task(st, lambda n: as_gradient_transformation(lopt, theta, num_steps=n),
                           record, seeds=spec.seeds, label=spec.label, log=_log_line)
    job = {"checkpoint": spec.path, "checkpoint_id": spec.checkpoint_id, "suite": spec.suite,
           "suite_version": version, "task": spec.task, "seeds": spec.seeds,
           "label": spec.label, "settings": spec.settings,
           "baselines_from_cache": bool(record.get("from_cache")),
           "eval_seconds": round(time.monotonic() - t0, 3)}
    return {"result": result, "job": job}


class EvalWorker:
    """Consumes the eval queue of run ``run_id`` until the run is over and the queue is empty.

    A run whose manifest has no training config (a pool that only scores suites) takes only
    suite-task jobs. ``hold_s`` (fault-injection tests only) makes the worker sit on each
    claimed job for that long before scoring it, so a test can kill it while it holds the job.
    """

    def __init__(self, run_id: str, redis_url: str | SecretFile, consumer: str, *,
                 eval_idle_ms: int | None = None, eval_max_deliveries: int | None = None,
                 block_ms: int = 500, hold_s: float = 0.0) -> None:
        """Connect to the registry at ``redis_url`` (or the URL in that
        :class:`~l2o.io.secrets.SecretFile`); ``consumer`` names this worker in the group."""
        from l2o.io.config import TrainConfig
        from services.redis_server import redis_connection
        from services.registry import Registry

        self.redis, _ = redis_connection(redis_url, wait=True)  # its Redis may be restarting
        manifest = Registry(self.redis, run_id).manifest()
        if manifest is None:
            raise RuntimeError(f"run {run_id!r} has no manifest in the registry")
        config = manifest.get("config")
        self.cfg = TrainConfig.model_validate(config) if config else None
        svc = self.cfg.service if self.cfg is not None else None
        self.registry = Registry(
            self.redis, run_id,
            eval_max_deliveries=eval_max_deliveries or (svc.eval_max_deliveries if svc else 3),
            eval_idle_ms=eval_idle_ms or (svc.eval_idle_ms if svc else 30_000))
        self.consumer = consumer
        self.block_ms = int(block_ms)
        self.hold_s = float(hold_s)
        self._stop = threading.Event()
        self.current: str | None = None
        self.counts = {"scored": 0, "failed": 0, "dead_lettered": 0, "reclaimed": 0}

    def _heartbeat(self, job: Any, done: threading.Event) -> None:
        period = max(0.05, self.registry.eval_idle_ms / 3000.0)
        while not done.wait(period):
            try:
                if not self.registry.touch_eval(job, self.consumer):
                    return
            except Exception as e:  # noqa: BLE001 - a missed heartbeat only risks a duplicate
                log.warning("heartbeat for job %s failed: %s", job.id, e)

    def _score(self, job: Any) -> None:
        """Score ``job`` as its kind says and store the result (raises when that fails)."""
        from services.registry import CHECKPOINT_JOB, SUITE_JOB

        who = {"job_id": job.id, "deliveries": job.deliveries, "consumer": self.consumer,
               "host": socket.gethostname(), "pid": os.getpid(), **node_of_this_process()}
        if job.kind == SUITE_JOB:
            out = score_suite_task(job.fields)
            out["job"].update(who)
            self.registry.store_suite_result(out["job"]["checkpoint_id"], out["job"]["suite"],
                                             out["job"]["task"], out)
            return
        if job.kind != CHECKPOINT_JOB:
            raise BadJob(f"unknown eval job kind {job.kind!r}")
        if self.cfg is None:
            raise BadJob("this run has no training config: its eval pool takes only "
                         "suite-task jobs")
        result = score_checkpoint(self.cfg, job.path, self.registry)
        result.update(who)
        self.registry.store_eval_result(job.version, result)

    def process(self, job: Any) -> bool:
        """Score one claimed job, store it, acknowledge it; False if it failed."""
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, done), daemon=True)
        beat.start()
        self.current = job.id
        try:
            if self.hold_s > 0:
                time.sleep(self.hold_s)
            self._score(job)
        except RedisUnavailable:  # Redis gone past its outage deadline: not the job's fault
            raise
        except Exception as e:  # noqa: BLE001 - any failure is the job's
            done.set()
            bad = isinstance(e, BadJob)  # retrying cannot help: dead-letter it now
            err = f"BadJob: {e}" if bad else \
                f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"
            self.counts["failed"] += 1
            if self.registry.fail_eval(job, err, permanent=bad):
                self.counts["dead_lettered"] += 1
            log.warning("%s eval job %s (%s) failed: %s", job.kind, job.id,
                        job.fields.get("task") or job.path, e)
            return False
        finally:
            done.set()
            self.current = None
        self.registry.ack_eval(job)  # only now that the result is stored
        self.counts["scored"] += 1
        return True

    def run(self, until_drained: bool = True, max_jobs: int | None = None) -> dict[str, Any]:
        """Process jobs until stopped, or (``until_drained``) the run is over with none left."""
        n = 0
        while not self._stop.is_set():
            if max_jobs is not None and n >= max_jobs:
                break
            job = self.registry.claim_eval(self.consumer, block_ms=self.block_ms)
            if job is None:
                if until_drained and self.registry.state() in ("done", "failed", "stop") \
                        and self.registry.evals_outstanding() == 0:
                    break
                continue
            if job.deliveries > 1:
                self.counts["reclaimed"] += 1
            self.process(job)
            n += 1
        return self.stats()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current job."""
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        """This worker's counters and the job it holds (if any)."""
        return {"consumer": self.consumer, "current": self.current, "pid": os.getpid(),
                **placement(), **self.counts}

    def ping(self) -> str:
        """Liveness check: the consumer name."""
        return self.consumer


#: The Ray actor class (restarted when it dies; a restarted worker resumes consuming).
EvalWorkerActor = ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=4)(EvalWorker)


def create_eval_worker(run_id: str, redis_url: str | SecretFile, consumer: str, *,
                       num_cpus: float = 1.0, num_gpus: float = 0.0, add_repo_to_path: bool = False,
                       max_restarts: int = -1, name: str | None = None,
                       resources: dict[str, float] | None = None,
                       label_selector: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Start an :class:`EvalWorker` actor sized and placed as asked (``resources``,
    ``label_selector``: :func:`workers.ray_setup.actor_options`)."""
    opts = actor_options(num_cpus, num_gpus, add_repo_to_path=add_repo_to_path,
                         resources=resources, label_selector=label_selector)
    if name is not None:
        opts["name"] = name
    opts["max_restarts"] = max_restarts
    if max_restarts == 0:
        opts["max_task_retries"] = 0
    return EvalWorkerActor.options(**opts).remote(run_id, redis_url, consumer, **kwargs)


# ------------------------------------------------------------------------------------------------
# A suite evaluation sharded over an eval pool


def assemble_from_registry(registry: Any, ckpt_id: str, suite: str, tasks: Sequence[str],
                           seconds: float | None = None) -> dict[str, Any] | None:
    """The suite result of checkpoint ``ckpt_id`` on ``tasks`` (report order) of ``suite`` from
    the suite-task results in ``registry``; ``None`` while any task is missing.

    Suite version, label, seeds and baseline settings come from the stored jobs (which must
    agree); the result is :func:`l2o.suite.evaluate.assemble_suite_result`'s, plus
    ``checkpoint`` and ``pool`` (run id, checkpoint id and each task's job record).
    """
    from l2o.suite.evaluate import assemble_suite_result, baseline_settings_from_json

    stored = registry.suite_results(ckpt_id, suite, list(tasks))
    if len(stored) < len(tasks):
        return None
    jobs = {t: stored[t]["job"] for t in tasks}
    shared = {(j["suite_version"], j["label"], int(j["seeds"]), _canonical_json(j["settings"]))
              for j in jobs.values()}
    if len(shared) != 1:
        raise ValueError(f"the suite-task results of {ckpt_id} on {suite} disagree on suite "
                         f"version, label, seeds or settings: {sorted(shared)}")
    first = jobs[tasks[0]]
    result = assemble_suite_result(
        [stored[t]["result"] for t in tasks], suite, first["suite_version"], first["label"],
        int(first["seeds"]), settings=baseline_settings_from_json(first["settings"]),
        seconds=seconds)
    result["checkpoint"] = first["checkpoint"]
    result["pool"] = {"run_id": registry.run_id, "checkpoint_id": ckpt_id, "jobs": jobs}
    return result


def _canonical_json(value: Any) -> str:
    """``value`` as canonical JSON (to compare stored job fields)."""
    return json.dumps(value, sort_keys=True)


def _first_line(text: str | None) -> str:
    """The first line of an error message (``"?"`` for none)."""
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else "?"


def start_eval_pool(run_id: str, redis_url: str, num_workers: int, *, num_cpus: float = 1.0,
                    num_gpus: float = 0.0, timeout_s: float = 300.0) -> list[Any]:
    """Start ``num_workers`` eval workers (``eval-0`` …) of run ``run_id`` and wait until each
    is constructed (a worker that cannot start raises here, not later)."""
    add_path = not ships_code()
    workers = [create_eval_worker(run_id, redis_url, f"eval-{j}", num_cpus=num_cpus,
                                  num_gpus=num_gpus, add_repo_to_path=add_path,
                                  name=actor_name(run_id, f"eval-{j}"))
               for j in range(num_workers)]
    try:
        ray.get([w.ping.remote() for w in workers], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        have = ray.cluster_resources().get("CPU", 0)
        raise RuntimeError(f"{num_workers} eval workers × {num_cpus} CPUs did not start within "
                           f"{timeout_s:.0f} s; the cluster has {have:g} CPUs") from None
    return workers


def wait_for_suite(registry: Any, ckpt_id: str, suite: str, tasks: Sequence[str],
                   run_refs: Sequence[Any], *, timeout_s: float, poll_s: float = 0.25,
                   log_line: Callable[[str], None] = _log_line
                   ) -> tuple[dict[str, dict], dict[str, dict]]:
    """Wait until every task of ``tasks`` has a stored result or a dead-lettered job;
    ``(results, failures)`` by task. Raises if the workers' ``run`` calls (``run_refs``) all
    end, or ``timeout_s`` passes, first."""
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while True:
        results = registry.suite_results(ckpt_id, suite, list(tasks))
        failures = {t: d for t, d in registry.suite_failures(ckpt_id, suite).items()
                    if t in tasks and t not in results}
        for t in tasks:
            if t in results and t not in seen:
                job = results[t]["job"]
                log_line(f"[{len(seen) + 1}/{len(tasks)}] {t}: scored by {job['consumer']} "
                         f"in {job['eval_seconds']:.1f}s")
                seen.add(t)
            elif t in failures and t not in seen:
                log_line(f"[{len(seen) + 1}/{len(tasks)}] {t}: FAILED: "
                         f"{_first_line(failures[t].get('error'))}")
                seen.add(t)
        if len(seen) == len(tasks):
            return results, failures
        if run_refs and len(ray.wait(list(run_refs), num_returns=len(run_refs),
                                     timeout=0)[0]) == len(run_refs):
            raise RuntimeError(f"every eval worker stopped with {len(tasks) - len(seen)} suite "
                               "task(s) unscored")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(tasks) - len(seen)} suite task(s) unscored after "
                               f"{timeout_s:.0f} s")
        time.sleep(poll_s)


def _stop_pool(workers: list[Any], run_refs: list[Any], drain_s: float = 30.0) -> None:
    """Let the workers' ``run`` return (the run is over, the queue empty), then kill them."""
    if run_refs:
        ray.wait(run_refs, num_returns=len(run_refs), timeout=drain_s)
    for w in workers:
        try:
            ray.kill(w, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def evaluate_on_suite_with_pool(checkpoint: str | Path, suite: str = "heldout",
                                num_workers: int = 2, *, tasks: Sequence[str] | None = None,
                                seeds: int = 5, label: str | None = None,
                                settings: BaselineSettings | None = None,
                                cache_dir: str | Path | None = None,
                                out_dir: Path | None = None, redis_url: str | None = None,
                                address: str | None = None, worker_num_cpus: float = 1.0,
                                timeout_s: float = 6 * 3600.0, poll_s: float = 0.25,
                                log_line: Callable[[str], None] = _log_line) -> dict[str, Any]:
    """:func:`l2o.suite.evaluate.evaluate_on_suite` of the checkpoint at ``checkpoint``,
    sharded over an eval pool of ``num_workers`` Ray actors: one suite-task job per task.

    Connects to Ray like the service (``address`` / ``$RAY_ADDRESS``, else a private local
    instance; one already initialized in this process is used as is) and to Redis
    (``redis_url`` / ``$REDIS_URL``, else an embedded server), under a fresh run id
    ``suite-…``. ``settings`` (``BaselineSettings``) and ``cache_dir`` are handed to the
    workers in the jobs. Returns the assembled result (:func:`assemble_from_registry`); with
    ``out_dir`` the report is written there. Raises ``RuntimeError`` naming each failed task.
    """
    from l2o.suite.evaluate import resolve_suite, write_suite_report
    from services import redis_server
    from services.registry import Registry, checkpoint_id

    if not isinstance(suite, str):
        raise TypeError("an eval pool finds the suite by name in each worker: give a name of "
                        "l2o.suite.tasks.SUITES")
    if num_workers < 1 or seeds < 1:
        raise ValueError("num_workers and seeds must be positive")
    t0 = time.monotonic()
    name, version, task_list, _ = resolve_suite(suite, tasks)
    names = [st.name for st in task_list]
    path = str(Path(checkpoint).expanduser().absolute())
    with warnings.catch_warnings():  # fork+exec of redis-server: no Python runs in the child
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        rclient, url, owns_redis = redis_server.owned_connection(redis_url)
    registry = Registry(rclient, f"suite-{uuid.uuid4().hex[:8]}")
    started_ray, workers, run_refs = False, [], []
    try:
        registry.write_manifest(None, kind="suite-eval", checkpoint=path, suite=name,
                                tasks=names, redis=redact_url(url))
        registry.set_status("running")
        started_ray = connect_ray(num_workers * worker_num_cpus, address)
        workers = start_eval_pool(registry.run_id, url, num_workers, num_cpus=worker_num_cpus)
        run_refs = [w.run.remote() for w in workers]
        registry.enqueue_suite_eval(path, name, version, names, seeds=seeds,
                                    label=label or Path(checkpoint).name,
                                    settings=settings.to_json() if settings else None,
                                    cache_dir=str(cache_dir) if cache_dir else None)
        log_line(f"suite {name} ({version}): {len(names)} task jobs for {num_workers} eval "
                 f"workers (run {registry.run_id})")
        ckpt = checkpoint_id(path)
        _, failures = wait_for_suite(registry, ckpt, name, names, run_refs,
                                     timeout_s=timeout_s, poll_s=poll_s, log_line=log_line)
        registry.set_status("done")
        if failures:
            raise RuntimeError("suite task(s) failed: " + "; ".join(
                f"{t}: {_first_line(d.get('error'))}" for t, d in failures.items()))
        result = assemble_from_registry(registry, ckpt, name, names,
                                        seconds=time.monotonic() - t0)
        result["pool"]["workers"] = num_workers
        if out_dir is not None:
            write_suite_report(result, Path(out_dir))
        return result
    except BaseException:
        try:
            if registry.state() != "done":
                registry.set_status("failed")
        except Exception:  # noqa: BLE001 - best effort while failing
            pass
        raise
    finally:
        _stop_pool(workers, run_refs)
        if started_ray:
            ray.shutdown()
        if owns_redis:
            redis_server.shutdown_embedded(url)
