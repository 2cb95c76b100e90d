"""The distributed meta-training job: ``python -m services.train --config FILE [--preset NAME]``.

This is the ``ray job submit`` entrypoint and what ``l2o train`` runs through. :func:`run_service`
drives a :class:`ServiceRun` through its phases:

1. ``ServiceRun(cfg)`` takes the run's id (stored in the run directory, so a resume keeps it:
   ``services.registry.run_id_for``) and opens Redis (``service.redis_url``, ``$REDIS_URL``, else
   an embedded server on a unix socket keeping its data in ``<run_dir>/redis``);
2. ``start`` writes the run manifest, marks the run ``starting``, starts the driver's heartbeat
   (every ``services.registry.HEARTBEAT_S``, until ``close``) and connects to Ray: the cluster
   at ``address`` / ``$RAY_ADDRESS`` (``auto``: the running local ``ray start`` cluster; jobs
   submitted with ``ray job submit`` have it set), else a fresh private local Ray instance,
   stopped again at the end (never another job's instance: attaching to one would tie this run
   to that job's lifetime); it starts the learner (``learner.process.LearnerActor``: the gRPC
   server around ``learner.core.Learner``; it resumes from the run directory's newest full
   checkpoint, publishes its address in the registry and enqueues an eval job per params
   checkpoint), the curriculum if the config has one, then ``num_unroll_workers``
   :class:`~workers.unroll.UnrollWorker` and ``num_eval_workers``
   :class:`~workers.eval_worker.EvalWorker` actors, and marks the run ``running``;
3. ``loop`` polls the learner's status until ``meta_steps`` meta-updates (or ``time_budget_s``,
   or the curriculum's end), mirroring its figures into the registry's status hash (failed and
   skipped meta-updates and the last error among them); a learner that stopped the run
   (``fatal_error``: too many failed meta-updates in a row) fails it with that error;
4. ``stop`` marks the run ``stopping`` (unroll workers finish), stops the learner with a final
   checkpoint (whose eval job is queued), marks the run ``done`` and lets the eval workers drain
   the queue;
5. ``summarize`` evaluates the final θ exactly as the single-machine job does
   (``l2o.training.job.evaluate_theta``) and writes ``summary.json`` and ``curves.png`` into the
   run directory;
6. ``close`` shuts down everything the run started (``mark_failed`` first marks a run that
   raised ``failed``).

Redis may restart or be away for up to ``$L2O_REDIS_OUTAGE_S`` seconds (default 60) at any phase:
every registry call of the driver and the workers is retried that long
(``services.redis_server.RedisSettings``). Past it the run fails with one line naming Redis; the
run is then left marked live in Redis, and readers show it ``failed`` once its heartbeat is stale.

The bearer token is ``$L2O_TOKEN`` / ``service.token_file``; without either a random per-run token
is generated and handed to the actors (never printed).

Running it::

    python -m services.train --config run.yaml                 # local Ray, embedded Redis
    ray start --head                                           # or against a cluster:
    ray job submit --working-dir . -- python -m services.train --config run.yaml
    RAY_ADDRESS=HEAD:6379 python -m services.train --config run.yaml   # as a plain driver

``ray job submit`` needs Ray's job server (``ray[default]``). The embedded Redis listens on a unix
socket of the driver's node: on a cluster of several nodes set ``REDIS_URL`` (a password in it is
honoured and never printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from l2o.io.secrets import redact_url
from services.registry import HEARTBEAT_S
from services.retry import LEARNER_RESTART, describe, retry_call
from workers.ray_setup import actor_name, actor_options, connect_ray, ships_code

log = logging.getLogger(__name__)

#: How long to wait for actors to come up before giving up with a clear message.
STARTUP_TIMEOUT_S = 300.0


# ------------------------------------------------------------------------------------------------
# Ray


def needed_cpus(cfg: Any) -> float:
    """Logical CPUs the run's actors ask Ray for (the learner counts as one worker)."""
    svc = cfg.service
    return (1 + svc.num_unroll_workers + svc.num_eval_workers) * svc.worker_num_cpus


def check_resources(cfg: Any, total: dict[str, float], strict: bool = True) -> None:
    """Raise a clear error when the run's actors can never all be placed on the cluster.

    ``total`` is ``ray.cluster_resources()``. Unroll and eval workers each ask for
    ``worker_num_cpus``/``worker_num_gpus``; an actor that does not fit would wait forever. With
    ``strict=False`` (a cluster this run did not start, which may still scale up) it only logs.
    """
    try:
        _check_resources(cfg, total)
    except RuntimeError as e:
        if strict:
            raise
        logging.getLogger(__name__).warning("%s (waiting in case the cluster scales up)", e)


def _check_resources(cfg: Any, total: dict[str, float]) -> None:
    svc = cfg.service
    gpus = (svc.num_unroll_workers + svc.num_eval_workers) * svc.worker_num_gpus
    have = float(total.get("GPU", 0.0))
    if gpus > have + 1e-9:
        raise RuntimeError(
            f"service.worker_num_gpus={svc.worker_num_gpus} for {svc.num_unroll_workers} unroll "
            f"+ {svc.num_eval_workers} eval workers needs {gpus:g} GPUs; the Ray cluster has "
            f"{have:g}. Lower worker_num_gpus or the number of workers.")
    cpus = needed_cpus(cfg)
    have_cpus = float(total.get("CPU", 0.0))
    if cpus > have_cpus + 1e-9:
        raise RuntimeError(
            f"the run's actors need {cpus:g} logical CPUs (learner + {svc.num_unroll_workers} "
            f"unroll + {svc.num_eval_workers} eval workers × worker_num_cpus="
            f"{svc.worker_num_cpus}); the Ray cluster has {have_cpus:g}.")


def init_ray(cfg: Any, address: str | None = None) -> bool:
    """Connect to (or start) Ray for ``cfg``'s actors (:func:`workers.ray_setup.connect_ray`);
    whether this call started a local instance."""
    return connect_ray(needed_cpus(cfg), address)


# ------------------------------------------------------------------------------------------------
# Learner


def start_learner(cfg: Any, run_id: str, run_dir: Path, token: str, redis_url: str,
                  add_repo_to_path: bool) -> tuple[Any, str]:
    """Start the learner actor; ``(actor handle, "host:port")``.

    The actor (``learner.process.LearnerProcess``, ``max_restarts=-1``, serving on start) resumes
    from ``run_dir`` if it holds a full checkpoint, publishes its address under the run in Redis
    (again after every restart) and enqueues an eval job for every params checkpoint it writes.
    """
    import ray

    from learner.process import learner_actor
    from services.registry import RegistryHooks

    hooks = RegistryHooks(redis_url, run_id)
    opts = actor_options(cfg.service.worker_num_cpus, 0.0, add_repo_to_path=add_repo_to_path)
    actor_cls = learner_actor(max_restarts=-1, max_task_retries=-1)
    opts["name"] = actor_name(run_id, "learner")
    actor = actor_cls.options(**opts).remote(
        cfg.model_dump(mode="json"), str(run_dir), run_id=run_id, token=token,
        on_params_checkpoint=hooks.enqueue_eval, on_address=hooks.publish_address,
        autostart=True)
    try:
        address = ray.get(actor.address.remote(), timeout=STARTUP_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        have = ray.cluster_resources().get("CPU", 0)
        raise RuntimeError(
            f"the learner actor did not start within {STARTUP_TIMEOUT_S:.0f} s; the cluster has "
            f"{have:g} CPUs and this run asks for {needed_cpus(cfg):g} "
            "(see service.worker_num_cpus)") from None
    return actor, address


# ------------------------------------------------------------------------------------------------
# Metrics


def read_metrics(redis_client: Any, registry: Any) -> list[dict[str, Any]]:
    """Every truncation record the workers appended to the run's metrics stream, oldest first."""
    from l2o.estimators.base import CORE_METRICS, OPTIONAL_METRICS

    out = []
    for _id, fields in redis_client.xrange(registry.key("metrics")):
        rec: dict[str, Any] = dict(fields)
        for k in (*CORE_METRICS, *OPTIONAL_METRICS, "t"):
            if k in rec:
                rec[k] = float(rec[k])
        for k in ("seq", "version", "stage", "num_steps"):
            if k in rec:
                rec[k] = int(rec[k])
        out.append(rec)
    return out


def meta_loss_first_last(records: list[dict[str, Any]], window: int) -> tuple[float, float]:
    """Mean meta-loss of the first and last ``window`` accepted truncations (by θ version)."""
    ok = sorted((r for r in records if r.get("reason") == "OK" and "meta_loss" in r),
                key=lambda r: (r["version"], r["t"]))
    if not ok:
        return math.nan, math.nan
    w = max(1, min(window, len(ok)))
    first = sum(r["meta_loss"] for r in ok[:w]) / w
    last = sum(r["meta_loss"] for r in ok[-w:]) / w
    return float(first), float(last)


# ------------------------------------------------------------------------------------------------
# The job

#: The learner's figures mirrored into the registry's status hash at every poll.
MIRRORED = ("version", "updates", "accepted", "applied", "dropped_stale", "rejected", "duplicate",
            "buffer_depth", "staleness_mean", "staleness_max", "unique_workers",
            "gradients_per_second", "last_meta_loss", "incarnation", "failed_updates",
            "skipped_nonfinite", "last_error", "fatal_error", "dropped_at_stop")
#: The learner's final figures stored with the ``done`` state.
FINAL = ("version", "updates", "accepted", "applied", "dropped_stale", "rejected", "duplicate",
         "failed_updates", "skipped_nonfinite", "last_error", "dropped_at_stop")
#: The summary's figures stored with the ``done`` state once the summary is written.
HEADLINE = ("meta_loss_first", "meta_loss_last", "updates", "gradients_accepted",
            "gradients_dropped_stale", "gradients_rejected", "wall_seconds")


def _check_workers(refs: dict[Any, int]) -> None:
    """Raise if an unroll worker's ``run`` ended for good before the run did.

    Workers are restarted forever and their ``run`` retried, so a finished ``run`` means the
    actor could not be (re)created (e.g. its constructor raised) or was killed for good.
    """
    import ray

    from services.redis_server import RedisUnavailable

    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    for ref in ready:
        try:
            stats = ray.get(ref)
        except Exception as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, RedisUnavailable):  # the run's Redis, not the worker, failed
                raise cause from e
            raise RuntimeError(f"unroll worker {refs[ref]} died: {e}") from e
        if len(ready) == len(refs):
            raise RuntimeError(f"every unroll worker stopped before the run ended (last: {stats})")


class ServiceRun:
    """One run of the service, in the order :func:`run_service` drives it: :meth:`start`,
    :meth:`loop`, :meth:`stop`, :meth:`summarize`; :meth:`close` releases what it started and
    :meth:`mark_failed` records a run that raised."""

    def __init__(self, cfg: Any, redis_url: str | None = None, run_id: str | None = None) -> None:
        """Open Redis (``redis_url``, ``cfg.service.redis_url``, ``$REDIS_URL``, else an embedded
        server) and the run's registry, and create the run directory; nothing else starts.
        ``run_id`` (a population trial's ``EXPERIMENT/TRIAL``) replaces the run directory's."""
        from services import redis_server
        from services.registry import Registry, run_id_for

        self.cfg = cfg
        self.t_start = time.monotonic()
        self.run_dir = cfg.run_path().resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id or run_id_for(self.run_dir, cfg.run_name)
        had_embedded = redis_server._EMBEDDED is not None
        self.redis, self.url = redis_server.redis_connection(
            redis_url or cfg.service.redis_url, data=redis_server.run_data_dir(self.run_dir))
        self.owns_redis = not had_embedded and redis_server._EMBEDDED is not None \
            and self.url == redis_server._EMBEDDED.url
        self.registry = Registry(self.redis, self.run_id,
                                 eval_max_deliveries=cfg.service.eval_max_deliveries,
                                 eval_idle_ms=cfg.service.eval_idle_ms)
        self.started_ray = False
        self.token = ""
        self.learner: Any = None
        self.client: Any = None
        self.curriculum: Any = None
        self.unroll: list[Any] = []
        self.evals: list[Any] = []
        self.run_refs: dict[Any, int] = {}  # an unroll worker's ``run`` -> its index
        self.eval_refs: list[Any] = []
        self.status: dict[str, Any] = {}  # the learner's latest figures
        self.history: list[dict[str, Any]] = []  # one entry per log_every updates
        self._last_bucket = -1
        self.train_seconds = 0.0
        self.worker_stats: list[Any] = []
        self._beating = threading.Event()
        self._heart: threading.Thread | None = None

    # -- start -----------------------------------------------------------------------------------
    def start(self, address: str | None = None,
              curriculum_scorer: Callable[[Any, int, int], float] | None = None) -> None:
        """Mark the run ``starting``, connect to Ray, start the learner, the curriculum (if the
        config has one), the unroll and eval workers; mark the run ``running``."""
        from services.auth import load_token

        cfg, svc, registry = self.cfg, self.cfg.service, self.registry
        token = load_token(svc.token_env, svc.token_file) or secrets.token_urlsafe(32)
        self.token = token  # the actors' bearer token (never printed)
        registry.write_manifest(cfg.model_dump(mode="json"), run_dir=str(self.run_dir),
                                run_name=cfg.run_name, redis=redact_url(self.url))
        registry.set_status("starting", target_updates=cfg.meta_steps,
                            workers=svc.num_unroll_workers, eval_workers=svc.num_eval_workers)
        self._start_heartbeat()
        self.redis.delete(registry.key("metrics"))
        registry.ensure_group()
        self._connect_ray(address)
        add_path = not ships_code()
        self._start_learner(token, add_path)
        if cfg.curriculum is not None:  # before the workers start: they read its stage
            self.curriculum = _start_curriculum(cfg, self.run_dir, self.client, self.learner,
                                                registry, curriculum_scorer)
        self._start_workers(token, add_path)
        registry.set_status("running")
        self.run_refs = {w.run.remote(): i for i, w in enumerate(self.unroll)}
        self.eval_refs = [e.run.remote() for e in self.evals]

    def _start_heartbeat(self, interval_s: float = HEARTBEAT_S) -> None:
        """Write the driver's heartbeat now and every ``interval_s`` until :meth:`close` (a
        missed one, Redis being away, is logged: readers allow several)."""
        self.registry.heartbeat(interval_s)

        def beat() -> None:
            while not self._beating.wait(interval_s):
                try:
                    self.registry.heartbeat(interval_s)
                except Exception as e:  # noqa: BLE001 - the driver's own calls report Redis
                    log.warning("heartbeat not written: %s", e)

        self._heart = threading.Thread(target=beat, name="l2o-heartbeat", daemon=True)
        self._heart.start()

    def _connect_ray(self, address: str | None) -> None:
        """Connect to Ray (:func:`init_ray`) and check the run's actors fit on it."""
        import ray

        self.started_ray = init_ray(self.cfg, address)
        check_resources(self.cfg, ray.cluster_resources(), strict=self.started_ray)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if self.url.startswith("unix://") and len(alive) > 1:
            log.warning("Redis is on a unix socket of this node but the cluster has %d nodes: "
                        "actors elsewhere cannot reach it; set REDIS_URL (or service.redis_url) "
                        "to a Redis every node can reach", len(alive))

    def _start_learner(self, token: str, add_path: bool) -> None:
        """Start the learner actor, publish its address and open a client to it."""
        from services.client import LearnerClient

        registry = self.registry
        self.learner, address = start_learner(self.cfg, self.run_id, self.run_dir, token,
                                              self.url, add_path)
        registry.set_learner_address(address)
        # with TLS on, trust the learner's (self-signed) certificate
        self.client = LearnerClient(address, token, self.run_id, self.cfg.service.tls_cert,
                                    resolve_address=registry.learner_address)
        # a resumed learner remembers the seqs it took; never hand them out again
        for worker_id, last in (self.client.status().get("worker_last_seq") or {}).items():
            registry.ensure_seq_at_least(worker_id, int(last) + 1)

    def _start_workers(self, token: str, add_path: bool) -> None:
        """Start ``num_unroll_workers`` unroll and ``num_eval_workers`` eval worker actors."""
        from workers.eval_worker import create_eval_worker
        from workers.unroll import create_unroll_worker

        svc, run_id = self.cfg.service, self.run_id
        sizing = {"num_cpus": svc.worker_num_cpus, "num_gpus": svc.worker_num_gpus,
                  "add_repo_to_path": add_path}
        config_dump = self.cfg.model_dump(mode="json")
        self.unroll = [create_unroll_worker(config_dump, i, run_id, self.url, token,
                                            name=actor_name(run_id, f"unroll-{i}"),
                                            root_cert=svc.tls_cert, **sizing)
                       for i in range(svc.num_unroll_workers)]
        self.evals = [create_eval_worker(run_id, self.url, f"eval-{j}",
                                         name=actor_name(run_id, f"eval-{j}"), **sizing)
                      for j in range(svc.num_eval_workers)]

    # -- loop ------------------------------------------------------------------------------------
    def loop(self, progress: Callable[[dict[str, Any]], None] | None = None,
             poll_s: float = 0.25) -> None:
        """Poll the learner every ``poll_s`` seconds until the run is over (:meth:`_finished`),
        mirroring its figures into the registry and the history; ``progress(status)`` after each
        poll that finds a new θ version."""
        t_train = time.monotonic()
        last_version = -1
        while True:
            # rides out a learner restart
            self.status = retry_call(self.client.status, "Status of the learner",
                                     LEARNER_RESTART)
            mirrored = {k: self.status.get(k) for k in MIRRORED}
            self.registry.set_status(None, **mirrored)
            if self.status.get("fatal_error"):
                raise RuntimeError(f"the learner stopped the run: {self.status['fatal_error']}")
            if self.status.get("version") != last_version:
                last_version = self.status.get("version")
                self._record_history(mirrored, time.monotonic() - t_train)
                if progress is not None:
                    progress(dict(self.status))
            if self._finished(t_train):
                break
            time.sleep(poll_s)
        self.train_seconds = time.monotonic() - t_train

    def _record_history(self, mirrored: dict[str, Any], elapsed_s: float) -> None:
        """Append ``mirrored`` to the history: one entry per ``log_every`` updates."""
        bucket = int(self.status.get("updates", 0)) // self.cfg.log_every
        if not self.history or bucket != self._last_bucket:
            self._last_bucket = bucket
            self.history.append({"elapsed_s": round(elapsed_s, 3), **mirrored})

    def _finished(self, t_train: float) -> bool:
        """Whether the run is over: ``meta_steps`` updates, the time budget spent, or the
        curriculum done (which this advances). Raises if the unroll workers died."""
        cfg = self.cfg
        if int(self.status.get("updates", 0)) >= cfg.meta_steps:
            return True
        if cfg.time_budget_s is not None and time.monotonic() - t_train > cfg.time_budget_s:
            log.info("time budget of %.0f s spent", cfg.time_budget_s)
            return True
        _check_workers(self.run_refs)
        if self.curriculum is not None:
            self.curriculum.poll(self.status)
            if self.curriculum.done:
                log.info("curriculum finished")
                return True
        return False

    # -- stop ------------------------------------------------------------------------------------
    def stop(self, eval_drain_timeout_s: float = 600.0) -> None:
        """Wind down: mark the run ``stopping`` and let the unroll workers finish; a finished
        curriculum restores its best θ; the learner stops with a final checkpoint (whose eval
        job is queued); mark the run ``done`` and let the eval workers drain the queue."""
        import ray

        self.registry.set_status("stopping")
        _wait_refs(list(self.run_refs), timeout=120.0)
        if self.curriculum is not None:  # a finished curriculum: its best θ, with no worker left
            self.curriculum.finish()
        self.worker_stats = [_safe_get(w.stats.remote()) for w in self.unroll]
        final = ray.get(self.learner.stop.remote(checkpoint=True), timeout=120.0)
        self.status = final or self.status
        self.registry.clear_learner_address()
        self.registry.set_status("done", **{k: self.status.get(k) for k in FINAL})
        _wait_refs(self.eval_refs, timeout=eval_drain_timeout_s)

    # -- summarize -------------------------------------------------------------------------------
    def summarize(self, final_eval: bool = True) -> dict[str, Any]:
        """Evaluate the final θ (the newest params checkpoint, which the learner just wrote)
        exactly as the single-machine job does, write ``summary.json`` and the plots, and store
        the headline figures with the ``done`` state; the summary."""
        from l2o.io.checkpoints import latest_checkpoint
        from l2o.training.job import load_theta, write_outputs
        from workers.eval_worker import score_checkpoint

        final_path = latest_checkpoint(self.run_dir, "params")
        _, _, meta = load_theta(final_path)
        # the eval pool's result for the final checkpoint when it has one, else scored here with
        # the cached Adam baseline
        result = None
        if final_eval:
            result = self.registry.eval_result(int(meta.get("version", -1))) or \
                score_checkpoint(self.cfg, str(final_path), self.registry)
        summary = self._summary(final_path, meta, result)
        write_outputs(self.run_dir, summary, result)
        self.registry.set_status("done", summary=json.dumps({k: summary[k] for k in HEADLINE}))
        return summary

    def _summary(self, final_path: Path, meta: dict[str, Any],
                 result: dict[str, Any] | None) -> dict[str, Any]:
        """The summary dict of ``summary.json`` (the final checkpoint's ``meta`` and eval
        ``result``, the learner's final figures, the metrics stream, the registry)."""
        from l2o.evaluation.comparison import CURVE_KEYS
        from l2o.training.job import EVAL_SUMMARY_KEYS

        cfg, st, registry = self.cfg, self.status, self.registry
        updates = int(st.get("updates", 0))
        first, last = meta_loss_first_last(read_metrics(self.redis, registry), cfg.log_every)
        best = (registry.leaderboard(top=1) or [None])[0]
        summary = {
            "run": cfg.run_name, "run_id": self.run_id, "mode": "service",
            "meta_loss_first": first, "meta_loss_last": last,
            "meta_steps": updates, "updates": updates,
            "version": int(meta.get("version", st.get("version", 0))),
            **{f"gradients_{k}": int(st.get(k, 0))
               for k in ("accepted", "applied", "dropped_stale", "rejected", "duplicate",
                         "dropped_at_stop")},
            "rejected_by_reason": st.get("rejected_by_reason", {}),
            "failed_updates": int(st.get("failed_updates", 0)),
            "skipped_nonfinite": int(st.get("skipped_nonfinite", 0)),
            "last_error": st.get("last_error", ""),
            "workers": cfg.service.num_unroll_workers,
            "eval_workers": cfg.service.num_eval_workers,
            "worker_stats": [s for s in self.worker_stats if isinstance(s, dict)],
            "checkpoints_scored": len(registry.eval_results()),
            "eval_dead_letters": int(self.redis.xlen(registry.dead_stream)),
            "best_checkpoint": ({k: v for k, v in best.items() if k not in CURVE_KEYS}
                                if best else best),
            "train_seconds": round(self.train_seconds, 2),
            "updates_per_second": round(updates / max(self.train_seconds, 1e-9), 3),
            "wall_seconds": round(time.monotonic() - self.t_start, 2),
            "eval": ({k: result[k] for k in EVAL_SUMMARY_KEYS if k in result}
                     if result is not None else None),
            "final_checkpoint": str(final_path),
            "history": self.history,
        }
        if self.curriculum is not None:
            summary["curriculum"] = self.curriculum.summary()
        return summary

    # -- clean-up --------------------------------------------------------------------------------
    def mark_failed(self, error: BaseException | None = None) -> None:
        """Mark the run ``failed`` unless it got to ``done`` (best effort: it is failing). When
        ``error`` is Redis gone for good nothing is tried: readers see the heartbeat stop."""
        from services.redis_server import RedisUnavailable

        if isinstance(error, RedisUnavailable):
            log.error("run %s not marked failed in Redis (%s): readers will show it failed "
                      "once its heartbeat is stale", self.run_id, error)
            return
        try:
            if self.registry.state() not in ("done",):
                self.registry.set_status("failed", error=describe(error) if error else "")
        except Exception:  # noqa: BLE001 - best effort while failing
            pass

    def close(self, keep_actors: bool = False) -> None:
        """Close the client, kill the actors (unless ``keep_actors``), and stop the Ray
        instance and the embedded Redis if this run started them."""
        import ray

        from services import redis_server

        self._beating.set()
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001
                pass
        if not keep_actors:
            for a in [*self.unroll, *self.evals, *([self.learner] if self.learner else [])]:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        if self.started_ray:
            ray.shutdown()
        if self.owns_redis:
            redis_server.shutdown_embedded()


def run_service(cfg: Any, *, address: str | None = None,
                progress: Callable[[dict[str, Any]], None] | None = None,
                redis_url: str | None = None, poll_s: float = 0.25,
                eval_drain_timeout_s: float = 600.0, final_eval: bool = True,
                keep_actors: bool = False,
                curriculum_scorer: Callable[[Any, int, int], float] | None = None
                ) -> dict[str, Any]:
    """Meta-train ``cfg`` (a :class:`~l2o.io.config.TrainConfig`) on Ray; the summary dict.

    ``progress`` is called after each status poll with the learner's figures (``version``,
    ``updates``, ``accepted``, ``dropped_stale``, ``gradients_per_second``, ``last_meta_loss``…).
    ``redis_url`` overrides ``cfg.service.redis_url``. The summary is also written to
    ``run_dir/summary.json``. With ``keep_actors`` the actors are left running (tests inspect
    them; the caller kills them). With ``cfg.curriculum`` the driver runs the curriculum
    (:class:`l2o.training.curriculum.ServiceCurriculum`; ``curriculum_scorer(θ, version,
    eval_steps)`` replaces its score) and the run ends when its last stage has finished.
    """
    run = ServiceRun(cfg, redis_url)
    try:
        run.start(address, curriculum_scorer)
        run.loop(progress, poll_s)
        run.stop(eval_drain_timeout_s)
        return run.summarize(final_eval)
    except BaseException as e:
        run.mark_failed(e)
        raise
    finally:
        run.close(keep_actors)


def _start_curriculum(cfg: Any, run_dir: Path, client: Any, learner: Any, registry: Any,
                      scorer: Any) -> Any:
    """The run's :class:`l2o.training.curriculum.ServiceCurriculum`: θ fetched over gRPC, restored
    through
    the learner actor, the stage published in the registry."""
    import ray

    from l2o.training.build import learned_optimizer_from_config, theta_key
    from l2o.training.curriculum import ServiceCurriculum
    from workers.unroll import as_template

    template = learned_optimizer_from_config(cfg.optimizer).init(theta_key(cfg.seed))

    def fetch() -> tuple[int, Any]:
        r = client.fetch(have_version=-1, like=template)
        return int(r.version), as_template(r.theta, template)

    def restore(path: Path, version: int) -> dict[str, Any]:
        return ray.get(learner.restore_theta.remote(str(path), int(version)), timeout=120.0)

    return ServiceCurriculum(cfg, run_dir, fetch, restore, registry.set_curriculum, scorer,
                             updates=int(client.status().get("updates", 0)))


def _safe_get(ref: Any, timeout: float = 30.0) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - a dead actor's stats are simply missing
        return {"error": f"{type(e).__name__}: {e}"}


def _wait_refs(refs: list[Any], timeout: float) -> None:
    """Wait for ``refs`` to finish (errors are logged, not raised)."""
    import ray

    if not refs:
        return
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001
            log.warning("actor task ended with an error: %s", e)
    if pending:
        log.warning("%d actor task(s) still running after %.0f s", len(pending), timeout)


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines of ``summary``."""
    ev = summary.get("eval") or {}
    lines = [
        f"run {summary.get('run_id', summary['run'])} (service): {summary['updates']} "
        f"meta-updates with "
        f"{summary['workers']} unroll worker(s) in {summary['train_seconds']} s "
        f"({summary['updates_per_second']} updates/s)",
        f"gradients: {summary['gradients_accepted']} accepted, "
        f"{summary['gradients_dropped_stale']} dropped stale, "
        f"{summary['gradients_rejected']} rejected",
        f"meta-loss: {summary['meta_loss_first']:.4g} -> {summary['meta_loss_last']:.4g}",
    ]
    if ev.get("kind") == "unsupervised_rule":  # rule vs random-init vs supervised features
        from l2o.unsupervised.evaluation import format_result

        lines.append(format_result(ev))
    elif ev:
        lines.append(
            f"eval on {ev.get('task')} ({ev.get('steps')} steps): learned "
            f"{ev.get('learned_final_loss')} vs tuned Adam {ev.get('adam_final_loss')} "
            f"(lr {ev.get('adam_best_lr')}), speedup {ev.get('speedup')}")
    lines.append(f"checkpoints scored: {summary['checkpoints_scored']}; "
                 f"wall {summary['wall_seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m services.train --config FILE [--preset NAME] [--meta-steps N] …``."""
    from l2o.io.config import ConfigError, config_from_dict, deep_merge, load_config, preset

    p = argparse.ArgumentParser(prog="python -m services.train", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument("--preset", help="named preset (the config file, if any, overrides it)")
    p.add_argument("--run-name")
    p.add_argument("--run-dir")
    p.add_argument("--meta-steps", type=int)
    p.add_argument("--address", help="Ray address ('auto': the local `ray start` cluster; "
                                     "default: $RAY_ADDRESS, else a new private local instance)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        base = preset(args.preset).model_dump(mode="json") if args.preset else {}
        if args.config:
            file_cfg = load_config(args.config).model_dump(mode="json", exclude_unset=True)
            base = deep_merge(base, file_cfg)
        overrides = {k: v for k, v in (("run_name", args.run_name), ("run_dir", args.run_dir),
                                       ("meta_steps", args.meta_steps)) if v is not None}
        cfg = config_from_dict(deep_merge(base, overrides), "command line")
        for problem in cfg.service.missing_files():
            raise ConfigError(problem)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2

    printed = {"bucket": -1}

    def progress(st: dict[str, Any]) -> None:
        bucket = int(st.get("updates", 0)) // max(1, cfg.log_every)
        if bucket != printed["bucket"]:
            printed["bucket"] = bucket
            print(f"update {st.get('updates')}  version {st.get('version')}  "
                  f"accepted {st.get('accepted')}  stale {st.get('dropped_stale')}  "
                  f"{st.get('gradients_per_second', 0):.1f} grads/s  "
                  f"meta-loss {st.get('last_meta_loss')}", flush=True)

    from services.redis_server import RedisUnavailable

    try:
        summary = run_service(cfg, address=args.address, progress=progress)
    except (RedisUnavailable, ConnectionError) as e:  # a bad or unreachable Redis URL, an outage
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"wrote {cfg.run_path() / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
