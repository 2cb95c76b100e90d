"""The run registry in Redis: manifest, status, discovery, checkpoints, eval queue, leaderboard.

Every key of a run lives under ``l2o:{run_id}:``; a few global keys under ``l2o:`` index runs,
rank checkpoints across runs and cache tuned-Adam sweeps. θ itself never goes to Redis: only
checkpoint *paths* do.

========================================  =========================================================
key                                        contents
========================================  =========================================================
``l2o:runs``                               sorted set: run id → creation time (all runs)
``l2o:{run}:manifest``                     string: the run's config as JSON
``l2o:{run}:status``                       hash: ``state`` (starting/running/stopping/done/failed),
                                           ``updated_at``, the driver's ``heartbeat_at`` and
                                           ``heartbeat_s``, and any counters the service reports
``l2o:{run}:learner``                      hash: ``address``, ``updated_at`` (learner discovery)
``l2o:{run}:checkpoints``                  hash: version → params checkpoint path
``l2o:{run}:evalq``                        stream of eval jobs, consumer group ``evalers``
                                           (two kinds: a checkpoint on the run's eval task, and
                                           a checkpoint on one task of a held-out suite)
``l2o:{run}:evalq:dead``                   stream: jobs that failed ``max_deliveries`` times
``l2o:{run}:evals``                        hash: version → eval result (JSON)
``l2o:{run}:eval_errors``                  hash: stream id → last error of that job
``l2o:{run}:leaderboard``                  sorted set: version → score (this run)
``l2o:{run}:suite:{suite}:{ckpt}:{task}``  string: a suite-task job's result (JSON; ``ckpt`` is
                                           :func:`checkpoint_id`: ``v{version}`` or a hash of
                                           the checkpoint's path)
``l2o:{run}:seq:{worker_id}``              integer: seqs handed out to that worker so far
``l2o:{run}:curriculum``                   string: the curriculum's stage record (JSON; workers
                                           train at its ``num_steps``; ``l2o.training.curriculum``)
``l2o:leaderboard``                        sorted set: ``{run}@{version}`` → score (all runs)
``l2o:adam:{task_key}``                    string: a cached tuned-Adam sweep (JSON)
========================================  =========================================================

**Run ids** are unique: the run name, the start time and four random hex digits
(``NAME-YYYYmmdd-HHMMSS-xxxx``, :func:`new_run_id`), kept in the run directory's ``run_id`` file so
a resumed run keeps its id (:func:`run_id_for`). Two runs of the same name therefore never share a
key, a learner address, a status or a leaderboard row, even on one Redis.

**Liveness.** While a run is going its driver writes ``heartbeat_at`` every ``heartbeat_s``
seconds (:data:`HEARTBEAT_S`), and its Redis deadline ``outage_s``. A run that dies is marked
``failed`` by its driver on the way out; a driver that could not (killed, or Redis gone) leaves a
live-looking state behind, which readers (:func:`run_status`, :func:`list_runs`) show as
``failed`` once no heartbeat came for :data:`STALE_HEARTBEATS` intervals (:func:`shown_state`),
and *store* as ``failed`` (:func:`write_back_failed`) once no heartbeat came for longer than the
driver's own Redis deadline plus two intervals: by then a driver that lost Redis has given up,
so no live run is ever marked failed by a reader.

**Leaderboard score**: ``learned_final_loss / adam_final_loss`` on the held-out eval task, i.e. the
learned optimizer's final loss as a fraction of the tuned Adam's. **Lower is better**; below 1
the learned optimizer beats tuned Adam. Ranking reads the sorted sets in ascending order. The
unsupervised update rule has no Adam comparison: its score is ``1 − logistic-regression accuracy``
of its features on the test split (``leaderboard_score`` of its result; also lower is better).

**Eval queue semantics.** :meth:`Registry.claim_eval` first takes over (``XAUTOCLAIM``) a job that
has sat unacknowledged for more than ``eval_idle_ms`` — its consumer is presumed dead — and
otherwise reads a new one. A job is acknowledged with :meth:`Registry.ack_eval` only after its
result is stored. :meth:`Registry.fail_eval` re-queues a failed job at once, and once a job has been
delivered ``eval_max_deliveries`` times (failures and reclaims both count) it goes to the
dead-letter stream instead and is acknowledged. A job reclaimed with its deliveries exhausted is
dead-lettered by ``claim_eval`` itself (a job that kills its worker every time cannot loop).
A failure known to be permanent (an unknown suite task, an unreadable checkpoint) is dead-lettered
at its first delivery (``fail_eval(..., permanent=True)``).

**Suite-task jobs** (:meth:`Registry.enqueue_suite_eval`; field ``kind`` = :data:`SUITE_JOB`)
shard the evaluation of one checkpoint on a held-out suite (``l2o.suite``) over the eval pool: one
job per task, each taken by whichever eval worker is free. Besides ``run_id``, ``path``,
``version``, ``attempts`` and ``enqueued_at`` (as every job) a job carries ``checkpoint_id``,
``suite`` (a suite name of ``l2o.suite.tasks.SUITES``), ``suite_version`` (the worker refuses a
different one), ``task``, ``seeds`` (the learned optimizer runs seeds ``0 .. seeds-1``),
``label``, ``settings`` (``BaselineSettings.to_json()`` as JSON; empty: the defaults) and
``cache_dir`` (the baseline cache; empty: the worker's ``$L2O_CACHE_DIR``). Its result goes to
``l2o:{run}:suite:{suite}:{ckpt}:{task}``; :meth:`Registry.suite_results` and
:meth:`Registry.suite_failures` tell who waits when every task is in.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from l2o.io.secrets import SecretFile, redacted_config

PREFIX = "l2o"
GROUP = "evalers"
#: ``kind`` of the eval jobs that score a checkpoint on one task of a held-out suite
SUITE_JOB = "suite_task"
#: ``kind`` of the (original) eval jobs that score a checkpoint on the run's eval task
CHECKPOINT_JOB = "checkpoint"
RUNS_KEY = f"{PREFIX}:runs"
GLOBAL_LEADERBOARD = f"{PREFIX}:leaderboard"

#: run states; ``done``/``stop``/``failed`` tell workers to finish
TERMINAL_STATES = frozenset({"done", "stop", "stopping", "failed"})
#: the state in which unroll workers wait instead of training (a population trial scoring and
#: reporting a checkpoint, ``services.tune``); ``running`` again resumes them
PAUSED = "paused"
#: run states of a run whose driver should still be writing heartbeats
LIVE_STATES = frozenset({"starting", "running", PAUSED, "stopping"})
#: seconds between two heartbeats of a run's driver
HEARTBEAT_S = 5.0
#: missed heartbeats after which readers show a live-looking run as failed
STALE_HEARTBEATS = 6
#: the Redis deadline assumed for a driver that did not store its own (``outage_s``)
DEFAULT_OUTAGE_S = 60.0
#: the file of a run directory that holds the run's id
RUN_ID_FILE = "run_id"


def new_run_id(run_name: str, now: float | None = None) -> str:
    """A fresh run id: ``{run_name}-YYYYmmdd-HHMMSS-xxxx`` (UTC time, 4 random hex digits)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{run_name}-{stamp}-{secrets.token_hex(2)}"


def read_run_id(run_dir: str | Path) -> str | None:
    """The run id stored in ``run_dir`` (a local path or a storage URL), or ``None``."""
    from l2o.io.storage import as_path  # noqa: PLC0415 - the registry alone needs no l2o

    try:
        return (as_path(run_dir) / RUN_ID_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def run_id_for(run_dir: str | Path, run_name: str) -> str:
    """The id of the run in ``run_dir``: the stored one (a resume), else a :func:`new_run_id`
    stored there. A run directory from before run ids (full checkpoints but no ``run_id``
    file) keeps ``run_name``, the id its checkpoints carry."""
    from l2o.io.atomic import atomic_write  # noqa: PLC0415 - the registry alone needs no l2o
    from l2o.io.checkpoints import latest_checkpoint  # noqa: PLC0415
    from l2o.io.storage import as_path  # noqa: PLC0415

    stored = read_run_id(run_dir)
    if stored is not None:
        return stored
    run_id = run_name if latest_checkpoint(run_dir, "full") is not None else new_run_id(run_name)
    with atomic_write(as_path(run_dir) / RUN_ID_FILE, "w") as f:
        f.write(run_id + "\n")
    return run_id


def shown_state(status: dict[str, Any], now: float | None = None) -> str | None:
    """The state readers show for a run's ``status`` hash: its ``state``, except ``failed``
    for a live-looking state (:data:`LIVE_STATES`) whose last heartbeat (else last update) is
    older than :data:`STALE_HEARTBEATS` times its ``heartbeat_s``."""
    state = status.get("state")
    if state not in LIVE_STATES:
        return state
    age = heartbeat_age(status, now)
    interval = float(status.get("heartbeat_s") or HEARTBEAT_S)
    return "failed" if age is not None and age > STALE_HEARTBEATS * interval else state


def abandoned(status: dict[str, Any], now: float | None = None) -> bool:
    """Whether ``status`` is a live-looking state that no driver can still be behind: no
    heartbeat for :data:`STALE_HEARTBEATS` intervals and for longer than the driver's Redis
    deadline (``outage_s``, default :data:`DEFAULT_OUTAGE_S`) plus two intervals."""
    if status.get("state") not in LIVE_STATES:
        return False
    age = heartbeat_age(status, now)
    interval = float(status.get("heartbeat_s") or HEARTBEAT_S)
    outage = float(status.get("outage_s") or DEFAULT_OUTAGE_S)
    return age is not None and age > max(STALE_HEARTBEATS * interval, outage + 2 * interval)


def write_back_failed(client: redis.Redis, run_id: str, status: dict[str, Any]) -> dict[str, Any]:
    """Store ``failed`` for run ``run_id`` when its ``status`` (as just read) is
    :func:`abandoned`, unless a heartbeat or a new state came meanwhile (checked atomically);
    the status as it now is."""
    if not abandoned(status):
        return status
    key = f"{PREFIX}:{run_id}:status"
    error = (f"the driver's heartbeat stopped {heartbeat_age(status):.0f} s ago (driver killed, "
             "or it lost Redis); marked failed by a reader")
    with client.pipeline() as pipe:
        try:
            pipe.watch(key)
            now = {k: _s(v) for k, v in (pipe.hgetall(key) or {}).items()}
            if not abandoned(now):
                return status
            pipe.multi()
            pipe.hset(key, mapping={"state": "failed", "error": error,
                                    "updated_at": repr(time.time())})
            pipe.execute()
        except redis.WatchError:  # the driver wrote meanwhile: it is alive
            return status
    return {**status, "state": "failed", "error": error}


def heartbeat_age(status: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds since the run's last heartbeat (else its last status update), or ``None``."""
    last = status.get("heartbeat_at", status.get("updated_at"))
    if last is None:
        return None
    return (time.time() if now is None else now) - float(last)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np  # noqa: PLC0415

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def dumps(obj: Any) -> str:
    """JSON of ``obj``, turning numpy/JAX scalars and arrays into plain values."""
    return json.dumps(obj, default=_json_default, allow_nan=True)


def _s(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class EvalJob:
    """One claimed eval job: score the params checkpoint at ``path`` (θ version ``version``)."""

    id: str
    run_id: str
    path: str
    version: int
    deliveries: int = 1
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """:data:`SUITE_JOB` or :data:`CHECKPOINT_JOB` (jobs without a ``kind`` field)."""
        return self.fields.get("kind") or CHECKPOINT_JOB


def checkpoint_id(path: str, version: int = -1) -> str:
    """How suite results name a checkpoint: ``v{version}`` for a run's θ version (``>= 0``),
    else ``p`` + 16 hex digits of the SHA-256 of its absolute path."""
    if int(version) >= 0:
        return f"v{int(version)}"
    digest = hashlib.sha256(str(Path(path).expanduser().absolute()).encode()).hexdigest()
    return f"p{digest[:16]}"


def task_key(task: dict, steps: int, seeds: int, learning_rates: list[float],
             extra: dict | None = None) -> str:
    """A stable key for a tuned-Adam sweep: hash of the task config and the sweep settings."""
    blob = json.dumps({"task": task, "steps": steps, "seeds": seeds,
                       "lrs": [float(x) for x in learning_rates], "extra": extra or {}},
                      sort_keys=True, default=str)
    name = str(task.get("name", "task")) if isinstance(task, dict) else "task"
    return f"{name}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


class Registry:
    """The Redis view of one run (``run_id``). Safe to create in any process from a URL."""

    def __init__(self, client: redis.Redis, run_id: str, *, eval_max_deliveries: int = 3,
                 eval_idle_ms: int = 30_000) -> None:
        """Wrap ``client`` (a ``redis.Redis``, ideally with ``decode_responses=True``)."""
        if not run_id or any(c in run_id for c in " \n\t@"):
            raise ValueError(f"invalid run id {run_id!r}")
        self.r = client
        self.run_id = run_id
        self.eval_max_deliveries = int(eval_max_deliveries)
        self.eval_idle_ms = int(eval_idle_ms)
        self._group_ready = False

    # ---- keys -----------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        """``l2o:{run_id}:part1:part2…``."""
        return ":".join((PREFIX, self.run_id, *parts))

    @property
    def eval_stream(self) -> str:
        """The eval job stream."""
        return self.key("evalq")

    @property
    def dead_stream(self) -> str:
        """The dead-letter stream of eval jobs."""
        return self.key("evalq", "dead")

    # ---- manifest and status ---------------------------------------------------------------
    def write_manifest(self, config: dict, **info: Any) -> None:
        """Record the run's config (and ``info``) and add the run to the global index.

        Stored redacted (:func:`l2o.io.secrets.redacted_config`): no Redis password, no token.
        """
        now = time.time()
        manifest = redacted_config({"config": config, **info, "created_at": now})
        pipe = self.r.pipeline()
        pipe.set(self.key("manifest"), dumps(manifest))
        pipe.zadd(RUNS_KEY, {self.run_id: now}, nx=True)
        pipe.execute()

    def manifest(self) -> dict | None:
        """The manifest written by :meth:`write_manifest`, or ``None``."""
        raw = self.r.get(self.key("manifest"))
        return json.loads(raw) if raw else None

    def set_status(self, state: str | None = None, **fields: Any) -> None:
        """Update the status hash: ``state`` and any other fields (values stored as JSON)."""
        mapping: dict[str, str] = {"updated_at": repr(time.time())}
        if state is not None:
            mapping["state"] = state
        for k, v in fields.items():
            mapping[k] = v if isinstance(v, str) else dumps(v)
        self.r.hset(self.key("status"), mapping=mapping)

    def status(self) -> dict[str, Any]:
        """The status hash, JSON values decoded."""
        raw = self.r.hgetall(self.key("status"))
        out: dict[str, Any] = {}
        for k, v in raw.items():
            k, v = _s(k), _s(v)
            try:
                out[k] = json.loads(v) if k not in ("state",) else v
            except (TypeError, ValueError):
                out[k] = v
        return out

    def heartbeat(self, interval_s: float = HEARTBEAT_S, outage_s: float = DEFAULT_OUTAGE_S
                  ) -> None:
        """Record that the run's driver is alive (``heartbeat_at``; next one in ``interval_s``;
        it gives up after ``outage_s`` without Redis)."""
        self.r.hset(self.key("status"), mapping={"heartbeat_at": repr(time.time()),
                                                 "heartbeat_s": repr(float(interval_s)),
                                                 "outage_s": repr(float(outage_s))})

    def state(self) -> str | None:
        """The run's state (``running``, ``done``, …) or ``None`` if never set."""
        return _s(self.r.hget(self.key("status"), "state"))

    def should_stop(self) -> bool:
        """Whether workers should finish: the run is done, stopping, stopped or failed."""
        return self.state() in TERMINAL_STATES

    def paused(self) -> bool:
        """Whether workers should wait: the run is :data:`PAUSED`."""
        return self.state() == PAUSED

    # ---- learner discovery --------------------------------------------------------------------
    def set_learner_address(self, address: str) -> None:
        """Publish where the learner's gRPC server listens (``host:port``)."""
        self.r.hset(self.key("learner"), mapping={"address": address,
                                                  "updated_at": repr(time.time())})

    def learner_address(self) -> str | None:
        """The learner's last published address, or ``None``."""
        return _s(self.r.hget(self.key("learner"), "address"))

    def clear_learner_address(self) -> None:
        """Forget the learner's address (it is going away)."""
        self.r.delete(self.key("learner"))

    # ---- curriculum (l2o.training.curriculum.ServiceCurriculum)
    # -----------------------------------------
    def set_curriculum(self, info: dict) -> None:
        """Publish the curriculum's stage record (``stage``, ``num_steps``, ``eval_steps``, …)."""
        self.r.set(self.key("curriculum"), dumps(info))

    def curriculum(self) -> dict | None:
        """The curriculum's stage record, or ``None`` (no curriculum, or not published yet)."""
        raw = self.r.get(self.key("curriculum"))
        return json.loads(raw) if raw else None

    # ---- worker sequence numbers --------------------------------------------------------------
    def next_seq(self, worker_id: str) -> int:
        """Reserve the next sequence number of ``worker_id`` (0, 1, 2, … across restarts)."""
        return int(self.r.incr(self.key("seq", worker_id))) - 1

    _RAISE_TO = """
    local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
    local want = tonumber(ARGV[1])
    if cur < want then redis.call('SET', KEYS[1], want) return want end
    return cur
    """

    def ensure_seq_at_least(self, worker_id: str, next_seq: int) -> int:
        """Make ``worker_id``'s next reserved seq at least ``next_seq`` (atomic); the counter.

        Used when the learner remembers seqs that this Redis does not (a resumed run on a fresh
        Redis): reusing them would make every gradient a DUPLICATE.
        """
        return int(self.r.eval(self._RAISE_TO, 1, self.key("seq", worker_id), int(next_seq)))

    def peek_seq(self, worker_id: str) -> int:
        """How many sequence numbers ``worker_id`` has reserved so far."""
        return int(self.r.get(self.key("seq", worker_id)) or 0)

    # ---- checkpoints --------------------------------------------------------------------------
    def add_checkpoint(self, version: int, path: str) -> None:
        """Index the params checkpoint of θ ``version``."""
        self.r.hset(self.key("checkpoints"), str(int(version)), str(path))

    def checkpoints(self) -> dict[int, str]:
        """version → params checkpoint path, ascending."""
        raw = self.r.hgetall(self.key("checkpoints"))
        return dict(sorted((int(_s(k)), _s(v)) for k, v in raw.items()))

    def record_checkpoint(self, path: str, version: int) -> str:
        """Index a new params checkpoint and enqueue its eval job; the job's stream id."""
        self.add_checkpoint(version, path)
        return self.enqueue_eval(path, version)

    # ---- eval queue ---------------------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the eval stream's consumer group (idempotent)."""
        if self._group_ready:
            return
        try:
            self.r.xgroup_create(self.eval_stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def enqueue_eval(self, path: str, version: int, **extra: Any) -> str:
        """Queue an eval of the params checkpoint at ``path``; the job's stream id."""
        self.ensure_group()
        fields = {"run_id": self.run_id, "path": str(path), "version": str(int(version)),
                  "attempts": "0", "enqueued_at": repr(time.time())}
        fields.update({k: str(v) for k, v in extra.items()})
        return _s(self.r.xadd(self.eval_stream, fields))

    def _times_delivered(self, job_id: str) -> int:
        rows = self.r.xpending_range(self.eval_stream, GROUP, min=job_id, max=job_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    def _job(self, job_id: Any, fields: dict) -> EvalJob:
        job_id = _s(job_id)
        f = {_s(k): _s(v) for k, v in fields.items()}
        deliveries = int(f.get("attempts", 0)) + self._times_delivered(job_id)
        return EvalJob(id=job_id, run_id=f.get("run_id", self.run_id), path=f.get("path", ""),
                       version=int(f.get("version", -1)), deliveries=deliveries, fields=f)

    def claim_eval(self, consumer: str, block_ms: int = 1000) -> EvalJob | None:
        """The next eval job for ``consumer``: a reclaimed idle one first, else a new one.

        Waits up to ``block_ms`` for a new job (0: don't wait). Returns ``None`` when none came.
        """
        self.ensure_group()
        cursor = "0-0"
        for _ in range(1000):  # reclaim, dead-lettering jobs whose deliveries are exhausted
            res = self.r.xautoclaim(self.eval_stream, GROUP, consumer,
                                    min_idle_time=self.eval_idle_ms, start_id=cursor, count=1)
            cursor = _s(res[0]) if res else "0-0"
            # (Redis 6.2 returns a deleted entry as nil; the cursor still moves past it)
            for entry in (res[1] if len(res) > 1 else []):
                if not entry or not entry[1]:
                    continue
                job = self._job(*entry)
                if job.deliveries > self.eval_max_deliveries:
                    self._dead_letter(job, "reclaimed after its consumer went away; "
                                           "deliveries exhausted")
                    continue
                return job
            if cursor in ("0-0", "0"):
                break
        streams = self.r.xreadgroup(GROUP, consumer, {self.eval_stream: ">"}, count=1,
                                    block=block_ms if block_ms > 0 else None)
        for _stream, entries in streams or []:
            for job_id, fields in entries:
                if fields:
                    return self._job(job_id, fields)
        return None

    def touch_eval(self, job: EvalJob, consumer: str) -> bool:
        """Heartbeat: reset ``job``'s idle time so it is not reclaimed while still being worked on.

        Uses ``XCLAIM … JUSTID``, which does not count as a delivery. ``False`` if the job is no
        longer pending (it was reclaimed and finished elsewhere, or dead-lettered).
        """
        rows = self.r.xpending_range(self.eval_stream, GROUP, min=job.id, max=job.id, count=1)
        if not rows or _s(rows[0]["consumer"]) != consumer:
            return False
        ids = self.r.xclaim(self.eval_stream, GROUP, consumer, min_idle_time=0,
                            message_ids=[job.id], justid=True)
        return bool(ids)

    def ack_eval(self, job: EvalJob) -> None:
        """Acknowledge ``job`` (call only after its result is stored) and delete it."""
        pipe = self.r.pipeline()
        pipe.xack(self.eval_stream, GROUP, job.id)
        pipe.xdel(self.eval_stream, job.id)
        pipe.execute()

    def fail_eval(self, job: EvalJob, error: str, permanent: bool = False) -> bool:
        """Record a failure of ``job``: re-queue it, or dead-letter it after k deliveries (at
        once when the failure is ``permanent``: retrying cannot help).

        Returns ``True`` when the job went to the dead-letter stream.
        """
        self.r.hset(self.key("eval_errors"), job.id, error[-2000:])
        if permanent or job.deliveries >= self.eval_max_deliveries:
            self._dead_letter(job, error)
            return True
        fields = dict(job.fields)
        fields["attempts"] = str(job.deliveries)
        fields["last_error"] = error[-500:]
        pipe = self.r.pipeline()
        pipe.xadd(self.eval_stream, fields)
        pipe.xack(self.eval_stream, GROUP, job.id)
        pipe.xdel(self.eval_stream, job.id)
        pipe.execute()
        return False

    def _dead_letter(self, job: EvalJob, error: str) -> None:
        fields = dict(job.fields)
        fields.update({"original_id": job.id, "deliveries": str(job.deliveries),
                       "error": error[-2000:], "dead_at": repr(time.time())})
        pipe = self.r.pipeline()
        pipe.xadd(self.dead_stream, fields)
        pipe.xack(self.eval_stream, GROUP, job.id)
        pipe.xdel(self.eval_stream, job.id)
        pipe.execute()

    def dead_letters(self) -> list[dict[str, str]]:
        """The dead-letter stream's entries (each with its ``id``)."""
        return [{"id": _s(i), **{_s(k): _s(v) for k, v in f.items()}}
                for i, f in self.r.xrange(self.dead_stream)]

    def eval_backlog(self) -> dict[str, int]:
        """``{"queued": jobs not yet delivered, "pending": delivered, not yet acknowledged}``."""
        self.ensure_group()
        pending = int(self.r.xpending(self.eval_stream, GROUP)["pending"])
        length = int(self.r.xlen(self.eval_stream))
        return {"queued": max(0, length - pending), "pending": pending}

    def evals_outstanding(self) -> int:
        """Jobs queued or in flight."""
        b = self.eval_backlog()
        return b["queued"] + b["pending"]

    # ---- suite-task jobs ----------------------------------------------------------------------
    def suite_result_key(self, ckpt_id: str, suite: str, task: str) -> str:
        """``l2o:{run}:suite:{suite}:{ckpt_id}:{task}``: where a suite-task result is stored."""
        return self.key("suite", suite, ckpt_id, task)

    def enqueue_suite_eval(self, path: str, suite: str, suite_version: str, tasks: list[str], *,
                           seeds: int, label: str, version: int = -1,
                           settings: dict | None = None, cache_dir: str | None = None
                           ) -> dict[str, str]:
        """Queue one :data:`SUITE_JOB` per task of ``tasks``: score the checkpoint at ``path``
        on that task of ``suite``. ``settings`` is ``BaselineSettings.to_json()`` (``None``: the
        defaults). A result stored earlier for the same task is deleted first. Returns task →
        job stream id."""
        ckpt = checkpoint_id(path, version)
        common = {"kind": SUITE_JOB, "checkpoint_id": ckpt, "suite": suite,
                  "suite_version": suite_version, "seeds": int(seeds), "label": label,
                  "settings": dumps(settings) if settings is not None else "",
                  "cache_dir": str(cache_dir) if cache_dir is not None else ""}
        if tasks:
            self.r.delete(*(self.suite_result_key(ckpt, suite, t) for t in tasks))
        return {t: self.enqueue_eval(path, version, **common, task=t) for t in tasks}

    def store_suite_result(self, ckpt_id: str, suite: str, task: str, result: dict) -> None:
        """Store the result of a suite-task job (``{"result": ..., "job": ...}``)."""
        self.r.set(self.suite_result_key(ckpt_id, suite, task),
                   dumps({**result, "stored_at": time.time()}))

    def suite_results(self, ckpt_id: str, suite: str, tasks: list[str]) -> dict[str, dict]:
        """The stored results of those of ``tasks`` that are in, by task (in ``tasks`` order)."""
        if not tasks:
            return {}
        raw = self.r.mget([self.suite_result_key(ckpt_id, suite, t) for t in tasks])
        return {t: json.loads(v) for t, v in zip(tasks, raw, strict=True) if v}

    def suite_failures(self, ckpt_id: str, suite: str) -> dict[str, dict[str, str]]:
        """The dead-lettered suite-task jobs of checkpoint ``ckpt_id`` on ``suite``, by task."""
        return {d.get("task", ""): d for d in self.dead_letters()
                if d.get("kind") == SUITE_JOB and d.get("checkpoint_id") == ckpt_id
                and d.get("suite") == suite}

    # ---- results and leaderboard --------------------------------------------------------------
    @staticmethod
    def score(result: dict) -> float:
        """Leaderboard score of a result: learned / Adam final loss (lower is better).

        A result carrying its own ``leaderboard_score`` (the unsupervised update rule's: 1 − the
        logistic-regression accuracy of its features, see ``l2o.unsupervised.evaluation``) is
        ranked by that instead.
        """
        if "leaderboard_score" in result:
            own = float(result["leaderboard_score"])
            return own if math.isfinite(own) else math.inf
        learned = float(result["learned_final_loss"])
        adam = float(result["adam_final_loss"])
        if not math.isfinite(learned) or not math.isfinite(adam):
            return math.inf
        return learned / adam if adam > 0 else (0.0 if learned <= 0 else math.inf)

    def store_eval_result(self, version: int, result: dict) -> float:
        """Store the eval result of θ ``version`` and rank it; the leaderboard score."""
        score = self.score(result)
        result = {**result, "version": int(version), "run_id": self.run_id, "score": score,
                  "stored_at": time.time()}
        redis_score = score if math.isfinite(score) else 1e300
        pipe = self.r.pipeline()
        pipe.hset(self.key("evals"), str(int(version)), dumps(result))
        pipe.zadd(self.key("leaderboard"), {str(int(version)): redis_score})
        pipe.zadd(GLOBAL_LEADERBOARD, {f"{self.run_id}@{int(version)}": redis_score})
        pipe.execute()
        return score

    def eval_result(self, version: int) -> dict | None:
        """The stored eval result of θ ``version``, or ``None``."""
        raw = self.r.hget(self.key("evals"), str(int(version)))
        return json.loads(raw) if raw else None

    def eval_results(self) -> dict[int, dict]:
        """version → eval result, ascending."""
        raw = self.r.hgetall(self.key("evals"))
        return dict(sorted((int(_s(k)), json.loads(v)) for k, v in raw.items()))

    def leaderboard(self, top: int = 10) -> list[dict]:
        """This run's best checkpoints, best (lowest score) first."""
        rows = self.r.zrange(self.key("leaderboard"), 0, top - 1, withscores=True)
        out = []
        for member, score in rows:
            res = self.eval_result(int(_s(member))) or {}
            out.append({**res, "run_id": self.run_id, "version": int(_s(member)),
                        "score": float(score)})
        return out

    # ---- cached baseline sweeps ----------------------------------------------------------------
    def get_adam_sweep(self, key: str) -> dict | None:
        """A cached tuned-Adam sweep under ``key`` (see :func:`task_key`), or ``None``."""
        raw = self.r.get(f"{PREFIX}:adam:{key}")
        return json.loads(raw) if raw else None

    def set_adam_sweep(self, key: str, sweep: dict) -> None:
        """Cache a tuned-Adam sweep under ``key`` (shared by every run)."""
        self.r.set(f"{PREFIX}:adam:{key}", dumps(sweep))

    # ---- cleanup ------------------------------------------------------------------------------
    def delete_run(self) -> int:
        """Remove every key of this run and its global index entries; number of keys removed."""
        keys = list(self.r.scan_iter(match=f"{PREFIX}:{self.run_id}:*", count=500))
        n = self.r.delete(*keys) if keys else 0
        members = [m for m in self.r.zrange(GLOBAL_LEADERBOARD, 0, -1)
                   if _s(m).rsplit("@", 1)[0] == self.run_id]
        pipe = self.r.pipeline()
        pipe.zrem(RUNS_KEY, self.run_id)
        if members:
            pipe.zrem(GLOBAL_LEADERBOARD, *members)
        pipe.execute()
        return int(n)


def list_runs(client: redis.Redis) -> list[dict]:
    """Every run in the index, newest first: ``{run_id, created_at, state}`` (the state as
    :func:`shown_state` shows it; an :func:`abandoned` run is stored as failed)."""
    out = []
    for member, created in client.zrevrange(RUNS_KEY, 0, -1, withscores=True):
        run_id = _s(member)
        status = write_back_failed(client, run_id, Registry(client, run_id).status())
        out.append({"run_id": run_id, "created_at": float(created),
                    "state": shown_state(status)})
    return out


def run_status(client: redis.Redis, run_id: str) -> dict:
    """Everything ``l2o status RUN`` shows: state (as :func:`shown_state` shows it; the stored
    one is ``status["state"]``; an :func:`abandoned` run is stored as failed first), counters,
    learner, checkpoints and evals.

    Raises ``KeyError`` if Redis knows nothing of ``run_id``.
    """
    reg = Registry(client, run_id)
    manifest = reg.manifest()
    status = write_back_failed(client, run_id, reg.status())
    if manifest is None and not status and not client.exists(
            reg.eval_stream, reg.dead_stream, reg.key("checkpoints"), reg.key("evals")):
        raise KeyError(f"no run {run_id!r} in this Redis")
    ckpts = reg.checkpoints()
    evals = reg.eval_results()
    latest_eval = evals[max(evals)] if evals else None
    board = reg.leaderboard(top=1)
    return {
        "run_id": run_id,
        "state": shown_state(status),
        "heartbeat_age_s": heartbeat_age(status),
        "status": status,
        "config": (manifest or {}).get("config"),
        "created_at": (manifest or {}).get("created_at"),
        "learner_address": reg.learner_address(),
        "checkpoints": len(ckpts),
        "latest_checkpoint": (max(ckpts), ckpts[max(ckpts)]) if ckpts else None,
        "evals": len(evals),
        "latest_eval": latest_eval,
        "best": board[0] if board else None,
        "eval_backlog": reg.eval_backlog(),
        "dead_letters": int(client.xlen(reg.dead_stream)),
    }


def leaderboard(client: redis.Redis, top: int = 10, run_id: str | None = None) -> list[dict]:
    """The best checkpoints of all runs (or of ``run_id``), best (lowest score) first.

    Each row: ``run_id``, ``version``, ``score`` (learned / tuned-Adam final loss, lower is
    better), and the stored eval result's fields (``learned_final_loss``, ``adam_final_loss``,
    ``adam_best_lr``, ``speedup``, ``task``…) when present.
    """
    if run_id is not None:
        return Registry(client, run_id).leaderboard(top)
    out = []
    for member, score in client.zrange(GLOBAL_LEADERBOARD, 0, top - 1, withscores=True):
        rid, _, version = _s(member).rpartition("@")
        raw = client.hget(f"{PREFIX}:{rid}:evals", version)
        res = json.loads(raw) if raw else {}
        out.append({**res, "run_id": rid, "version": int(version), "score": float(score)})
    return out


class RegistryHooks:
    """Picklable callbacks that connect a learner (possibly in a Ray actor) to the registry.

    ``hooks.publish_address(address)`` publishes the learner's address for discovery and
    ``hooks.enqueue_eval(path, version)`` indexes a params checkpoint and queues its eval job.
    The Redis connection is opened lazily from ``redis_url`` in whichever process calls them.
    """

    def __init__(self, redis_url: str | SecretFile, run_id: str) -> None:
        """Remember where the registry lives (a URL holding a password comes as the
        :class:`~l2o.io.secrets.SecretFile` that holds it); nothing is opened yet."""
        self.redis_url = redis_url
        self.run_id = run_id
        self._registry: Registry | None = None

    def __getstate__(self) -> dict:
        return {"redis_url": self.redis_url, "run_id": self.run_id, "_registry": None}

    def registry(self) -> Registry:
        """The run's :class:`Registry` (connected on first use)."""
        if self._registry is None:
            from services.redis_server import redis_connection  # noqa: PLC0415

            client, _ = redis_connection(self.redis_url, wait=True)  # may be restarting
            self._registry = Registry(client, self.run_id)
        return self._registry

    def publish_address(self, address: str) -> None:
        """Publish the learner's ``host:port``."""
        self.registry().set_learner_address(address)

    def enqueue_eval(self, path: Any, version: int) -> None:
        """Index the params checkpoint at ``path`` (θ ``version``) and queue its eval."""
        self.registry().record_checkpoint(str(path), int(version))
