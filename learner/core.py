"""The learner: θ, the optax meta-optimizer state, the version counter and the gradient buffer.

Pure Python/JAX, no network I/O: ``learner.server`` wraps it in gRPC. Gradients come in
through :meth:`Learner.submit` (thread-safe; the gRPC thread pool calls it concurrently) and are
validated, deduplicated and checked against the staleness policy before they enter a bounded buffer.
A background applier thread takes ``batch_size`` gradients at a time, averages them and applies
:func:`l2o.training.meta_update.meta_update` (the single-machine trainer's meta-update), which
increments the version. Nothing that is rejected ever touches θ or the optimizer state, and neither
does an update whose mean gradient or result is non-finite: it is skipped and counted
(``skipped_nonfinite``).

Policies (see ``design.md``):

- **validation** — tree structure (WRONG_TREE), shapes (WRONG_SHAPE), dtype equal to θ's, float32
  (WRONG_DTYPE), all finite (NAN_OR_INF), total size ≤ ``max_message_bytes`` (TOO_LARGE);
- **run, generation and incarnation** — ``run_id`` must be the learner's (WRONG_RUN), ``gen_id``
  its current generation (STALE_GENERATION) and ``incarnation`` its own (STALE_INCARNATION): every
  learner object draws a random incarnation id when it is built, so a restarted learner never
  takes a gradient computed on the θ of an earlier one, even at an equal version number;
- **staleness** — dropped (STALE) when ``version − theta_version > max_staleness``, both on arrival
  and again when the batch is applied; a ``theta_version`` ahead of the learner's is STALE too;
- **dedup** — a ``(worker_id, seq)`` seen before is DUPLICATE; the table (per worker: highest seq
  and the seqs seen within :data:`DEDUP_WINDOW` below it) is saved in every full checkpoint;
- **backpressure** — when the buffer holds ``buffer_size`` gradients, ``block`` makes ``submit``
  wait up to ``block_timeout_s`` (then BUFFER_FULL) and ``drop_oldest`` evicts the oldest one.

Versions never repeat within a run directory. Before a new version is published, the update that
makes it is appended to ``run_dir/applied.jsonl`` (:data:`APPLIED_LOG`: the version, gen id,
incarnation and the ``(worker_id, seq)`` of each gradient applied, in order). A learner built on
a run directory whose log names a version above its checkpoint's (it crashed after its last
checkpoint) starts at that version + 1: the θ it resumes gets a number never used before, and the
versions workers and users see keep increasing. With a run directory on object storage
(``s3://…``) the log is kept in the local directory ``local_dir`` instead (an object cannot be
appended to): a learner restarted on the same node still sees it. :meth:`Learner.applied_log`
holds the same entries in memory (this incarnation's).

What an ``Ack`` means, and what is lost (the policy): ``accepted`` (reason OK) means *taken into
the buffer*, not applied. An accepted gradient is applied exactly once, or dropped and counted:
stale when its batch is taken (``dropped_stale``), evicted by ``drop_oldest``
(``dropped_oldest``), in a meta-update that raised (``failed_updates``) or was skipped for a
non-finite mean or result (``skipped_nonfinite``), or still buffered when the learner stops
(``dropped_at_stop``; the buffer is not checkpointed). What was applied is the applied log, never
the acks. A meta-update that raises is counted with its error (``last_error``); after
``service.max_failed_updates`` of them in a row the learner stops applying, sets ``fatal_error``
and refuses gradients (STOPPED) so that its driver fails the run with that error. Skipped
non-finite updates are the trainer's policy and never stop the run.

Checkpoints: every ``checkpoint_every`` updates and on :meth:`Learner.save_checkpoint`, a full
checkpoint (θ, optimizer state, version, gen id, counters, dedup table, config) and a params
checkpoint (θ, version, gen id), then ``on_params_checkpoint(path, version)``; their metadata is
the trainer's schema, :class:`l2o.io.checkpoints.CheckpointMeta`.
:meth:`Learner.resume` starts from the newest full checkpoint of a run directory.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2o.io.checkpoints import (
    CheckpointError,
    CheckpointMeta,
    checkpoint_path,
    newest_intact_checkpoint,
    save_checkpoint,
    set_aside,
)
from l2o.io.config import ServiceConfig
from l2o.io.storage import as_path, is_remote
from l2o.training.meta_update import MetaState, meta_update
from proto.wire import ALIGN, Reason, aligned_empty

log = logging.getLogger(__name__)

#: How far below a worker's highest seq individual seqs are remembered; older ones are DUPLICATE.
DEDUP_WINDOW = 4096

#: The run directory's log of published versions: one JSON line per update (and per generation
#: or renumbered resume), written before the version is published.
APPLIED_LOG = "applied.jsonl"

#: How many updates :meth:`Learner.applied_log` keeps in memory (the file keeps them all).
APPLIED_LOG_MAX = 100_000


@dataclass(frozen=True)
class GradientHeader:
    """What a worker stamps on a meta-gradient."""

    run_id: str
    theta_version: int
    gen_id: int
    worker_id: str
    seq: int
    incarnation: int  # the incarnation of the learner whose θ the gradient was computed on
    estimator: str = ""
    inner_steps: int = 0
    mean_inner_loss: float = math.nan


@dataclass(frozen=True)
class SubmitResult:
    """The learner's answer to a gradient: accepted, or rejected with a reason (like ``Ack``)."""

    accepted: bool
    reason: Reason
    detail: str
    version: int


@dataclass(frozen=True)
class Applied:
    """One applied meta-update: the version it made and its gradients' ``(worker_id, seq)``, in
    the order they were averaged."""

    version: int
    gen_id: int
    gradients: tuple[tuple[str, int], ...]


def read_applied_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of ``run_dir``'s :data:`APPLIED_LOG`, oldest first (none without one)."""
    path = Path(run_dir) / APPLIED_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_logged_version(run_dir: str | Path) -> int:
    """The newest version :data:`APPLIED_LOG` of ``run_dir`` names; -1 without one."""
    path = Path(run_dir) / APPLIED_LOG
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            for start in (max(0, size - 65536), 0):  # the tail, else the whole file
                f.seek(start)
                for line in reversed(f.read().splitlines()):
                    try:
                        return int(json.loads(line)["version"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut by a crash
    except FileNotFoundError:
        pass
    return -1


@dataclass
class _Pending:
    grad: Any
    header: GradientHeader


@dataclass
class _SeqWindow:
    """The seqs seen from one worker: its high-water mark and the recent seqs below it."""

    high: int = -1
    recent: set[int] = field(default_factory=set)

    def seen(self, seq: int) -> bool:
        return seq in self.recent or seq <= self.high - DEDUP_WINDOW

    def add(self, seq: int) -> None:
        self.recent.add(seq)
        if seq > self.high:
            self.high = seq
            floor = self.high - DEDUP_WINDOW
            if len(self.recent) > 2 * DEDUP_WINDOW:
                self.recent = {s for s in self.recent if s > floor}

    def to_json(self) -> list:
        floor = self.high - DEDUP_WINDOW
        return [self.high, sorted(s for s in self.recent if s > floor)]

    @classmethod
    def from_json(cls, data: Any) -> _SeqWindow:
        high, recent = data
        return cls(high=int(high), recent={int(s) for s in recent})


#: ``skipped_nonfinite``: meta-updates skipped for a non-finite mean gradient or result;
#: ``failed_updates``: meta-updates that raised; ``dropped_at_stop``: accepted gradients still
#: buffered when the learner stopped
_COUNTERS = ("accepted", "applied", "dropped_stale", "dropped_oldest", "rejected", "duplicate",
             "skipped_nonfinite", "failed_updates", "dropped_at_stop")


def _aligned(x: np.ndarray) -> np.ndarray:
    if x.ctypes.data % ALIGN == 0 and x.flags.c_contiguous:
        return x
    out = aligned_empty(x.nbytes).view(x.dtype).reshape(x.shape)
    np.copyto(out, x)
    return out


def to_device(tree: Any) -> Any:
    """``tree``'s numpy arrays as JAX arrays, sharing memory where XLA allows (64-byte aligned).

    The arrays must not be modified afterwards.
    """
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(_aligned(np.asarray(x)), may_alias=True), tree)


def mean_of(grads: list[Any]) -> Any:
    """The elementwise mean of a list of gradient trees (numpy, summed in order, then ÷ n)."""
    if len(grads) == 1:
        return grads[0]

    def mean(*xs: np.ndarray) -> np.ndarray:
        acc = aligned_empty(xs[0].nbytes).view(xs[0].dtype).reshape(xs[0].shape)
        np.add(xs[0], xs[1], out=acc)
        for x in xs[2:]:
            np.add(acc, x, out=acc)
        acc /= np.asarray(len(xs), acc.dtype)
        return acc

    return jax.tree_util.tree_map(mean, *grads)


class Learner:
    """θ and its meta-optimizer, fed by validated, deduplicated, staleness-checked gradients.

    Args:
        theta: the initial θ (a pytree of float32 arrays); its structure is the template every
            gradient is checked against.
        meta_optimizer: the optax transformation applied to θ.
        config: the service policies (``batch_size``, ``max_staleness``, ``buffer_size``,
            ``backpressure``, ``max_message_bytes``).
        run_dir: where checkpoints (``checkpoints/``) go: a local path or a storage URL
            (``s3://…``, :mod:`l2o.io.storage`).
        run_id: the run this learner serves; gradients of other runs are WRONG_RUN.
        checkpoint_every: write checkpoints every this many updates.
        on_params_checkpoint: called as ``f(path, version)`` after each params checkpoint.
        extra_metadata: merged into both checkpoints' metadata (e.g. ``optimizer``, ``seed``,
            ``config``): fields of :class:`~l2o.io.checkpoints.CheckpointMeta`, checked here.
        opt_state: the meta-optimizer state (default: ``meta_optimizer.init(theta)``).
        version, gen_id: where the counters start (the version moves past any version that
            ``run_dir``'s :data:`APPLIED_LOG` names).
        block_timeout_s: how long ``submit`` waits for room under ``backpressure="block"``.
        tensorboard: write per-update metrics to ``local_dir/tensorboard``.
        local_dir: the local directory of the :data:`APPLIED_LOG` and TensorBoard logs (default
            ``run_dir``, which must then be local).
        start: start the applier thread now (else call :meth:`start`, or :meth:`step` by hand).
    """

    def __init__(
        self,
        theta: Any,
        meta_optimizer: optax.GradientTransformation,
        config: ServiceConfig,
        run_dir: str | Path,
        run_id: str,
        checkpoint_every: int = 100,
        on_params_checkpoint: Callable[[Path, int], None] | None = None,
        extra_metadata: dict | None = None,
        *,
        opt_state: Any = None,
        version: int = 0,
        gen_id: int = 0,
        block_timeout_s: float = 30.0,
        tensorboard: bool = True,
        start: bool = True,
        local_dir: str | Path | None = None,
    ):
        if config.buffer_size < config.batch_size:
            raise ValueError(f"buffer_size ({config.buffer_size}) must be at least batch_size "
                             f"({config.batch_size})")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}")
        self.theta = jax.tree_util.tree_map(jnp.asarray, theta)
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.theta)[0]:
            if leaf.dtype != jnp.float32:
                raise ValueError(f"θ leaf {jax.tree_util.keystr(path)} is {leaf.dtype}, "
                                 "expected float32")
        self.meta_optimizer = meta_optimizer
        self.opt_state = meta_optimizer.init(self.theta) if opt_state is None else opt_state
        self.config = config
        self.run_dir = as_path(run_dir)
        if local_dir is None and is_remote(self.run_dir):
            raise ValueError(f"run directory {self.run_dir} is not local: give local_dir for "
                             "the applied log and TensorBoard")
        self.local_dir = Path(local_dir) if local_dir is not None else self.run_dir
        self.run_id = run_id
        self.checkpoint_every = checkpoint_every
        self.on_params_checkpoint = on_params_checkpoint
        self.extra_metadata = dict(extra_metadata or {})
        # a field the schema lacks, or a wrong type, is refused now rather than at the first save
        CheckpointMeta.model_validate({"kind": "full", "version": 0, **self.extra_metadata})
        self.version = int(version)
        self.gen_id = int(gen_id)
        #: this learner's id, new every time one is built: θ versions are named within it
        self.incarnation = secrets.randbits(63) or 1
        self._log_fd: int | None = None
        self._applied: deque[Applied] = deque(maxlen=APPLIED_LOG_MAX)
        newest = last_logged_version(self.local_dir)
        if newest > self.version:  # versions up to `newest` named θs lost in a crash
            log.warning("versions up to %d were published after the checkpoint at %d; "
                        "continuing at %d", newest, self.version, newest + 1)
            self.version = newest + 1
            self._append_log({"event": "renumbered", "from_version": int(version)})
        self.block_timeout_s = block_timeout_s
        self.resumed_from: Path | None = None
        #: newer full checkpoints :meth:`resume` skipped as damaged (left in place)
        self.skipped_checkpoints: list[Path] = []

        self._treedef = jax.tree_util.tree_structure(self.theta)
        self._shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(self.theta)]
        self._dtypes = [np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(self.theta)]
        self._update = jax.jit(functools.partial(meta_update, meta_optimizer))

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # buffer/version changes
        self._apply_lock = threading.Lock()  # one θ mutator at a time
        self._ckpt_lock = threading.Lock()
        self._buffer: deque[_Pending] = deque()
        self._seen: dict[str, _SeqWindow] = {}
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.updates = 0
        self.rejected_by_reason: dict[str, int] = {}
        self._arrivals: deque[float] = deque(maxlen=1024)
        self.last_metrics: dict[str, float] = {
            "staleness_mean": 0.0, "staleness_max": 0, "meta_loss": math.nan,
        }
        #: why the latest meta-update failed or was skipped; why the learner stopped the run
        self.last_error = ""
        self.fatal_error = ""
        self._failures_in_a_row = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._writer: Any = None
        self._tensorboard = tensorboard
        if start:
            self.start()

    # --- construction from a run directory ------------------------------------------------------

    @classmethod
    def resume(
        cls,
        theta: Any,
        meta_optimizer: optax.GradientTransformation,
        config: ServiceConfig,
        run_dir: str | Path,
        run_id: str,
        checkpoint_every: int = 100,
        on_params_checkpoint: Callable[[Path, int], None] | None = None,
        extra_metadata: dict | None = None,
        **kwargs: Any,
    ) -> Learner:
        """A learner resumed from the newest intact full checkpoint in ``run_dir``, or a fresh
        one.

        ``theta`` is the template (and the starting θ when there is no checkpoint). Newer full
        checkpoints that are damaged are skipped with a warning and left in place
        (:func:`~l2o.io.checkpoints.newest_intact_checkpoint`). Raises
        :class:`~l2o.io.checkpoints.CheckpointError` when no full checkpoint is intact, or for
        the newest intact one when it is of another run or its θ does not match the template.
        """
        target = {"theta": theta, "opt_state": meta_optimizer.init(theta)}
        found = newest_intact_checkpoint(run_dir, target, "full")
        if found is None:
            return cls(theta, meta_optimizer, config, run_dir, run_id, checkpoint_every,
                       on_params_checkpoint, extra_metadata, **kwargs)
        path, tree, meta = found.path, found.tree, found.meta
        if meta.run_id not in (None, run_id):
            raise CheckpointError(f"checkpoint {path} belongs to run {meta.run_id!r}, "
                                  f"not {run_id!r}")
        start = kwargs.pop("start", True)
        learner = cls(
            tree["theta"], meta_optimizer, config, run_dir, run_id, checkpoint_every,
            on_params_checkpoint, extra_metadata,
            opt_state=jax.tree_util.tree_map(jnp.asarray, tree["opt_state"]),
            version=meta.version, gen_id=meta.gen_id, start=False, **kwargs,
        )
        learner._restore_tables(meta)
        learner.resumed_from = path
        learner.skipped_checkpoints = list(found.skipped)
        log.info("learner resumed from %s at version %d", path, learner.version)
        if start:
            learner.start()
        return learner

    def _restore_tables(self, meta: CheckpointMeta) -> None:
        for k, v in (meta.counters or {}).items():
            if k in self.counters:
                self.counters[k] = v
        self.updates = meta.updates if meta.updates is not None else self.updates
        self.rejected_by_reason = dict(meta.rejected_by_reason or {})
        self._seen = {w: _SeqWindow.from_json(d) for w, d in (meta.dedup or {}).items()}

    # --- the applier thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread that applies a meta-update per ``batch_size`` gradients."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="learner-applier", daemon=True)
        self._thread.start()

    def stop(self, checkpoint: bool = True, timeout: float | None = 60.0) -> None:
        """Stop the applier (finishing an update in progress), drop the buffered gradients
        (``dropped_at_stop``), optionally checkpoint, close logs. Gradients are refused (STOPPED)
        from now on."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._apply_lock, self._changed:
            self._drop_buffer_at_stop()
        if checkpoint:
            self.save_checkpoint()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    def _drop_buffer_at_stop(self) -> None:
        """Count and drop the buffered gradients: they will never be applied (caller holds the
        lock)."""
        if self._buffer:
            log.warning("%d accepted gradients were never applied: the learner stopped",
                        len(self._buffer))
        self.counters["dropped_at_stop"] += len(self._buffer)
        self._buffer.clear()
        self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._stopping and len(self._buffer) < self.config.batch_size:
                    self._changed.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # counted by step; θ untouched, the batch lost
                log.exception("meta-update failed")

    def step(self) -> bool:
        """Apply one meta-update if ``batch_size`` fresh gradients are buffered; whether it did.

        Gradients that went stale while buffered are dropped (counted) first. θ and the optimizer
        state change only if :func:`~l2o.training.meta_update.meta_update` applies the update; a
        batch whose mean gradient or result is non-finite is discarded and counted
        (``skipped_nonfinite``), one that raises is counted in ``failed_updates`` (and re-raised);
        both set ``last_error``. After ``max_failed_updates`` raising updates in a row the learner
        stops applying (``fatal_error``). An applied update is logged (:data:`APPLIED_LOG`,
        :meth:`applied_log`) before its version is published.
        """
        with self._apply_lock:
            batch = self._take_batch()
            if batch is None:
                return False
            keys = tuple((p.header.worker_id, p.header.seq) for p in batch)
            try:
                grad = to_device(mean_of([p.grad for p in batch]))
                state = MetaState(theta=self.theta, opt_state=self.opt_state,
                                  version=jnp.asarray(self.version, jnp.int32))
                new, info = self._update(state, grad)
                applied, grad_finite = bool(info.applied), bool(info.grad_finite)
                if applied:
                    self._append_log({"applied": [list(k) for k in keys]}, self.version + 1)
            except Exception as e:
                self._count_failure(f"meta-update failed: {type(e).__name__}: {e}", len(batch))
                raise
            if not applied:
                what = "mean gradient" if not grad_finite else "θ or optimizer state"
                with self._lock:
                    self.counters["skipped_nonfinite"] += 1
                    self.last_error = (f"meta-update skipped: non-finite {what}; batch of "
                                       f"{len(batch)} discarded")
                log.warning("%s", self.last_error)
                return False
            staleness = [self.version - p.header.theta_version for p in batch]
            losses = [p.header.mean_inner_loss for p in batch
                      if math.isfinite(p.header.mean_inner_loss)]
            with self._changed:
                self.theta, self.opt_state = new.theta, new.opt_state
                self.version += 1
                self.updates += 1
                self._failures_in_a_row = 0
                self._applied.append(Applied(self.version, self.gen_id, keys))
                self.counters["applied"] += len(batch)
                self.last_metrics = {
                    "staleness_mean": float(np.mean(staleness)),
                    "staleness_max": int(max(staleness)),
                    "meta_loss": float(np.mean(losses)) if losses else math.nan,
                }
                self._changed.notify_all()
                updates = self.updates
            self._log_metrics()
        if updates % self.checkpoint_every == 0:
            self.save_checkpoint()
        return True

    def _count_failure(self, error: str, lost: int) -> None:
        """Count a meta-update that raised; the ``max_failed_updates``-th in a row stops the
        learner with ``error``."""
        with self._changed:
            self.counters["failed_updates"] += 1
            self.last_error = f"{error} (batch of {lost} lost)"
            self._failures_in_a_row += 1
            if self._failures_in_a_row < self.config.max_failed_updates:
                return
            self.fatal_error = (f"{self._failures_in_a_row} meta-updates in a row failed; "
                                f"the last: {error}")
            log.error("learner stopping: %s", self.fatal_error)
            self._stopping = True
            self._drop_buffer_at_stop()

    def _append_log(self, entry: dict[str, Any], version: int | None = None) -> None:
        """Append ``entry`` (stamped with ``version``, default the current one, the gen id and
        the incarnation) to :data:`APPLIED_LOG`, one ``write`` per line (a killed process loses
        no written line)."""
        if self._log_fd is None:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            self._log_fd = os.open(self.local_dir / APPLIED_LOG,
                                   os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = {"version": self.version if version is None else version, "gen_id": self.gen_id,
                "incarnation": self.incarnation, **entry}
        os.write(self._log_fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())

    def applied_log(self) -> list[Applied]:
        """This incarnation's applied updates in order (the newest :data:`APPLIED_LOG_MAX`)."""
        with self._lock:
            return list(self._applied)

    def _take_batch(self) -> list[_Pending] | None:
        """The oldest ``batch_size`` fresh gradients, after dropping stale ones; None if too few."""
        n = self.config.batch_size
        with self._changed:
            fresh = [p for p in self._buffer if not self._is_stale(p.header.theta_version)]
            dropped = len(self._buffer) - len(fresh)
            if dropped:
                self.counters["dropped_stale"] += dropped
                self.rejected_by_reason["STALE"] = self.rejected_by_reason.get("STALE", 0) + dropped
                self._buffer = deque(fresh)
            self._changed.notify_all()  # there may be room in the buffer now
            if len(self._buffer) < n:
                return None
            return [self._buffer.popleft() for _ in range(n)]

    def _is_stale(self, theta_version: int) -> bool:
        lag = self.version - theta_version
        return lag > self.config.max_staleness or lag < 0

    # --- incoming gradients ----------------------------------------------------------------------

    def _count_rejection(self, reason: Reason) -> None:
        key = {Reason.STALE: "dropped_stale", Reason.DUPLICATE: "duplicate"}.get(reason,
                                                                                 "rejected")
        self.counters[key] += 1
        self.rejected_by_reason[reason.name] = self.rejected_by_reason.get(reason.name, 0) + 1

    def reject(self, reason: Reason, detail: str) -> SubmitResult:
        """Count a rejection decided outside :meth:`submit` (e.g. a bad checksum on the wire)."""
        with self._lock:
            self._count_rejection(reason)
            return SubmitResult(False, reason, detail, self.version)

    def _header_problem(self, header: GradientHeader) -> tuple[Reason, str] | None:
        """What is wrong with ``header`` now (caller holds the lock), or None."""
        if header.run_id != self.run_id:
            return Reason.WRONG_RUN, f"run {header.run_id!r}, the learner serves {self.run_id!r}"
        if self._stopping:
            return Reason.STOPPED, self.fatal_error or "the learner is stopping"
        if header.incarnation != self.incarnation:
            return (Reason.STALE_INCARNATION,
                    f"θ of incarnation {header.incarnation:x}, the learner is {self.incarnation:x}"
                    " (it restarted: fetch θ again)")
        if header.gen_id != self.gen_id:
            return (Reason.STALE_GENERATION,
                    f"gen_id {header.gen_id}, the learner is at generation {self.gen_id}")
        lag = self.version - header.theta_version
        if lag > self.config.max_staleness:
            return (Reason.STALE, f"θ version {header.theta_version} is {lag} behind "
                                  f"{self.version} (max_staleness {self.config.max_staleness})")
        if lag < 0:
            return (Reason.STALE, f"θ version {header.theta_version} is ahead of the learner's "
                                  f"{self.version}")
        window = self._seen.get(header.worker_id)
        if window is not None and window.seen(header.seq):
            return Reason.DUPLICATE, f"(worker {header.worker_id!r}, seq {header.seq}) seen before"
        return None

    def precheck(self, header: GradientHeader, nbytes: int) -> SubmitResult | None:
        """Reject early from the header alone (before the tensor bytes arrive); None if it may pass.

        Rejections are counted. A gradient that passes must still go through :meth:`submit`.
        """
        with self._lock:
            problem = self._header_problem(header)
            if problem is None and nbytes > self.config.max_message_bytes:
                problem = (Reason.TOO_LARGE, f"{nbytes} bytes exceed max_message_bytes "
                                             f"{self.config.max_message_bytes}")
            if problem is None:
                return None
            self._count_rejection(problem[0])
            return SubmitResult(False, problem[0], problem[1], self.version)

    def _validate_tree(self, grad: Any) -> tuple[list[np.ndarray] | None, Reason, str]:
        if jax.tree_util.tree_structure(grad) != self._treedef:
            got = jax.tree_util.tree_structure(grad)
            return None, Reason.WRONG_TREE, f"tree {got} differs from θ's {self._treedef}"
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(grad)]
        paths = None
        nbytes = 0
        for i, (x, shape, dtype) in enumerate(zip(leaves, self._shapes, self._dtypes,
                                                  strict=True)):
            if x.shape != shape or x.dtype != dtype:
                paths = paths or [jax.tree_util.keystr(p)
                                  for p, _ in jax.tree_util.tree_flatten_with_path(grad)[0]]
                if x.shape != shape:
                    return None, Reason.WRONG_SHAPE, (f"{paths[i]}: shape {list(x.shape)}, "
                                                      f"expected {list(shape)}")
                return None, Reason.WRONG_DTYPE, f"{paths[i]}: dtype {x.dtype}, expected {dtype}"
            nbytes += x.nbytes
        if nbytes > self.config.max_message_bytes:
            return None, Reason.TOO_LARGE, (f"{nbytes} bytes exceed max_message_bytes "
                                            f"{self.config.max_message_bytes}")
        for i, x in enumerate(leaves):
            # a float64 sum of float32 values cannot overflow, so it is finite iff all values are
            if not np.isfinite(np.add.reduce(x.reshape(-1), dtype=np.float64)):
                bad = int(np.count_nonzero(~np.isfinite(x)))
                path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(grad)[0][i][0])
                return None, Reason.NAN_OR_INF, f"{path}: {bad} non-finite values"
        return leaves, Reason.OK, ""

    def submit(self, grad_tree: Any, header: GradientHeader) -> SubmitResult:
        """Validate ``grad_tree`` and buffer it, or say why not; thread-safe.

        The gradient's arrays are kept (not copied) until applied: do not modify them afterwards.
        """
        leaves, reason, detail = self._validate_tree(grad_tree)
        if leaves is None:
            return self.reject(reason, detail)
        grad = jax.tree_util.tree_unflatten(self._treedef, leaves)
        deadline = time.monotonic() + self.block_timeout_s
        with self._changed:
            while True:
                problem = self._header_problem(header)
                if problem is not None:
                    self._count_rejection(problem[0])
                    return SubmitResult(False, problem[0], problem[1], self.version)
                if len(self._buffer) < self.config.buffer_size:
                    break
                if self.config.backpressure == "drop_oldest":
                    self._buffer.popleft()
                    self.counters["dropped_oldest"] += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._count_rejection(Reason.BUFFER_FULL)
                    return SubmitResult(False, Reason.BUFFER_FULL,
                                        f"buffer full ({self.config.buffer_size}) for "
                                        f"{self.block_timeout_s} s", self.version)
                self._changed.wait(remaining)
            self._buffer.append(_Pending(grad, header))
            self._seen.setdefault(header.worker_id, _SeqWindow()).add(header.seq)
            self.counters["accepted"] += 1
            self._arrivals.append(time.monotonic())
            self._changed.notify_all()
            return SubmitResult(True, Reason.OK, "", self.version)

    # --- reading ---------------------------------------------------------------------------------

    def snapshot(self) -> tuple[int, int, Any]:
        """``(version, gen_id, θ)``, consistent with each other (named within
        :attr:`incarnation`)."""
        with self._lock:
            return self.version, self.gen_id, self.theta

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Block until the version is at least ``version``; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.version >= version, timeout)

    def _rate(self) -> float:
        now = time.monotonic()
        recent = [t for t in self._arrivals if now - t <= 30.0]
        if not recent:
            return 0.0
        span = max(now - recent[0], 1e-3)
        return len(recent) / span

    def status(self) -> dict[str, Any]:
        """The learner's current figures (version, counts, buffer depth, latest update metrics)."""
        with self._lock:
            return {
                "run_id": self.run_id,
                "incarnation": self.incarnation,
                "version": self.version,
                "gen_id": self.gen_id,
                "updates": self.updates,
                "buffer_depth": len(self._buffer),
                **self.counters,
                "rejected_by_reason": dict(self.rejected_by_reason),
                "unique_workers": len(self._seen),
                "worker_last_seq": {w: s.high for w, s in self._seen.items()},
                "gradients_per_second": self._rate(),
                "staleness_mean": self.last_metrics["staleness_mean"],
                "staleness_max": self.last_metrics["staleness_max"],
                "last_meta_loss": self.last_metrics["meta_loss"],
                "last_error": self.last_error,
                "fatal_error": self.fatal_error,
            }

    def _log_metrics(self) -> None:
        if not self._tensorboard:
            return
        try:
            if self._writer is None:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(str(self.local_dir / "tensorboard"), flush_secs=10)
            s = self.status()
            step = s["version"]
            for key in ("staleness_mean", "staleness_max", "buffer_depth", "accepted", "applied",
                        "dropped_stale", "dropped_oldest", "rejected", "duplicate",
                        "unique_workers", "gradients_per_second", "last_meta_loss",
                        "failed_updates", "skipped_nonfinite", "dropped_at_stop"):
                if math.isfinite(s[key]):
                    self._writer.add_scalar(f"learner/{key}", s[key], step)
        except Exception:  # metrics must never stop training
            log.exception("could not write TensorBoard metrics; turning them off")
            self._tensorboard = False

    # --- population exploit ----------------------------------------------------------------

    def new_generation(self, theta: Any, opt_state: Any = None) -> int:
        """Replace θ (e.g. a PBT exploit): gen_id and version advance, the buffer is dropped.

        ``opt_state`` defaults to a fresh ``meta_optimizer.init(theta)``. Returns the new gen_id.
        """
        theta = jax.tree_util.tree_map(jnp.asarray, theta)
        leaves, reason, detail = self._validate_tree(theta)
        if leaves is None:
            raise ValueError(f"new θ does not match the current one: {reason.name}: {detail}")
        opt_state = self.meta_optimizer.init(theta) if opt_state is None else \
            jax.tree_util.tree_map(jnp.asarray, opt_state)
        with self._apply_lock, self._changed:
            self.counters["dropped_stale"] += len(self._buffer)
            self._buffer.clear()
            self._append_log({"event": "generation", "gen_id": self.gen_id + 1},
                             self.version + 1)
            self.theta, self.opt_state = theta, opt_state
            self.gen_id += 1
            self.version += 1
            self._changed.notify_all()
            return self.gen_id

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> tuple[Path, Path]:
        """Write a full and a params checkpoint of the current state; ``(full, params)`` paths.

        Then calls ``on_params_checkpoint(params_path, version)`` (errors there are logged), once
        per version: rewriting the checkpoints of a version already saved (e.g. on SIGTERM right
        after a periodic checkpoint) does not call it again.
        """
        with self._ckpt_lock:
            with self._lock:
                theta, opt_state = self.theta, self.opt_state
                version, gen_id = self.version, self.gen_id
                meta = CheckpointMeta(**{
                    **self.extra_metadata, "kind": "full", "run_id": self.run_id,
                    "version": version, "gen_id": gen_id, "updates": self.updates,
                    "counters": dict(self.counters),
                    "rejected_by_reason": dict(self.rejected_by_reason),
                    "dedup": {w: s.to_json() for w, s in self._seen.items()},
                    "service": self.config.model_dump(mode="json")})
            full = checkpoint_path(self.run_dir, "full", version)
            set_aside(full, self.skipped_checkpoints)
            full = save_checkpoint(full, {"theta": theta, "opt_state": opt_state}, meta)
            params_path = checkpoint_path(self.run_dir, "params", version)
            new_version = not params_path.exists()
            params = save_checkpoint(params_path, theta, meta.for_params())
        if self.on_params_checkpoint is not None and new_version:
            try:
                self.on_params_checkpoint(params, version)
            except Exception:
                log.exception("on_params_checkpoint(%s, %d) failed", params, version)
        return full, params
