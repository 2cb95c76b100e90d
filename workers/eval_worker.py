"""``EvalWorker``: scores params checkpoints from the run's eval queue, as a Ray actor.

Loop: claim a job from the Redis stream's consumer group (a job left idle by a dead worker is
reclaimed first, see :meth:`services.registry.Registry.claim_eval`) → load the params checkpoint →
score it on the held-out eval task of the run's config (learned optimizer vs Adam tuned over the
config's learning-rate grid; the sweep is cached in Redis per task key, so it runs once per run
config, not once per checkpoint) → store the result and its leaderboard entry → acknowledge.

A job that raises is re-queued and, after ``eval_max_deliveries`` deliveries, moved to the
dead-letter stream. While a job is being scored a heartbeat thread keeps it from looking idle, so
only a job whose worker really died is reclaimed by another.

The score matches ``l2o.job.evaluate_theta`` (the single-machine summary): the eval task is
sampled from ``eval_key(seed)`` and the runs use the same keys, so the learned-optimizer and Adam
numbers of the final checkpoint equal the ones in ``summary.json``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import ray

from workers.unroll import actor_options

log = logging.getLogger(__name__)


def score_checkpoint(cfg: Any, path: str, registry: Any | None = None) -> dict[str, Any]:
    """Score the params checkpoint at ``path`` on ``cfg``'s eval task against tuned Adam.

    ``cfg`` is a :class:`~l2o.config.TrainConfig`. The evaluation is the single-machine job's
    (:func:`l2o.job.evaluate_theta`); with ``registry`` the tuned-Adam baseline is read from (or
    written to) its cache. Returns the dict of ``l2o.eval.evaluate`` (curves included) plus
    ``checkpoint``, ``checkpoint_version``, ``adam_task_key``, ``adam_cached``, ``eval_seconds``.
    """
    from l2o.job import adam_baseline_for, evaluate_theta, is_unsupervised, load_theta
    from services.registry import task_key

    t0 = time.monotonic()
    lopt, theta, meta = load_theta(path)
    if is_unsupervised(cfg):  # no Adam sweep: rule vs random-init vs supervised features;
        # PNGs in RUN_DIR/figures/version_N (the checkpoint sits in RUN_DIR/checkpoints)
        version = int(meta.get("version", -1))
        figures = Path(path).resolve().parent.parent / "figures" / f"version_{version:08d}"
        result = evaluate_theta(cfg, lopt, theta, figures_dir=figures)
        return {**result, "checkpoint": str(path), "checkpoint_version": version,
                "eval_seconds": round(time.monotonic() - t0, 3)}
    ev = cfg.eval
    key = task_key(cfg.eval_task().model_dump(mode="json"), ev.steps, ev.seeds,
                   [float(x) for x in ev.adam_learning_rates],
                   extra={"seed": cfg.seed, "adam_steps_factor": ev.adam_steps_factor})
    baseline = registry.get_adam_sweep(key) if registry is not None else None
    cached = baseline is not None
    if baseline is None:
        baseline = adam_baseline_for(cfg)
        if registry is not None:
            registry.set_adam_sweep(key, baseline)
    result = evaluate_theta(cfg, lopt, theta, baseline=baseline)
    return {
        **result,
        "checkpoint": str(path),
        "checkpoint_version": int(meta.get("version", -1)),
        "adam_task_key": key,
        "adam_cached": cached,
        "eval_seconds": round(time.monotonic() - t0, 3),
    }


class EvalWorker:
    """Consumes the eval queue of run ``run_id`` until the run is over and the queue is empty.

    ``hold_s`` (fault-injection tests only) makes the worker sit on each claimed job for that long
    before scoring it, so a test can kill it while it holds the job.
    """

    def __init__(self, run_id: str, redis_url: str, consumer: str, *,
                 eval_idle_ms: int | None = None, eval_max_deliveries: int | None = None,
                 block_ms: int = 500, hold_s: float = 0.0) -> None:
        """Connect to the registry at ``redis_url``; ``consumer`` names this worker in the group."""
        from l2o.config import TrainConfig
        from services.redis_server import redis_connection
        from services.registry import Registry

        self.redis, _ = redis_connection(redis_url)
        manifest = Registry(self.redis, run_id).manifest()
        if manifest is None:
            raise RuntimeError(f"run {run_id!r} has no manifest in the registry")
        self.cfg = TrainConfig.model_validate(manifest["config"])
        svc = self.cfg.service
        self.registry = Registry(
            self.redis, run_id,
            eval_max_deliveries=eval_max_deliveries or svc.eval_max_deliveries,
            eval_idle_ms=eval_idle_ms or svc.eval_idle_ms)
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

    def process(self, job: Any) -> bool:
        """Score one claimed job, store it, acknowledge it; False if it failed."""
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, done), daemon=True)
        beat.start()
        self.current = job.id
        try:
            if self.hold_s > 0:
                time.sleep(self.hold_s)
            result = score_checkpoint(self.cfg, job.path, self.registry)
            result.update({"job_id": job.id, "deliveries": job.deliveries,
                           "consumer": self.consumer, "host": socket.gethostname(),
                           "pid": os.getpid()})
            self.registry.store_eval_result(job.version, result)
        except Exception as e:  # noqa: BLE001 - any failure is the job's
            done.set()
            err = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"
            self.counts["failed"] += 1
            if self.registry.fail_eval(job, err):
                self.counts["dead_lettered"] += 1
            log.warning("eval of %s (version %d) failed: %s", job.path, job.version, e)
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
        from workers.unroll import placement

        return {"consumer": self.consumer, "current": self.current, "pid": os.getpid(),
                **placement(), **self.counts}

    def ping(self) -> str:
        """Liveness check: the consumer name."""
        return self.consumer


#: The Ray actor class (restarted when it dies; a restarted worker resumes consuming).
EvalWorkerActor = ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=4)(EvalWorker)


def create_eval_worker(run_id: str, redis_url: str, consumer: str, *, num_cpus: float = 1.0,
                       num_gpus: float = 0.0, add_repo_to_path: bool = False,
                       max_restarts: int = -1, name: str | None = None, **kwargs: Any) -> Any:
    """Start an :class:`EvalWorker` actor sized like the unroll workers."""
    opts = actor_options(num_cpus, num_gpus, add_repo_to_path=add_repo_to_path)
    if name is not None:
        opts["name"] = name
    opts["max_restarts"] = max_restarts
    if max_restarts == 0:
        opts["max_task_retries"] = 0
    return EvalWorkerActor.options(**opts).remote(run_id, redis_url, consumer, **kwargs)
