"""The distributed meta-training job: ``python -m services.train --config FILE [--preset NAME]``.

This is the ``ray job submit`` entrypoint and what ``l2o train`` runs through. :func:`run_service`

1. connects to Ray: the cluster at ``address`` / ``$RAY_ADDRESS`` (``auto``: the running local
   ``ray start`` cluster; jobs submitted with ``ray job submit`` have it set), else a fresh private
   local Ray instance, stopped again at the end (never another job's instance: attaching to one
   would tie this run to that job's lifetime);
2. opens Redis (``service.redis_url``, ``$REDIS_URL``, else an embedded server on a unix socket),
   writes the run manifest and marks the run ``starting``;
3. starts the learner (``learner.process.LearnerActor``: the gRPC server around
   ``learner.core.Learner``; it resumes from the run directory's newest full checkpoint, publishes
   its address in the registry and enqueues an eval job per params checkpoint), then
   ``num_unroll_workers`` :class:`~workers.unroll.UnrollWorker` and ``num_eval_workers``
   :class:`~workers.eval_worker.EvalWorker` actors;
4. polls the learner's status until ``meta_steps`` meta-updates (or ``time_budget_s``), mirroring
   its figures into the registry's status hash;
5. marks the run ``stopping`` (unroll workers finish), stops the learner with a final checkpoint
   (whose eval job is queued), marks the run ``done`` and lets the eval workers drain the queue;
6. evaluates the final θ exactly as the single-machine job does
   (``l2o.training.job.evaluate_theta``),
   writes ``summary.json`` and ``curves.png`` into the run directory, prints a summary, and shuts
   down everything it started.

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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _status_with_retry(client: Any, registry: Any, deadline: float) -> dict[str, Any] | None:
    """The learner's status, riding out a learner restart (None once ``deadline`` passes)."""
    from workers.unroll import is_unavailable

    delay = 0.2
    while True:
        try:
            return client.status()
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_unavailable(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _check_workers(refs: dict[Any, int]) -> None:
    """Raise if an unroll worker's ``run`` ended for good before the run did.

    Workers are restarted forever and their ``run`` retried, so a finished ``run`` means the
    actor could not be (re)created (e.g. its constructor raised) or was killed for good.
    """
    import ray

    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    for ref in ready:
        try:
            stats = ray.get(ref)
        except Exception as e:
            raise RuntimeError(f"unroll worker {refs[ref]} died: {e}") from e
        if len(ready) == len(refs):
            raise RuntimeError(f"every unroll worker stopped before the run ended (last: {stats})")


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
    eval_steps)``
    replaces its score) and the run ends when its last stage has finished.
    """
    import ray

    from services import redis_server
    from services.auth import load_token
    from services.client import LearnerClient
    from services.registry import Registry
    from workers.eval_worker import create_eval_worker
    from workers.unroll import create_unroll_worker

    t_start = time.monotonic()
    svc = cfg.service
    run_id = cfg.run_name
    run_dir = cfg.run_path().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    had_embedded = redis_server._EMBEDDED is not None
    rclient, url = redis_server.redis_connection(redis_url or svc.redis_url)
    owns_redis = not had_embedded and redis_server._EMBEDDED is not None \
        and url == redis_server._EMBEDDED.url
    registry = Registry(rclient, run_id, eval_max_deliveries=svc.eval_max_deliveries,
                        eval_idle_ms=svc.eval_idle_ms)
    started_ray = False
    learner = None
    unroll: list[Any] = []
    evals: list[Any] = []
    client = None
    history: list[dict[str, Any]] = []
    try:
        token = load_token(svc.token_env, svc.token_file) or secrets.token_urlsafe(32)
        registry.write_manifest(cfg.model_dump(mode="json"), run_dir=str(run_dir),
                                redis=redis_server.redact_url(url))
        registry.set_status("starting", target_updates=cfg.meta_steps,
                            workers=svc.num_unroll_workers, eval_workers=svc.num_eval_workers)
        rclient.delete(registry.key("metrics"))
        registry.ensure_group()
        started_ray = init_ray(cfg, address)
        check_resources(cfg, ray.cluster_resources(), strict=started_ray)
        add_path = not ships_code()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if url.startswith("unix://") and len(alive) > 1:
            log.warning("Redis is on a unix socket of this node but the cluster has %d nodes: "
                        "actors elsewhere cannot reach it; set REDIS_URL (or service.redis_url) "
                        "to a Redis every node can reach", len(alive))
        learner, learner_address = start_learner(cfg, run_id, run_dir, token, url, add_path)
        registry.set_learner_address(learner_address)
        root_cert = svc.tls_cert  # with TLS on, trust the learner's (self-signed) certificate
        client = LearnerClient(learner_address, token, run_id, root_cert,
                               resolve_address=registry.learner_address)
        # a resumed learner remembers the seqs it took; never hand them out again
        for worker_id, last in (client.status().get("worker_last_seq") or {}).items():
            registry.ensure_seq_at_least(worker_id, int(last) + 1)
        curriculum = None
        if cfg.curriculum is not None:  # before the workers start: they read its stage
            curriculum = _start_curriculum(cfg, run_dir, client, learner, registry,
                                           curriculum_scorer)
        config_dump = cfg.model_dump(mode="json")
        for i in range(svc.num_unroll_workers):
            unroll.append(create_unroll_worker(
                config_dump, i, run_id, url, token, num_cpus=svc.worker_num_cpus,
                num_gpus=svc.worker_num_gpus, add_repo_to_path=add_path,
                name=actor_name(run_id, f"unroll-{i}"), root_cert=root_cert))
        for j in range(svc.num_eval_workers):
            evals.append(create_eval_worker(
                run_id, url, f"eval-{j}", num_cpus=svc.worker_num_cpus,
                num_gpus=svc.worker_num_gpus, add_repo_to_path=add_path,
                name=actor_name(run_id, f"eval-{j}")))
        registry.set_status("running")
        run_refs = {w.run.remote(): i for i, w in enumerate(unroll)}
        eval_refs = [e.run.remote() for e in evals]

        budget = cfg.time_budget_s
        t_train = time.monotonic()
        last_version, last_bucket = -1, -1
        status: dict[str, Any] = {}
        while True:
            status = _status_with_retry(client, registry, time.monotonic() + STARTUP_TIMEOUT_S)
            mirrored = {k: status.get(k) for k in (
                "version", "updates", "accepted", "applied", "dropped_stale", "rejected",
                "duplicate", "buffer_depth", "staleness_mean", "staleness_max",
                "unique_workers", "gradients_per_second", "last_meta_loss")}
            registry.set_status(None, **mirrored)
            if status.get("version") != last_version:
                last_version = status.get("version")
                bucket = int(status.get("updates", 0)) // cfg.log_every
                if not history or bucket != last_bucket:  # one entry per log_every updates
                    last_bucket = bucket
                    history.append({"elapsed_s": round(time.monotonic() - t_train, 3),
                                    **mirrored})
                if progress is not None:
                    progress(dict(status))
            if int(status.get("updates", 0)) >= cfg.meta_steps:
                break
            if budget is not None and time.monotonic() - t_train > budget:
                log.info("time budget of %.0f s spent", budget)
                break
            _check_workers(run_refs)
            if curriculum is not None:
                curriculum.poll(status)
                if curriculum.done:
                    log.info("curriculum finished")
                    break
            time.sleep(poll_s)
        train_seconds = time.monotonic() - t_train

        # wind down: workers first, then a final checkpoint (its eval job is queued), then evals
        registry.set_status("stopping")
        _wait_refs(list(run_refs), timeout=120.0)
        if curriculum is not None:  # a finished curriculum: its best θ, with no worker left
            curriculum.finish()
        worker_stats = [_safe_get(w.stats.remote()) for w in unroll]
        final = ray.get(learner.stop.remote(checkpoint=True), timeout=120.0)
        status = final or status
        registry.clear_learner_address()
        registry.set_status("done", **{k: status.get(k) for k in (
            "version", "updates", "accepted", "applied", "dropped_stale", "rejected",
            "duplicate")})
        _wait_refs(eval_refs, timeout=eval_drain_timeout_s)

        # the final θ is the newest params checkpoint (the learner just wrote it)
        from l2o.io.checkpoints import latest_checkpoint
        from l2o.training.job import EVAL_SUMMARY_KEYS, load_theta, write_outputs
        from workers.eval_worker import score_checkpoint

        final_path = latest_checkpoint(run_dir, "params")
        _, _, meta = load_theta(final_path)
        # the same evaluation as the single-machine job: the eval pool's result for the final
        # checkpoint when it has one, else scored here with the cached Adam baseline
        result = None
        if final_eval:
            result = registry.eval_result(int(meta.get("version", -1))) or score_checkpoint(
                cfg, str(final_path), registry)
        first, last = meta_loss_first_last(read_metrics(rclient, registry), cfg.log_every)
        stats = [s for s in worker_stats if isinstance(s, dict)]
        summary = {
            "run": cfg.run_name,
            "mode": "service",
            "meta_loss_first": first,
            "meta_loss_last": last,
            "meta_steps": int(status.get("updates", 0)),
            "updates": int(status.get("updates", 0)),
            "version": int(meta.get("version", status.get("version", 0))),
            "gradients_accepted": int(status.get("accepted", 0)),
            "gradients_applied": int(status.get("applied", 0)),
            "gradients_dropped_stale": int(status.get("dropped_stale", 0)),
            "gradients_rejected": int(status.get("rejected", 0)),
            "gradients_duplicate": int(status.get("duplicate", 0)),
            "rejected_by_reason": status.get("rejected_by_reason", {}),
            "workers": svc.num_unroll_workers,
            "eval_workers": svc.num_eval_workers,
            "worker_stats": stats,
            "checkpoints_scored": len(registry.eval_results()),
            "eval_dead_letters": int(rclient.xlen(registry.dead_stream)),
            "best_checkpoint": (registry.leaderboard(top=1) or [None])[0],
            "train_seconds": round(train_seconds, 2),
            "updates_per_second": round(int(status.get("updates", 0)) / max(train_seconds, 1e-9),
                                        3),
            "wall_seconds": round(time.monotonic() - t_start, 2),
            "eval": ({k: result[k] for k in EVAL_SUMMARY_KEYS if k in result}
                     if result is not None else None),
            "final_checkpoint": str(final_path),
            "history": history,
        }
        if curriculum is not None:
            summary["curriculum"] = curriculum.summary()
        if summary["best_checkpoint"]:
            from l2o.evaluation.comparison import CURVE_KEYS

            summary["best_checkpoint"] = {k: v for k, v in summary["best_checkpoint"].items()
                                          if k not in CURVE_KEYS}
        write_outputs(run_dir, summary, result)
        registry.set_status("done", summary=json.dumps(
            {k: summary[k] for k in ("meta_loss_first", "meta_loss_last", "updates",
                                     "gradients_accepted", "gradients_dropped_stale",
                                     "gradients_rejected", "wall_seconds")}))
        return summary
    except BaseException:
        try:
            if registry.state() not in ("done",):
                registry.set_status("failed")
        except Exception:  # noqa: BLE001 - best effort while failing
            pass
        raise
    finally:
        if client is not None and hasattr(client, "close"):
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
        if not keep_actors:
            for a in [*unroll, *evals, *([learner] if learner is not None else [])]:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        if started_ray:
            ray.shutdown()
        if owns_redis:
            redis_server.shutdown_embedded()


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
        f"run {summary['run']} (service): {summary['updates']} meta-updates with "
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

    summary = run_service(cfg, address=args.address, progress=progress)
    print(format_summary(summary))
    print(f"wrote {cfg.run_path() / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
