"""Chaos soak: the real service under random SIGKILLs, with the books checked at the end.

A run of the service (local Ray, embedded Redis, the gRPC learner on loopback, two unroll workers
and one eval worker, on tiny quadratics) trains for ``--minutes`` while a chaos thread SIGKILLs,
at random moments (exponential gaps of mean ``--mean-gap-s``), one of: an unroll worker, an eval
worker, the learner, or the embedded Redis server (each kind once per cycle, in a random order).
Ray restarts actors and the driver's supervisor restarts Redis; a kind is not killed again before
it is back, but faults of different kinds overlap. The last ``--quiet-s`` seconds have no kills,
so the run can wind down. Then the books are checked:

- **kills survived** per kind: the victim came back (a new process, or Redis answering again)
  and the learner made meta-updates after it;
- **updates made**, and the θ versions: strictly increasing in the learner's ``applied.jsonl``
  across every incarnation, and never going down in the driver's status polls (what users see);
- **gradients applied twice**: a ``(worker, seq)`` named by two applied updates of
  ``applied.jsonl``; **must be 0**;
- **gradients lost**: acknowledged as accepted (the workers' ``OK`` records in the run's metrics
  stream) but in no applied update, split by the learner incarnation that accepted them;
- processes and RSS of the driver's process tree once the run is going (``before``), at the end
  of training (``after``), and what is left once the run has shut down (``left``: must be none).

**What the policy allows** (``learner/core.py``): an ``OK`` ack means *taken into the buffer*, not
applied. An accepted gradient is applied exactly once, or dropped: as *stale* when the learner
has moved more than ``max_staleness`` versions past the θ it was computed on by the time its batch
is taken (counted in ``dropped_stale``); by a SIGKILLed learner, which loses its buffer (at most
``buffer_size``) and the batch it was applying (at most ``batch_size``), so up to ``buffer_size +
batch_size`` per learner kill; or by the final learner at its stop (``dropped_at_stop``,
``dropped_oldest``, the batches of failed or skipped updates: what its counters show). A lost
gradient is classed stale when the learner that took it published a version more than
``max_staleness`` past its θ; the rest must fit the bounds above, and anything beyond them is
``lost_beyond_policy`` and fails the soak. A learner kill also rolls θ back to its newest full
checkpoint (``checkpoint_every`` updates): the updates after it were applied once, to a θ that
is then discarded (``rolled_back``), and their versions are never reused. Not counted: a
gradient whose worker was killed between the ack and writing its record (``applied_unrecorded``
if it was applied).

Bounded in time: the soak runs in a child process (its own session) that the parent kills, with
every process it started, ``--grace-minutes`` (start-up and wind-down) after the training time,
reporting ``hung``.
Loopback only: Redis on a unix socket, gRPC on 127.0.0.1. Prints a table and writes JSON
(``benchmarks/results/chaos.json``); exits 1 if any check fails.

    nice -n 10 python benchmarks/chaos.py --minutes 30 [--mean-gap-s 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("chaos")

#: victim kinds, and the Ray actor class whose processes are each kind's (``ray::CLASS…``)
ACTOR_CLASSES = {"unroll": "UnrollWorker", "eval": "EvalWorker", "learner": "LearnerProcess"}
KINDS = (*ACTOR_CLASSES, "redis")
#: seconds a victim has to come back (a restarted actor imports JAX and compiles)
RECOVER_S = 180.0
#: seconds the actors may take to start before the run trains --minutes without chaos
STARTUP_S = 300.0


def soak_config(run_dir: str, minutes: float) -> dict[str, Any]:
    """A small quadratic run through the service, ending on its time budget."""
    return {
        "run_name": f"chaos-{uuid.uuid4().hex[:6]}",
        "run_dir": run_dir,
        "meta_steps": 10**9,
        "time_budget_s": minutes * 60.0 + STARTUP_S,  # from the first kill on: --minutes
        "checkpoint_every": 20,
        "task": {"name": "quadratic"},
        "optimizer": {"name": "lstm", "kwargs": {"layers": [8]}},
        # truncations long enough that 30 minutes stay within the workers' metrics stream
        "estimator": {"num_tasks": 8, "unroll_length": 10, "num_steps": 100},
        "eval": {"steps": 20, "seeds": 2, "adam_learning_rates": [0.01, 0.1]},
        "service": {"num_unroll_workers": 2, "num_eval_workers": 1, "worker_num_cpus": 0.5,
                    "batch_size": 2, "max_staleness": 4, "buffer_size": 16,
                    "eval_idle_ms": 3000},
    }


# ------------------------------------------------------------------------------------------------
# Processes


def process_tree() -> list[Any]:
    """This process's descendants that are still running (zombies left out)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _role(proc: Any) -> str | None:
    """The victim kind of a Ray worker process (``ray::UnrollWorker.run`` → ``unroll``)."""
    import psutil

    try:
        title = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    for kind, cls in ACTOR_CLASSES.items():
        if title.startswith(f"ray::{cls}"):
            return kind
    return None


def victims(kind: str) -> list[int]:
    """PIDs of the processes of ``kind`` now running."""
    if kind == "redis":
        from services import redis_server

        srv = redis_server._EMBEDDED
        return [srv.proc.pid] if srv is not None and srv.alive() else []
    return [p.pid for p in process_tree() if _role(p) == kind]


def snapshot() -> dict[str, Any]:
    """Processes and resident memory of the driver and its process tree."""
    import psutil

    roles: Counter[str] = Counter()
    rss = psutil.Process().memory_info().rss
    tree = process_tree()
    for p in tree:
        try:
            rss += p.memory_info().rss
        except psutil.Error:
            continue
        roles[_role(p) or "other"] += 1
    return {"processes": len(tree), "by_role": dict(roles), "rss_mb": round(rss / 2**20, 1)}


# ------------------------------------------------------------------------------------------------
# Chaos


class Chaos(threading.Thread):
    """Kills a random victim after each random gap until :meth:`finish` (or the no-kill tail);
    each kill is watched for its recovery by a thread of its own, and a kind still recovering is
    not killed again (others may be: faults overlap)."""

    def __init__(self, run: Any, rng: random.Random, mean_gap_s: float, kill_until: float
                 ) -> None:
        super().__init__(name="chaos", daemon=True)
        self.run_, self.rng, self.mean_gap_s, self.kill_until = run, rng, mean_gap_s, kill_until
        self.kills: list[dict[str, Any]] = []
        self._done = threading.Event()
        self._watchers: dict[str, threading.Thread] = {}  # kind -> its last kill's watcher

    def updates(self) -> int:
        """The learner's meta-updates as the driver last polled them."""
        return int(self.run_.status.get("updates", 0))

    def finish(self, timeout_s: float = RECOVER_S + 10) -> None:
        """Stop killing and wait for the recoveries under way."""
        self._done.set()
        self.join(timeout_s)
        for w in self._watchers.values():
            w.join(timeout_s)

    def run(self) -> None:
        order: list[str] = []  # every kind once per cycle, in a random order
        while not self._done.wait(self.rng.expovariate(1.0 / self.mean_gap_s)):
            if time.monotonic() >= self.kill_until:
                return
            order = order or self.rng.sample(KINDS, len(KINDS))
            kind = order.pop()
            watcher = self._watchers.get(kind)
            pids = victims(kind)
            if pids and not (watcher and watcher.is_alive()):
                self._kill(kind, self.rng.choice(pids))

    def _kill(self, kind: str, pid: int) -> None:
        """SIGKILL ``pid`` and watch ``kind`` recover and the learner move on."""
        from services import redis_server

        restarts = redis_server._EMBEDDED.restarts if kind == "redis" else 0
        count = len(victims(kind))
        record: dict[str, Any] = {"kind": kind, "pid": pid, "at_update": self.updates(),
                                  "survived": None}
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills.append(record)
        log.info("killed %s (pid %d) at update %d", kind, pid, record["at_update"])

        def recovered() -> bool:
            if kind == "redis":
                return redis_server._EMBEDDED.restarts > restarts
            return len([p for p in victims(kind) if p != pid]) >= count

        def watch() -> None:
            t0, back, moved = time.monotonic(), None, None
            while time.monotonic() - t0 < RECOVER_S and not (back and moved):
                time.sleep(0.5)
                if back is None and recovered():
                    back = time.monotonic() - t0
                if moved is None and self.updates() > record["at_update"]:
                    moved = time.monotonic() - t0
            record.update(recovered_s=_round(back), updates_resumed_s=_round(moved),
                          survived=back is not None and moved is not None)

        self._watchers[kind] = threading.Thread(target=watch, name=f"watch-{kind}", daemon=True)
        self._watchers[kind].start()


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# ------------------------------------------------------------------------------------------------
# The books


class AckReader(threading.Thread):
    """Copies the workers' truncation records out of the run's metrics stream every few
    seconds, so that the stream's own cap (it keeps the newest ``UnrollWorker.metrics_maxlen``)
    never costs the books an ack; ``complete`` turns false if so many records came between two
    reads that the cap may have trimmed some unread."""

    def __init__(self, run: Any, period_s: float = 5.0) -> None:
        super().__init__(name="acks", daemon=True)
        self.run_, self.period_s = run, period_s
        self.records: list[dict[str, Any]] = []
        self.complete = True
        self._last: str | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.period_s):
            try:
                self.read()
            except Exception as e:  # noqa: BLE001 - Redis away: read it next time
                log.info("metrics not read: %s", e)

    def finish(self) -> None:
        """Stop the thread and read what is left."""
        self._done.set()
        self.join(60.0)
        self.read()

    def read(self) -> None:
        """Append the records written since the last read."""
        import inspect

        from workers.unroll import UnrollWorker

        cap = inspect.signature(UnrollWorker).parameters["metrics_maxlen"].default
        r, key = self.run_.redis, self.run_.registry.key("metrics")
        before = len(self.records)
        try:
            self._read_new(r, key)
        finally:
            if len(self.records) - before >= 0.9 * cap:
                self.complete = False

    def _read_new(self, r: Any, key: str) -> None:
        while True:
            batch = r.xrange(key, min="-" if self._last is None else f"({self._last}",
                             count=10_000)
            if not batch:
                return
            for _id, f in batch:
                self.records.append({"worker": f.get("worker"), "seq": int(f["seq"]),
                                     "version": int(f["version"]), "reason": f.get("reason"),
                                     "incarnation": int(f.get("incarnation", 0))})
            self._last = batch[-1][0]



def books(run_dir: Path, records: list[dict[str, Any]], final: dict[str, Any],
          service: dict[str, Any]) -> dict[str, Any]:
    """Gradients applied twice, lost and rolled back, and the versions of ``applied.jsonl``,
    from the learner's log, the workers' records and the final learner's ``final`` status.

    A lost gradient (acknowledged, never applied) is *stale* when the learner that took it
    published a version more than ``max_staleness`` past the θ it was computed on (it was, or
    would have been, dropped as stale); else it sat in the buffer of a killed learner (at most
    ``buffer_size + batch_size`` per learner) or of the final one (within its counted drops).
    """
    from learner.core import read_applied_log

    entries = read_applied_log(run_dir)
    counts = Counter(tuple(k) for e in entries for k in e.get("applied", []))
    versions = [int(e["version"]) for e in entries]
    newest: dict[int, int] = {}  # incarnation -> the newest version it published
    for e in entries:
        newest[e["incarnation"]] = max(newest.get(e["incarnation"], -1), int(e["version"]))
    accepted = {(r["worker"], int(r["seq"])): r for r in records if r.get("reason") == "OK"}
    final_inc = final.get("incarnation")
    stale = 0
    buffered: Counter[Any] = Counter()  # incarnation -> lost from its buffer
    for key, r in accepted.items():
        if key in counts:
            continue
        inc = r.get("incarnation")
        if newest.get(inc, -1) - int(r["version"]) > int(service["max_staleness"]):
            stale += 1
        else:
            buffered[inc] += 1
    batch = int(service["batch_size"])
    per_kill = int(service["buffer_size"]) + batch
    at_stop = buffered.pop(final_inc, 0)
    counted = sum(int(final.get(k) or 0) for k in ("dropped_oldest", "dropped_at_stop")) \
        + batch * sum(int(final.get(k) or 0) for k in ("failed_updates", "skipped_nonfinite"))
    beyond = sum(max(0, n - per_kill) for n in buffered.values()) + max(0, at_stop - counted)
    return {
        "updates_logged": sum(1 for e in entries if "applied" in e),
        "incarnations": len(newest),
        "versions_monotone_log": all(b > a for a, b in zip(versions, versions[1:])),
        "gradients_applied": len(counts),
        "gradients_applied_twice": sum(1 for n in counts.values() if n > 1),
        "gradients_accepted": len(accepted),
        "gradients_lost": stale + sum(buffered.values()) + at_stop,
        "lost_stale": stale,
        "lost_in_killed_learners": sum(buffered.values()),
        "lost_at_stop": at_stop,
        "loss_allowed_per_learner_kill": per_kill,
        "lost_beyond_policy": beyond,
        "rolled_back": rolled_back(entries),
        "applied_unrecorded": sum(1 for k in counts if k not in accepted),
    }


def rolled_back(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Updates (and their gradients) of ``applied.jsonl`` that a learner crash discarded: those
    above the checkpoint version a later incarnation resumed from (its ``renumbered`` line)."""
    updates = grads = 0
    seen: list[dict[str, Any]] = []
    for e in entries:
        if e.get("event") == "renumbered":
            gone = [s for s in seen if int(s["version"]) > int(e["from_version"])]
            updates += len(gone)
            grads += sum(len(s["applied"]) for s in gone)
            seen = []
        elif "applied" in e:
            seen.append(e)
    return {"updates": updates, "gradients": grads}


# ------------------------------------------------------------------------------------------------
# The soak (child process)


def _wait(cond: Any, timeout_s: float, period_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(period_s)
    return False


def _all_present() -> bool:
    return all(victims(k) for k in KINDS)


class PidRecorder(threading.Thread):
    """Writes this process's tree (pid, start time) to ``path`` every few seconds, for the parent
    to kill if the soak hangs."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="pids", daemon=True)
        self.path = path

    def run(self) -> None:
        while True:
            rows = []
            for p in process_tree():
                try:
                    rows.append([p.pid, p.create_time()])
                except Exception:  # noqa: BLE001 - gone meanwhile
                    continue
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows))
            tmp.replace(self.path)
            time.sleep(2.0)


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the service under chaos; the figures (also written to ``work/soak.json``)."""
    from l2o.io.config import config_from_dict
    from services.train import ServiceRun

    rng = random.Random(args.seed)
    cfg = config_from_dict(soak_config(str(work / "runs"), args.minutes))
    PidRecorder(work / "pids.json").start()
    out: dict[str, Any] = {"run_id": None, "error": None}
    seen: list[int] = []
    run = ServiceRun(cfg)
    acks = AckReader(run)
    out["run_id"] = run.run_id
    chaos = None
    try:
        run.start()
        acks.start()
        t_train = time.monotonic()

        def progress(st: dict[str, Any]) -> None:
            seen.append(int(st["version"]))
            if chaos is None and int(st["updates"]) >= 3 and _all_present():
                start_chaos()

        def start_chaos() -> None:
            nonlocal chaos
            out["before"] = snapshot()
            now = time.monotonic()
            # the run trains --minutes from here (its loop reads the budget at every poll),
            # however long its actors took to start
            run.cfg.time_budget_s = now - t_train + args.minutes * 60.0
            chaos = Chaos(run, rng, args.mean_gap_s, now + args.minutes * 60.0 - args.quiet_s)
            chaos.start()

        run.loop(progress, poll_s=0.25)
        if chaos is not None:
            chaos.finish()
        _wait(_all_present, 60.0)
        out["after"] = snapshot()
        run.stop(eval_drain_timeout_s=30.0)
    except BaseException as e:  # noqa: BLE001 - reported, the books are still read
        out["error"] = f"{type(e).__name__}: {e}"
        run.mark_failed(e)
    final = dict(run.status)
    try:
        acks.finish()
        out["checkpoints"] = len(run.registry.checkpoints())
        out["checkpoints_scored"] = len(run.registry.eval_results())
        out["eval_dead_letters"] = len(run.registry.dead_letters())
        out["state"] = run.registry.state()
    except Exception as e:  # noqa: BLE001
        out["error"] = out["error"] or f"reading the registry: {type(e).__name__}: {e}"
    run.close()
    _wait(lambda: not process_tree(), 30.0)
    out["left"] = snapshot()
    kills = chaos.kills if chaos is not None else []
    out.update({
        "updates": int(final.get("updates", 0)),
        "version": int(final.get("version", 0)),
        "kills": kills,
        "versions_monotone_seen": all(b >= a for a, b in zip(seen, seen[1:])),
        "books": {**books(run.run_dir, acks.records, final, cfg.service.model_dump()),
                  "acks_complete": acks.complete},
        "final_status": {k: final.get(k) for k in (
            "incarnation", "accepted", "applied", "dropped_stale", "dropped_oldest",
            "dropped_at_stop", "rejected", "duplicate", "failed_updates", "skipped_nonfinite",
            "last_error")},
        "run_dir": str(run.run_dir),
    })
    return out


# ------------------------------------------------------------------------------------------------
# The parent: a hard deadline, the report


def kill_tree(pid_file: Path) -> int:
    """SIGKILL every process recorded in ``pid_file`` that is still the same process."""
    import psutil

    try:
        rows = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return 0
    killed = 0
    for pid, created in rows:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:
                p.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


def run_child(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the soak in a child process of its own session; kill it all past the deadline."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / "jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(work),
           "--minutes", str(args.minutes), "--mean-gap-s", str(args.mean_gap_s),
           "--quiet-s", str(args.quiet_s), "--seed", str(args.seed)]
    limit = (args.minutes + args.grace_minutes) * 60.0
    with open(work / "soak.log", "w") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = proc.returncode
    killed = kill_tree(work / "pids.json")
    try:
        result = json.loads((work / "soak.json").read_text())
    except (OSError, ValueError):
        result = {"error": f"the soak wrote no result (exit {rc}); see {work / 'soak.log'}"}
    # after a hang: everything it started; after a normal end: whatever outlived it (none)
    result.update({"hung": hung, "exit_code": rc, "processes_killed_after": killed,
                   "log": str(work / "soak.log")})
    return result


def verdict(r: dict[str, Any]) -> dict[str, bool]:
    """Each check of the soak and whether it passed."""
    b = r.get("books", {})
    kills = r.get("kills", [])
    return {
        "finished (no hang, no error)": not r.get("hung") and not r.get("error"),
        "every ack on record": bool(b.get("acks_complete")),
        "every kill survived": all(k.get("survived") is True for k in kills),
        "0 gradients applied twice": b.get("gradients_applied_twice", 1) == 0,
        "0 lost beyond the policy": b.get("lost_beyond_policy", 1) == 0,
        "versions monotone": bool(b.get("versions_monotone_log"))
        and bool(r.get("versions_monotone_seen")),
        "no process left": r.get("left", {}).get("processes", 1) == 0
        and not r.get("processes_killed_after"),
    }


def report(r: dict[str, Any]) -> str:
    """The table printed at the end."""
    b = r.get("books", {})
    per_kind = {k: {"kills": 0, "survived": 0} for k in KINDS}
    for k in r.get("kills", []):
        per_kind[k["kind"]]["kills"] += 1
        per_kind[k["kind"]]["survived"] += bool(k.get("survived"))
    lines = [f"chaos soak of {r['minutes']} min: {r.get('updates', 0)} meta-updates, final "
             f"version {r.get('version')}, {b.get('incarnations', '?')} learner incarnation(s)"]
    lines += [f"  kills {k:8s} {v['survived']}/{v['kills']} survived" for k, v in per_kind.items()]
    lines.append(f"  gradients: {b.get('gradients_accepted')} accepted, "
                 f"{b.get('gradients_applied')} applied, {b.get('gradients_applied_twice')} "
                 f"applied twice, {b.get('gradients_lost')} lost ({b.get('lost_stale')} stale, "
                 f"{b.get('lost_in_killed_learners')} in killed learners, "
                 f"{b.get('lost_at_stop')} at the stop; {b.get('lost_beyond_policy')} beyond "
                 f"the policy), rolled back {b.get('rolled_back')}")
    lines.append(f"  versions monotone: log {b.get('versions_monotone_log')}, "
                 f"seen by the driver {r.get('versions_monotone_seen')}")
    for when in ("before", "after", "left"):
        s = r.get(when, {})
        lines.append(f"  processes {when:6s} {s.get('processes')} ({s.get('by_role')}), "
                     f"RSS {s.get('rss_mb')} MB")
    if r.get("error"):
        lines.append(f"  error: {r['error']}")
    lines += [f"  [{'ok' if ok else 'FAIL'}] {name}" for name, ok in r["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the soak (bounded in time), print the table, write the JSON; 1 if a check failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="training time under chaos")
    p.add_argument("--mean-gap-s", type=float, default=20.0, help="mean seconds between kills")
    p.add_argument("--quiet-s", type=float, default=20.0, help="no kills in the last seconds")
    p.add_argument("--grace-minutes", type=float, default=12.0,
                   help="start-up and wind-down allowed beyond --minutes before a hard kill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/chaos.json")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("minutes", "mean_gap_s", "grace_minutes"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.child is not None:  # the soak itself
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        result = soak(args, args.child)
        (args.child / "soak.json").write_text(json.dumps(result, indent=2, default=str))
        return 0
    work = Path(tempfile.mkdtemp(prefix="l2o-chaos-"))
    t0 = time.monotonic()
    result = {"benchmark": "chaos", "minutes": args.minutes, "mean_gap_s": args.mean_gap_s,
              "seed": args.seed, **run_child(args, work),
              "wall_seconds": None, "config": soak_config("", args.minutes)["service"],
              "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    result["checks"] = verdict(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(report(result))
    print(f"-> {args.out}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
