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
run is then left marked live in Redis, readers show it ``failed`` once its heartbeat is stale, and
the first reader to find it silent past that deadline stores it ``failed``
(``services.registry.write_back_failed``).

The bearer token is ``$L2O_TOKEN`` / ``$L2O_TOKEN_FILE`` / ``service.token_file``; without any a
random per-run token is generated (never printed). Secrets reach the actors by file, never by value
(:func:`hand_over`): the token, and a Redis URL with a password, are written to
``<run_dir>/secrets/`` (mode 0600, removed when the run ends) and the actors get the paths and a
config with secrets redacted, so nothing secret sits in an actor's arguments or runtime env.

Running it::

    python -m services.train --config run.yaml                 # local Ray, embedded Redis
    ray start --head                                           # or against a cluster:
    ray job submit --working-dir . -- python -m services.train --config run.yaml \
        --run-dir /abs/path/runs
    RAY_ADDRESS=HEAD:6379 python -m services.train --config run.yaml   # as a plain driver

``ray job submit`` needs Ray's job server (``ray[default]``). A submitted job runs in a directory
Ray chose, so it refuses a relative ``run_dir`` (``workers.ray_setup.job_run_dir_problem``); every
run's output ends with the absolute location of its results. ``--set KEY=VALUE`` overrides any
config field. The embedded Redis listens on a unix socket of the driver's node: on a cluster of
several nodes set ``REDIS_URL`` (a password in it is honoured and never printed),
``service.host: auto`` (the learner listens on every interface and is advertised at its node's
IP) and a ``run_dir`` every node reads: a shared filesystem or a storage URL
(``s3://bucket/prefix``, :mod:`l2o.io.storage`; what stays local goes to ``local_dir``).
``service.placement`` places the learner, the unroll and the eval workers (custom resources,
node labels, CPUs and GPUs per role).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from l2o.io.secrets import SecretFile, redact_url, redacted_config, write_secret
from l2o.io.storage import absolute
from services.registry import HEARTBEAT_S
from services.retry import LEARNER_RESTART, describe, retry_call
from workers.ray_setup import (
    actor_name,
    actor_options,
    connect_ray,
    job_run_dir_problem,
    ships_code,
)

log = logging.getLogger(__name__)

#: How long to wait for actors to come up before giving up with a clear message.
STARTUP_TIMEOUT_S = 300.0


# ------------------------------------------------------------------------------------------------
# Ray


def _role_counts(cfg: Any) -> dict[str, int]:
    """How many actors of each role (``service.placement``'s keys) the run starts."""
    svc = cfg.service
    return {"learner": 1, "unroll": svc.num_unroll_workers, "eval": svc.num_eval_workers}


def needed_resources(cfg: Any) -> dict[str, float]:
    """Ray resources the run's actors ask for in all: ``CPU``, ``GPU`` and each custom resource
    of ``service.placement``."""
    need: dict[str, float] = {}
    for role, n in _role_counts(cfg).items():
        opts = cfg.service.ray_options(role)
        asks = {"CPU": opts["num_cpus"], "GPU": opts["num_gpus"], **opts.get("resources", {})}
        for name, amount in asks.items():
            need[name] = need.get(name, 0.0) + n * amount
    return need


def needed_cpus(cfg: Any) -> float:
    """Logical CPUs the run's actors ask Ray for."""
    return needed_resources(cfg)["CPU"]


def check_resources(cfg: Any, total: dict[str, float], strict: bool = True) -> None:
    """Raise a clear error when the run's actors can never all be placed on the cluster.

    ``total`` is ``ray.cluster_resources()``. Each actor asks for its role's resources
    (``service.placement``, default ``worker_num_cpus``/``worker_num_gpus``); an actor that does
    not fit would wait forever. With
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
    need = needed_resources(cfg)
    workers = (f"learner + {svc.num_unroll_workers} unroll + {svc.num_eval_workers} eval "
               "workers")
    gpus, have = need.pop("GPU"), float(total.get("GPU", 0.0))
    if gpus > have + 1e-9:
        raise RuntimeError(
            f"service.worker_num_gpus={svc.worker_num_gpus} (and service.placement) for "
            f"{workers} needs {gpus:g} GPUs; the Ray cluster has {have:g}. Lower "
            "worker_num_gpus or the number of workers.")
    cpus, have_cpus = need.pop("CPU"), float(total.get("CPU", 0.0))
    if cpus > have_cpus + 1e-9:
        raise RuntimeError(
            f"the run's actors need {cpus:g} logical CPUs ({workers} × worker_num_cpus="
            f"{svc.worker_num_cpus}, or service.placement's num_cpus); the Ray cluster has "
            f"{have_cpus:g}.")
    for name, amount in need.items():
        if amount > float(total.get(name, 0.0)) + 1e-9:
            raise RuntimeError(
                f"service.placement asks for {amount:g} of the custom resource {name!r} in all; "
                f"the Ray cluster has {float(total.get(name, 0.0)):g} (start nodes with "
                f"`ray start --resources '{{\"{name}\": N}}'`)")


def init_ray(cfg: Any, address: str | None = None) -> bool:
    """Connect to (or start) Ray for ``cfg``'s actors (:func:`workers.ray_setup.connect_ray`);
    whether this call started a local instance."""
    return connect_ray(needed_cpus(cfg), address)


# ------------------------------------------------------------------------------------------------
# Secrets

#: The folder of secrets handed to the actors by path (mode 0700, files 0600), in the run's local
#: directory (the run directory itself unless that is a storage URL: ``local_dir``). On several
#: nodes that directory must be on a filesystem every node mounts at the same path.
SECRETS_DIR = "secrets"


def actor_config(cfg: Any) -> dict[str, Any]:
    """``cfg`` as the actors get it: a JSON dump with every secret redacted (the actors take the
    Redis URL and the token from their own arguments)."""
    return redacted_config(cfg.model_dump(mode="json"))


def hand_over(local_dir: Path, name: str, value: str) -> str | SecretFile:
    """``value`` as an actor argument: stored in ``local_dir/secrets/name`` and passed by path
    when it holds a secret (a token; a URL with a password), else as it is."""
    if name != "token" and redact_url(value) == value:
        return value
    return write_secret(local_dir / SECRETS_DIR / name, value)


# ------------------------------------------------------------------------------------------------
# Learner


def start_learner(cfg: Any, run_id: str, run_dir: Any, token: str | SecretFile,
                  redis_url: str | SecretFile, add_repo_to_path: bool,
                  local_dir: Path | None = None) -> tuple[Any, str]:
    """Start the learner actor; ``(actor handle, "host:port")``.

    Secrets (the token, a Redis URL with a password) come as :class:`~l2o.io.secrets.SecretFile`
    paths, and the config the actor gets has them redacted: Ray keeps actor arguments.

    The actor (``learner.process.LearnerProcess``, ``max_restarts=-1``, serving on start, placed
    by ``service.placement.learner``) resumes from ``run_dir`` (a local path or a storage URL)
    if it holds a full checkpoint, publishes its address under the run in Redis (again after
    every restart) and enqueues an eval job for every params checkpoint it writes; its applied
    log and TensorBoard logs go to ``local_dir`` (default ``run_dir``).
    """
    import ray

    from learner.process import learner_actor
    from services.registry import RegistryHooks

    hooks = RegistryHooks(redis_url, run_id)
    opts = actor_options(**cfg.service.ray_options("learner"), add_repo_to_path=add_repo_to_path)
    actor_cls = learner_actor(max_restarts=-1, max_task_retries=-1)
    opts["name"] = actor_name(run_id, "learner")
    actor = actor_cls.options(**opts).remote(
        actor_config(cfg), str(run_dir), run_id=run_id, token=token,
        on_params_checkpoint=hooks.enqueue_eval, on_address=hooks.publish_address,
        autostart=True, local_dir=str(local_dir or run_dir))
    try:
        address = ray.get(actor.address.remote(), timeout=STARTUP_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        have = ray.cluster_resources().get("CPU", 0)
        raise RuntimeError(
            f"the learner actor did not start within {STARTUP_TIMEOUT_S:.0f} s; the cluster has "
            f"{have:g} CPUs and this run asks for {needed_cpus(cfg):g} "
            "(see service.worker_num_cpus and service.placement.learner)") from None
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
        for k in ("seq", "version", "stage", "num_steps", "incarnation"):
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
        #: checkpoints, summary.json, curves.png: a local directory or a storage URL
        self.run_dir = absolute(cfg.run_path())
        #: what stays local (embedded Redis data, the applied log, TensorBoard)
        self.local_dir = cfg.local_path().resolve()
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id or run_id_for(self.run_dir, cfg.run_name)
        self.redis, self.url, self.owns_redis = redis_server.owned_connection(
            redis_url or cfg.service.redis_url, data=redis_server.run_data_dir(self.local_dir))
        self.registry = Registry(self.redis, self.run_id,
                                 eval_max_deliveries=cfg.service.eval_max_deliveries,
                                 eval_idle_ms=cfg.service.eval_idle_ms)
        self.started_ray = False
        self.token = ""
        self.learner: Any = None
        self.learner_node: Any = None  # the Ray node id the learner runs on
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
        self._stop_requested = threading.Event()  # request_stop(): end the loop at its next poll
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
        # the actors get the secrets by file (hand_over), the driver keeps the token itself
        handed = (hand_over(self.local_dir, "token", token),
                  hand_over(self.local_dir, "redis_url", self.url))
        self._start_learner(token, handed, add_path)
        if cfg.curriculum is not None:  # before the workers start: they read its stage
            self.curriculum = _start_curriculum(cfg, self.run_dir, self.client, self.learner,
                                                registry, curriculum_scorer)
        self._start_workers(handed, add_path)
        registry.set_status("running")
        self.run_refs = {w.run.remote(): i for i, w in enumerate(self.unroll)}
        self.eval_refs = [e.run.remote() for e in self.evals]

    def _start_heartbeat(self, interval_s: float = HEARTBEAT_S) -> None:
        """Write the driver's heartbeat now and every ``interval_s`` until :meth:`close` (a
        missed one, Redis being away, is logged: readers allow several)."""
        from services.redis_server import RedisSettings

        outage_s = RedisSettings.from_env().outage_s  # readers wait that long before failing us
        self.registry.heartbeat(interval_s, outage_s)

        def beat() -> None:
            while not self._beating.wait(interval_s):
                try:
                    self.registry.heartbeat(interval_s, outage_s)
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

    def _start_learner(self, token: str, handed: tuple[Any, Any], add_path: bool) -> None:
        """Start the learner actor (given ``handed``: the token and the Redis URL as
        :func:`hand_over` gives them), publish its address and open a client to it."""
        from services.client import LearnerClient

        registry = self.registry
        self.learner, address = start_learner(self.cfg, self.run_id, self.run_dir, *handed,
                                              add_path, self.local_dir)
        registry.set_learner_address(address)
        self.learner_node = _safe_get(self.learner.node_id.remote())
        # with TLS on, trust the learner's (self-signed) certificate
        self.client = LearnerClient(address, token, self.run_id, self.cfg.service.tls_cert,
                                    resolve_address=registry.learner_address)
        # a resumed learner remembers the seqs it took; never hand them out again
        for worker_id, last in (self.client.status().get("worker_last_seq") or {}).items():
            registry.ensure_seq_at_least(worker_id, int(last) + 1)

    def _start_workers(self, handed: tuple[Any, Any], add_path: bool) -> None:
        """Start ``num_unroll_workers`` unroll and ``num_eval_workers`` eval worker actors
        (given ``handed``: the token and the Redis URL as :func:`hand_over` gives them)."""
        from workers.eval_worker import create_eval_worker
        from workers.unroll import create_unroll_worker

        svc, run_id = self.cfg.service, self.run_id
        config_dump, (token, url) = actor_config(self.cfg), handed
        self.unroll = [create_unroll_worker(config_dump, i, run_id, url, token,
                                            name=actor_name(run_id, f"unroll-{i}"),
                                            root_cert=svc.tls_cert, add_repo_to_path=add_path,
                                            **svc.ray_options("unroll"))
                       for i in range(svc.num_unroll_workers)]
        self.evals = [create_eval_worker(run_id, url, f"eval-{j}",
                                         name=actor_name(run_id, f"eval-{j}"),
                                         add_repo_to_path=add_path, **svc.ray_options("eval"))
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

    def request_stop(self) -> None:
        """End :meth:`loop` at its next poll, as if ``meta_steps`` were reached (from any
        thread); :meth:`stop` and :meth:`summarize` then run as usual."""
        self._stop_requested.set()

    def _finished(self, t_train: float) -> bool:
        """Whether the run is over: ``meta_steps`` updates, the time budget spent, the curriculum
        done (which this advances), or :meth:`request_stop` called. Raises if the unroll workers
        died."""
        cfg = self.cfg
        if int(self.status.get("updates", 0)) >= cfg.meta_steps or self._stop_requested.is_set():
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
            "learner_node": self.learner_node,
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
        """Close the client, kill the actors and remove the secrets handed to them (unless
        ``keep_actors``), and stop the Ray instance and the embedded Redis if this run started
        them."""
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
            shutil.rmtree(self.local_dir / SECRETS_DIR, ignore_errors=True)
        if self.started_ray:
            ray.shutdown()
        if self.owns_redis:
            redis_server.shutdown_embedded(self.url)


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


def arg_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m services.train``."""
    p = argparse.ArgumentParser(prog="python -m services.train", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument("--preset", help="named preset (the config file, if any, overrides it)")
    p.add_argument("--run-name")
    p.add_argument("--run-dir")
    p.add_argument("--meta-steps", type=int)
    p.add_argument("--set", dest="assignments", action="append", default=[],
                   metavar="KEY=VALUE", help="override any config field, dotted, the value read "
                                             "as YAML (e.g. service.host=0.0.0.0); repeatable")
    p.add_argument("--address", help="Ray address ('auto': the local `ray start` cluster; "
                                     "default: $RAY_ADDRESS, else a new private local instance)")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """The run's :class:`~l2o.io.config.TrainConfig` from parsed :func:`arg_parser` arguments:
    the preset, the config file over it, then the options; a
    :class:`~l2o.io.config.ConfigError` names what is wrong (a field, a file, a relative run
    directory in a Ray job)."""
    from l2o.io.config import (
        ConfigError,
        apply_overrides,
        config_from_dict,
        deep_merge,
        load_config,
        preset,
    )

    base = preset(args.preset).model_dump(mode="json") if args.preset else {}
    if args.config:
        file_cfg = load_config(args.config).model_dump(mode="json", exclude_unset=True)
        base = deep_merge(base, file_cfg)
    overrides = {k: v for k, v in (("run_name", args.run_name), ("run_dir", args.run_dir),
                                   ("meta_steps", args.meta_steps)) if v is not None}
    cfg = apply_overrides(config_from_dict(deep_merge(base, overrides), "command line"),
                          args.assignments)
    for problem in [*cfg.service.missing_files(), job_run_dir_problem(cfg.run_dir)]:
        if problem is not None:
            raise ConfigError(problem)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """``python -m services.train --config FILE [--preset NAME] [--meta-steps N] …``."""
    from l2o.io.config import ConfigError

    args = arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = config_from_args(args)
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
    # the last line (of a Ray job's log too): where the results are
    print(f"results in {cfg.run_path().resolve()} (summary.json, curves.png, checkpoints/)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
