"""``UnrollWorker``: the local side of meta-training, as a Ray actor.

A worker owns its estimator and *worker state* (inner problems, inner-optimizer states, estimator
accumulators); they never leave the process. Its loop:

1. fetch θ from the learner only when a newer version exists (``have_version``);
2. reserve the next sequence number ``seq`` in Redis (monotone per worker id across actor
   restarts, so no ``(worker_id, seq)`` is ever sent for two different gradients) and run one
   truncation with ``truncation_key(seed, worker_index, seq)`` — the worker state starts from
   ``worker_init_key(seed, worker_index)``: the key schedule of the single-machine trainer;
3. push the meta-gradient stamped ``(run_id, theta_version, gen_id, incarnation, worker_id, seq,
   estimator, inner_steps, mean_inner_loss)``: ``incarnation`` is the id of the learner the θ
   came from.

With ``max_staleness = 0`` a gradient computed on θ(v) is dropped as soon as the learner moves past
v, so after an accepted push the worker waits for the version it triggered (when it can trigger
one: ``batch_size <= num_unroll_workers``) instead of computing on a θ about to become stale.
One worker with ``max_staleness = 0`` and ``batch_size = 1`` therefore reproduces the
single-machine trainer update for update. A gradient refused as STALE is dropped: the worker
refetches θ and goes on with the next seq.

Every registry call (θ's address, seqs, the run state, metrics) rides out a Redis restart or
outage of up to ``$L2O_REDIS_OUTAGE_S`` (``services.redis_server.RedisSettings``); past it the
worker's ``run`` fails with :class:`~services.redis_server.RedisUnavailable`.

When the learner is away (UNAVAILABLE, connection refused, a restart) the worker backs off with
jitter for up to ``services.retry.LEARNER_RESTART``'s deadline, re-reads the learner's address from
the Redis registry and reconnects by itself. A restarted learner is a new incarnation: it sends θ
in full whatever the worker's version (counted in ``refetch_full``), and a gradient computed on
the θ of the learner before is refused (STALE_INCARNATION, counted as ``stale``); the worker
refetches θ and goes on with the next seq. The loop ends when the
registry's run state is terminal (``done``, ``stop``, …), after ``max_truncations``, or when
:meth:`UnrollWorker.stop` is called.

Actors are created by :func:`create_unroll_worker` with ``max_restarts=-1`` and task retries, so a
killed worker comes back and resumes its loop; :func:`workers.ray_setup.actor_options` sizes XLA's
CPU thread pool to the actor's CPUs and turns off JAX's GPU memory preallocation when actors share
a GPU.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import threading
import time
from typing import Any

import ray

from l2o.io.secrets import SecretFile, reveal
from services.retry import (
    LEARNER_RESTART,
    RetryAborted,
    RetryPolicy,
    describe,
    poll_until,
    retry_call,
)
from workers.ray_setup import actor_options, node_of_this_process, placement

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Helpers


def as_template(tree: Any, template: Any) -> Any:
    """``tree`` rearranged into ``template``'s structure, matching leaves by tree path.

    The learner's client may return θ as nested dicts rebuilt from the wire's paths; the
    estimator wants the learned optimizer's own structure.
    """
    import jax

    from proto.wire import parse_path

    t_def = jax.tree_util.tree_structure(template)
    if jax.tree_util.tree_structure(tree) == t_def:
        return tree
    got = {tuple(parse_path(jax.tree_util.keystr(p))): leaf
           for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    leaves = []
    for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]:
        k = tuple(parse_path(jax.tree_util.keystr(p)))
        if k not in got:
            raise ValueError(f"θ from the learner lacks {jax.tree_util.keystr(p)}")
        leaves.append(got[k])
    return jax.tree_util.tree_unflatten(t_def, leaves)


def worker_id_of(index: int) -> str:
    """The worker id of unroll worker ``index`` (stable across actor restarts)."""
    return f"unroll-{index}"


# ------------------------------------------------------------------------------------------------
# The actor


class UnrollWorker:
    """Runs truncations of the run's estimator and streams their meta-gradients to the learner.

    Create it with :func:`create_unroll_worker`; call :meth:`run` once (it returns when the run is
    over) and :meth:`stats` at any time (actor concurrency allows both at once).
    """

    def __init__(self, config: dict, worker_index: int, run_id: str,
                 redis_url: str | SecretFile, token: str | SecretFile, *,
                 root_cert: str | None = None, max_truncations: int | None = None,
                 metrics_maxlen: int = 100_000, client_wait_s: float = 10.0) -> None:
        """Build the estimator of ``config`` (a ``TrainConfig`` dump) for worker ``worker_index``.

        ``redis_url`` points at the run's registry (the learner address is read from it);
        ``token`` is the learner's bearer token; either may come as the
        :class:`~l2o.io.secrets.SecretFile` holding it. ``root_cert`` (a PEM file) turns on TLS.
        """
        from l2o.io.config import TrainConfig
        from l2o.training.build import (
            estimator_from_config,
            learned_optimizer_from_config,
            task_family_from_config,
            theta_key,
        )
        from services.redis_server import redis_connection
        from services.registry import Registry

        self.cfg = TrainConfig.model_validate(config)
        self.index = int(worker_index)
        self.worker_id = worker_id_of(self.index)
        self.run_id = run_id
        self.token = reveal(token)
        self.root_cert = root_cert
        self.max_truncations = max_truncations
        self.client_wait_s = client_wait_s
        self.metrics_maxlen = metrics_maxlen
        svc = self.cfg.service
        self.redis, self.redis_url = redis_connection(redis_url, wait=True)
        self.registry = Registry(self.redis, run_id, eval_max_deliveries=svc.eval_max_deliveries,
                                 eval_idle_ms=svc.eval_idle_ms)
        self.family = task_family_from_config(self.cfg.worker_task(self.index))
        self.learned_opt = learned_optimizer_from_config(self.cfg.optimizer)
        from l2o.training.curriculum import stage_config

        #: the curriculum stage this worker trains at (``l2o.training.curriculum``; 0 without one)
        self.stage = 0
        self.estimator = estimator_from_config(stage_config(self.cfg, 0).estimator, self.family,
                                               self.learned_opt)
        self.template = self.learned_opt.init(theta_key(self.cfg.seed))
        self.wait_for_update = (svc.max_staleness == 0
                                and svc.batch_size <= svc.num_unroll_workers)
        self._stop = threading.Event()
        self._client = None
        self._client_address: str | None = None
        self.worker_state = None
        self.version = -1
        self.gen_id = 0
        self.incarnation = 0  # of the learner whose θ this worker holds
        self.theta = None
        self.counts: dict[str, int] = {"truncations": 0, "accepted": 0, "stale": 0,
                                       "duplicate": 0, "rejected": 0, "reconnects": 0,
                                       "refetch_full": 0, "stage_changes": 0}
        self.last_reason: str | None = None
        self.host = socket.gethostname()
        self.started_at = time.time()

    # -- connection ------------------------------------------------------------------------------
    def _connect(self, wait_s: float = 60.0):
        """A client of the learner at its address in the registry, (re)connecting as needed;
        :class:`~services.client.LearnerUnavailable` when no address appears in ``wait_s``."""
        from services.client import LearnerClient, LearnerUnavailable

        def client():
            address = self.registry.learner_address()
            if address and (self._client is None or address != self._client_address):
                if self._client is not None:
                    self._close_client()
                self._client = LearnerClient(address, self.token, self.run_id,
                                             root_cert=self.root_cert,
                                             resolve_address=self.registry.learner_address,
                                             max_wait_s=self.client_wait_s, like=self.template)
                self._client_address = address
            if self._client is None:
                raise ConnectionError("no learner address in the registry")
            return self._client

        return retry_call(client, f"{self.worker_id}: finding the learner",
                          RetryPolicy(deadline_s=wait_s, initial_s=0.05),
                          abort=self._should_end, gave_up=LearnerUnavailable)

    def _close_client(self) -> None:
        client, self._client = self._client, None
        self._client_address = None
        if client is not None and hasattr(client, "close"):
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken channel
                pass

    def _with_retry(self, fn, what: str):
        """``fn(client)`` under ``services.retry.LEARNER_RESTART``: a transient failure closes
        the client, and the learner is rediscovered in the registry before the next attempt.

        Returns ``None`` if the run ended while the learner was away.
        """
        def reconnecting(error: BaseException) -> None:
            self.counts["reconnects"] += 1
            log.warning("%s: %s failed (%s); reconnecting", self.worker_id, what,
                        describe(error))
            self._close_client()

        try:
            return retry_call(lambda: fn(self._connect()), f"{self.worker_id}: {what}",
                              LEARNER_RESTART, on_transient=reconnecting, abort=self._should_end)
        except RetryAborted:
            return None

    # -- θ -----------------------------------------------------------------------------------------
    def _refresh_theta(self) -> bool:
        """Fetch θ if the learner has another version, or is another incarnation."""
        import jax
        import jax.numpy as jnp

        def fetch(client):
            have = self.version if self.theta is not None else -1
            return client.fetch(have_version=have, like=self.template)

        got = self._with_retry(fetch, "fetch θ")
        if got is None or got.theta is None:
            return False
        version, tree = got.version, got.theta
        if self.theta is not None and got.incarnation != self.incarnation:
            self.counts["refetch_full"] += 1  # the learner restarted
        self.gen_id, self.incarnation = int(got.gen_id), int(got.incarnation)
        theta = as_template(tree, self.template)
        self.theta = jax.tree_util.tree_map(jnp.asarray, theta)
        self.version = int(version)
        return True

    def _wait_for_version_after(self, version: int, timeout_s: float = 60.0) -> None:
        """Poll θ until the learner's version differs from ``version`` or the learner restarted
        (a new incarnation), the run ends, or ``timeout_s`` passes."""
        incarnation = self.incarnation

        def moved() -> bool:
            self._refresh_theta()
            return self.version != version or self.incarnation != incarnation

        if not self._should_end():
            poll_until(moved, RetryPolicy(deadline_s=timeout_s, initial_s=0.002, max_s=0.1,
                                          jitter=0.0), abort=self._should_end)

    def _should_end(self) -> bool:
        return self._stop.is_set() or self.registry.should_stop()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run truncations until the run ends; this worker's counters."""
        import jax

        from l2o.training.build import truncation_key, worker_init_key

        info_key = self.registry.key("workers", self.worker_id)
        self.registry.r.hincrby(info_key, "starts", 1)  # > 1: Ray restarted this worker
        node = {k: v for k, v in node_of_this_process().items() if v is not None}
        self.registry.r.hset(info_key, mapping={"host": self.host, "pid": os.getpid(),
                                                "started_at": repr(self.started_at), **node})
        seed = self.cfg.seed
        while not self._should_end():
            if self.max_truncations is not None and self.counts["truncations"] >= \
                    self.max_truncations:
                break
            if self.registry.paused():  # the driver is scoring a checkpoint (services.tune)
                self._stop.wait(0.05)
                continue
            self._refresh_theta()
            if self.theta is None:
                continue
            self._sync_stage()  # after θ: a restored θ is published after its stage
            if self.worker_state is None:
                from l2o.training.curriculum import stage_worker_key

                self.worker_state = self.estimator.init_worker_state(
                    self.theta, stage_worker_key(worker_init_key(seed, self.index), self.stage))
            seq = self.registry.next_seq(self.worker_id)
            version, theta, stamp = self.version, self.theta, (self.gen_id, self.incarnation)
            grad, self.worker_state, metrics = self.estimator.compute_gradient_estimate(
                theta, self.worker_state, truncation_key(seed, self.index, seq))
            grad, metrics = jax.device_get((grad, metrics))
            self.counts["truncations"] += 1
            ack = self._push(grad, version, stamp, seq, metrics)
            if ack is None:  # the run ended while the learner was away
                break
            reason = _reason_name(ack)
            self.last_reason = reason
            self._record(seq, stamp[1], version, metrics, reason)
            if ack.accepted:
                self.counts["accepted"] += 1
                if self.wait_for_update:
                    self._wait_for_version_after(version)
            elif reason in ("STALE", "STALE_GENERATION", "STALE_INCARNATION"):
                self.counts["stale"] += 1
            elif reason == "DUPLICATE":
                # a retried push the learner had already taken before the connection broke, or
                # seqs the learner remembers from before this Redis: skip past them
                self.counts["duplicate"] += 1
                self._skip_known_seqs()
                if self.wait_for_update:
                    self._wait_for_version_after(version)
            else:
                self.counts["rejected"] += 1
                if reason == "BUFFER_FULL":
                    time.sleep(0.05 * (0.5 + random.random()))
                log.warning("%s: gradient seq %d rejected: %s %s", self.worker_id, seq, reason,
                            getattr(ack, "detail", ""))
        self._close_client()
        return self.stats()

    def _sync_stage(self) -> None:
        """Follow the curriculum's stage in the registry: on a change, rebuild the estimator with
        the stage's ``num_steps`` and drop the inner problems (fresh ones are drawn)."""
        if self.cfg.curriculum is None:
            return
        from l2o.training.build import estimator_from_config
        from l2o.training.curriculum import stage_config

        info = self.registry.curriculum()
        stage = int(info["stage"]) if info else 0
        if stage != self.stage:
            self.stage = stage
            self.estimator = estimator_from_config(stage_config(self.cfg, stage).estimator,
                                                   self.family, self.learned_opt)
            self.worker_state = None
            self.counts["stage_changes"] += 1
            log.info("%s: curriculum stage %d, num_steps %d", self.worker_id, stage,
                     self.cfg.curriculum.stages[stage])

    def _skip_known_seqs(self) -> None:
        """Move this worker's seq counter past the highest seq the learner has seen from it."""
        try:
            last = self._connect().status().get("worker_last_seq", {}).get(self.worker_id)
        except Exception as e:  # noqa: BLE001 - best effort; the next push tells again
            log.info("%s: could not read the learner's seqs: %s", self.worker_id, e)
            return
        if last is not None:
            self.registry.ensure_seq_at_least(self.worker_id, int(last) + 1)

    def _push(self, grad: Any, version: int, stamp: tuple[int, int], seq: int,
              metrics: dict) -> Any:
        """Push ``grad``, computed on θ ``version`` of ``stamp = (gen_id, incarnation)``."""
        inner_steps = int(metrics.get("inner_steps", 0))
        inner_loss = float(metrics.get("inner_loss", math.nan))
        name = getattr(self.estimator, "estimator_name", self.cfg.estimator.name)

        def push(client):
            return client.push_gradient(
                grad, theta_version=version, gen_id=stamp[0], incarnation=stamp[1],
                worker_id=self.worker_id,
                seq=seq, estimator=name, inner_steps=inner_steps, mean_inner_loss=inner_loss)

        return self._with_retry(push, f"push seq {seq}")

    def _record(self, seq: int, incarnation: int, version: int, metrics: dict,
                reason: str) -> None:
        """Append this truncation's metrics to the run's metrics stream in Redis (with the
        incarnation of the learner whose θ it used: the one that took it, if accepted)."""
        rec = {"worker": self.worker_id, "seq": seq, "version": version, "reason": reason,
               "incarnation": incarnation, "t": repr(time.time())}
        if self.cfg.curriculum is not None:  # the stage and horizon this truncation ran at
            rec["stage"] = self.stage
            rec["num_steps"] = self.cfg.curriculum.stages[self.stage]
        from l2o.estimators.base import CORE_METRICS, OPTIONAL_METRICS

        for k in (*CORE_METRICS, *OPTIONAL_METRICS):
            if k in metrics:
                rec[k] = repr(float(metrics[k]))
        try:
            self.redis.xadd(self.registry.key("metrics"), rec, maxlen=self.metrics_maxlen,
                            approximate=True)
        except Exception as e:  # noqa: BLE001 - metrics are best effort
            log.warning("%s: could not record metrics: %s", self.worker_id, e)

    # -- control ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to return after the current truncation."""
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        """Counters of this incarnation of the worker."""
        return {"worker_id": self.worker_id, "index": self.index, "version": self.version,
                "host": self.host, "pid": os.getpid(), "last_reason": self.last_reason,
                "next_seq": self.registry.peek_seq(self.worker_id), "stage": self.stage,
                **placement(),
                **self.counts}

    def ping(self) -> str:
        """Liveness check: the worker id."""
        return self.worker_id


def _reason_name(ack: Any) -> str:
    reason = getattr(ack, "reason", None)
    if reason is None:
        return "OK" if getattr(ack, "accepted", False) else "UNKNOWN"
    name = getattr(reason, "name", None)
    if name:
        return str(name)
    try:
        from proto.wire import Reason

        return Reason(int(reason)).name
    except (ValueError, TypeError):
        return str(reason)


#: The Ray actor class: restarted forever, its ``run`` retried on the new incarnation.
UnrollWorkerActor = ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=4)(
    UnrollWorker)


def create_unroll_worker(config: dict, worker_index: int, run_id: str,
                         redis_url: str | SecretFile, token: str | SecretFile, *,
                         num_cpus: float = 1.0, num_gpus: float = 0.0,
                         add_repo_to_path: bool = False, name: str | None = None,
                         resources: dict[str, float] | None = None,
                         label_selector: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Start an :class:`UnrollWorker` actor (``max_restarts=-1``) placed and sized as asked
    (``resources``, ``label_selector``: :func:`workers.ray_setup.actor_options`)."""
    opts = actor_options(num_cpus, num_gpus, add_repo_to_path=add_repo_to_path,
                         resources=resources, label_selector=label_selector)
    if name is not None:
        opts["name"] = name
    return UnrollWorkerActor.options(**opts).remote(config, worker_index, run_id, redis_url,
                                                    token, **kwargs)
