"""The distributed service end to end: real local Ray, real gRPC on loopback, real Redis.

Every test here is **slow** (marked ``slow``; ~2-3 min together on 2 CPU cores): each starts
actors that import JAX and compile the estimator. A persistent JAX compilation cache shared by
the driver and all actors (one per session) means the estimator compiles once for the module.
Skip them with ``pytest -m "not slow"``; the Redis parts alone are in ``test_registry.py``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from l2o.io.config import config_from_dict  # noqa: E402
from services.redis_server import EmbeddedRedis, redis_connection  # noqa: E402
from services.registry import (  # noqa: E402
    GROUP,
    Registry,
    leaderboard,
    list_runs,
    read_run_id,
    run_status,
)

pytestmark = pytest.mark.slow


#: the password of the module's Redis: runs must keep it out of what they hand to Ray
REDIS_PASSWORD = f"pw-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def redis_url():
    """A real Redis server for the module (embedded, on a unix socket, with a password)."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    srv = EmbeddedRedis()
    srv.client().config_set("requirepass", REDIS_PASSWORD)
    yield f"unix://:{REDIS_PASSWORD}@{srv.socket}"
    srv.stop()


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    """A local Ray instance with 2 CPUs and its state API (its actors share the suite's
    compilation cache)."""
    started = not ray.is_initialized()
    if started:
        # the dashboard serves Ray's state API (read by test_secrets_are_not_in_rays_state)
        ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


def small_config(tmp_path: Path, **service) -> dict:
    """A tiny quadratic run: seconds per run once compiled."""
    return {
        "run_name": f"t-{uuid.uuid4().hex[:8]}",
        "run_dir": str(tmp_path / "runs"),
        "seed": 0,
        "meta_steps": 30,
        "log_every": 5,
        "checkpoint_every": 10,
        "task": {"name": "quadratic"},
        "optimizer": {"name": "lstm", "kwargs": {"layers": [8]}},
        "estimator": {"num_tasks": 4, "unroll_length": 5, "num_steps": 20},
        "meta_optimizer": {"learning_rate": 0.003},
        "eval": {"steps": 20, "seeds": 2, "adam_learning_rates": [0.01, 0.1]},
        "service": {"num_unroll_workers": 2, "num_eval_workers": 1, "worker_num_cpus": 0.5,
                    "eval_idle_ms": 3000, **service},
    }


def run_id_of(cfg) -> str:
    """The run id a service run of ``cfg`` took (stored in its run directory)."""
    run_id = read_run_id(cfg.run_path())
    assert run_id is not None and run_id.startswith(cfg.run_name + "-")
    return run_id


def ok_records(client, reg: Registry) -> list[tuple[str, int]]:
    """(worker, seq) of every gradient the workers saw accepted."""
    from services.train import read_metrics

    return [(r["worker"], r["seq"]) for r in read_metrics(client, reg) if r["reason"] == "OK"]


def test_end_to_end_with_a_worker_killed(tmp_path, redis_url):
    """2 unroll workers + 1 eval worker; unroll-0 is killed mid-run and restarted by Ray."""
    from services.train import actor_name, run_service

    data = small_config(tmp_path)
    data.update(meta_steps=80, checkpoint_every=20)
    cfg = config_from_dict(data)
    killed: dict[str, int] = {}

    def progress(st):
        # kill unroll-0 once it has contributed, well before the end
        if not killed and st["updates"] >= 5 and st["worker_last_seq"].get("unroll-0", -1) >= 1:
            ray.kill(ray.get_actor(actor_name(run_id_of(cfg), "unroll-0")), no_restart=False)
            killed["at"] = st["updates"]

    # fine polling: the kill must land mid-run however fast the machine is
    summary = run_service(cfg, redis_url=redis_url, progress=progress, poll_s=0.02)
    client, _ = redis_connection(redis_url)
    reg = Registry(client, run_id_of(cfg))
    assert summary["run_id"] == reg.run_id

    assert killed and killed["at"] < cfg.meta_steps, "the worker was not killed mid-run"
    assert summary["updates"] >= cfg.meta_steps
    for key in ("meta_loss_first", "meta_loss_last", "eval", "updates", "gradients_accepted",
                "gradients_dropped_stale", "gradients_rejected", "workers", "wall_seconds"):
        assert key in summary
    assert summary["workers"] == 2 and summary["gradients_rejected"] == 0
    assert np.isfinite(summary["meta_loss_first"]) and np.isfinite(summary["meta_loss_last"])
    on_disk = json.loads((cfg.run_path() / "summary.json").read_text())
    assert on_disk["updates"] == summary["updates"]
    assert set(on_disk["eval"]) >= {"task", "steps", "learned_final_loss", "adam_final_loss",
                                    "adam_best_lr", "speedup"}

    # the killed worker came back by itself and no (worker, seq) was applied twice
    assert int(client.hget(reg.key("workers", "unroll-0"), "starts")) >= 2
    pairs = ok_records(client, reg)
    assert len(pairs) == len(set(pairs))
    assert summary["gradients_accepted"] >= len(pairs)
    assert {w for w, _ in pairs} == {"unroll-0", "unroll-1"}

    # checkpoints were indexed, scored, and ranked
    scored = reg.eval_results()
    assert {20, 40, 60, 80} <= set(scored)
    assert set(reg.checkpoints()) >= {20, 40, 60, 80}
    for v in (20, 40, 60, 80):
        assert scored[v]["learned_final_loss"] is not None
        assert scored[v]["adam_final_loss"] is not None
    assert sum(bool(r["adam_cached"]) for r in scored.values()) >= len(scored) - 1
    board = reg.leaderboard(top=100)
    assert {r["version"] for r in board} == set(scored)
    assert [r["score"] for r in board] == sorted(r["score"] for r in board)
    assert any(r["run_id"] == reg.run_id for r in leaderboard(client, top=1000))
    st = run_status(client, reg.run_id)
    assert st["state"] == "done" and st["dead_letters"] == 0 and st["evals"] == len(scored)
    assert reg.evals_outstanding() == 0


def test_one_worker_zero_staleness_matches_single_machine(tmp_path, redis_url):
    """θ after k distributed updates equals the single-machine trainer's θ after k steps."""
    import jax

    from l2o.io.checkpoints import checkpoint_path, load_checkpoint
    from l2o.training.build import learned_optimizer_from_config, theta_key
    from l2o.training.trainer import Trainer
    from services.train import run_service

    k = 6
    data = small_config(tmp_path, num_unroll_workers=1, num_eval_workers=0, max_staleness=0,
                        batch_size=1)
    data.update(meta_steps=k, checkpoint_every=3)
    cfg = config_from_dict(data)
    summary = run_service(cfg, redis_url=redis_url, final_eval=False)
    assert summary["gradients_dropped_stale"] == 0

    template = learned_optimizer_from_config(cfg.optimizer).init(theta_key(cfg.seed))
    distributed, meta = load_checkpoint(checkpoint_path(cfg.run_path(), "params", k), template)
    assert meta["version"] == k

    local_cfg = config_from_dict({**data, "run_dir": str(tmp_path / "local")})
    trainer = Trainer(local_cfg)
    trainer.train(num_steps=k)
    assert trainer.step == k
    got = jax.tree_util.tree_leaves(distributed)
    want = jax.tree_util.tree_leaves(trainer.state.theta)
    init = jax.tree_util.tree_leaves(template)
    assert any(not np.allclose(a, b) for a, b in zip(want, init, strict=True))  # θ moved
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_learner_killed_and_restarted(tmp_path, redis_url):
    """The learner dies mid-run: Ray restarts it from its checkpoint; workers reconnect alone."""
    from services.train import actor_name, run_service

    data = small_config(tmp_path, num_eval_workers=0)
    data.update(meta_steps=60, checkpoint_every=5)
    cfg = config_from_dict(data)
    seen: list[tuple[bool, int]] = []
    killed: dict[str, int] = {}

    def progress(st):
        seen.append((bool(killed), int(st["version"])))
        if not killed and st["updates"] >= 12:
            killed["version"] = int(st["version"])
            ray.kill(ray.get_actor(actor_name(run_id_of(cfg), "learner")), no_restart=False)

    summary = run_service(cfg, redis_url=redis_url, progress=progress, final_eval=False,
                          poll_s=0.02)
    client, _ = redis_connection(redis_url)
    reg = Registry(client, run_id_of(cfg))
    assert killed and killed["version"] < cfg.meta_steps
    assert summary["updates"] >= cfg.meta_steps
    after = [v for k, v in seen if k]
    last_ckpt = (killed["version"] // 5) * 5
    assert after and min(after) >= last_ckpt  # resumed from its checkpoint, not from scratch
    resumed = after[after.index(min(after)):]  # (a poll may catch the old learner dying)
    assert resumed == sorted(resumed)  # and kept increasing from there
    assert max(after) >= cfg.meta_steps
    # the workers were never restarted: they reconnected by themselves
    for i in range(2):
        assert int(client.hget(reg.key("workers", f"unroll-{i}"), "starts")) == 1
    assert sum(s.get("reconnects", 0) + s.get("stale", 0)
               for s in summary["worker_stats"]) >= 1
    pairs = ok_records(client, reg)
    assert len(pairs) == len(set(pairs))


def _params_checkpoint(tmp_path: Path, cfg) -> Path:
    from l2o.io.checkpoints import save_checkpoint
    from l2o.training.build import learned_optimizer_from_config, theta_key

    theta = learned_optimizer_from_config(cfg.optimizer).init(theta_key(cfg.seed))
    return save_checkpoint(tmp_path / "params_00000005.ckpt", theta, {
        "kind": "params", "version": 5, "gen_id": 0,
        "optimizer": cfg.optimizer.model_dump(mode="json"), "seed": cfg.seed})


def test_eval_worker_killed_holding_a_job_and_dead_letters(tmp_path, redis_url):
    """A killed eval worker's job is reclaimed and finished by another; a bad job dead-letters."""
    from workers.eval_worker import create_eval_worker

    cfg = config_from_dict(small_config(tmp_path))
    client, _ = redis_connection(redis_url)
    reg = Registry(client, cfg.run_name, eval_idle_ms=1500, eval_max_deliveries=3)
    reg.write_manifest(cfg.model_dump(mode="json"))
    reg.set_status("running")
    good = _params_checkpoint(tmp_path, cfg)
    bad = tmp_path / "params_00000006.ckpt"
    bad.write_bytes(b"not a checkpoint")
    reg.enqueue_eval(str(good), 5)

    holder = create_eval_worker(cfg.run_name, redis_url, "eval-A", num_cpus=0.5, hold_s=120,
                                max_restarts=0, eval_idle_ms=1500)
    holder.run.remote()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = client.xpending_range(reg.eval_stream, GROUP, min="-", max="+", count=10)
        if any(r["consumer"] == "eval-A" for r in rows):
            break
        time.sleep(0.2)
    else:
        pytest.fail("eval-A never claimed the job")
    ray.kill(holder, no_restart=True)

    reg.enqueue_eval(str(bad), 6)
    reg.set_status("done")
    rescuer = create_eval_worker(cfg.run_name, redis_url, "eval-B", num_cpus=0.5,
                                 eval_idle_ms=1500, eval_max_deliveries=3)
    stats = ray.get(rescuer.run.remote(), timeout=240)
    ray.kill(rescuer, no_restart=True)

    result = reg.eval_result(5)
    assert result is not None and result["consumer"] == "eval-B"
    assert result["deliveries"] == 2 and stats["reclaimed"] >= 1
    assert result["learned_final_loss"] is not None and result["adam_final_loss"] is not None
    dead = reg.dead_letters()
    assert [d["version"] for d in dead] == ["6"] and dead[0]["deliveries"] == "3"
    assert "CheckpointError" in dead[0]["error"] or "checkpoint" in dead[0]["error"].lower()
    assert stats["failed"] == 3 and stats["dead_lettered"] == 1
    assert reg.evals_outstanding() == 0
    assert reg.leaderboard()[0]["version"] == 5


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # redis-server is fork+exec'd
def test_rerun_resumes_on_a_fresh_redis(tmp_path, redis_url):
    """Running the same run again (``l2o train`` twice on the embedded default, so a fresh Redis)
    resumes from the run directory; seqs the learner remembers are not reused (no DUPLICATEs)."""
    from services.train import run_service

    data = small_config(tmp_path, num_unroll_workers=1, num_eval_workers=0)
    data.update(meta_steps=8, checkpoint_every=4)
    first = run_service(config_from_dict(data), redis_url=redis_url, final_eval=False)
    client1, _ = redis_connection(redis_url)
    first_id = first["run_id"]
    first_seqs = [seq for _, seq in ok_records(client1, Registry(client1, first_id))]
    assert first["updates"] >= 8 and first_seqs

    other = EmbeddedRedis()
    try:
        data.update(meta_steps=first["version"] + 8)
        cfg = config_from_dict(data)
        second = run_service(cfg, redis_url=other.url, final_eval=False)
        client, _ = redis_connection(other.url)
        assert second["updates"] >= cfg.meta_steps
        assert second["history"][0]["version"] >= first["version"]  # resumed, not restarted
        assert second["gradients_duplicate"] == 0 and second["gradients_rejected"] == 0
        assert second["run_id"] == first_id  # a resume keeps its run id
        seqs = [seq for _, seq in ok_records(client, Registry(client, first_id))]
        assert seqs and min(seqs) > max(first_seqs)
    finally:
        other.stop()


#: seconds the learner of the first overlapping run is frozen: past the workers' RPC deadline
#: (``$L2O_RPC_TIMEOUT_S`` = 2 s in these runs) and past their client's retries (attempts start
#: for 10 s: the last ends by ~11 s), so the worker gives up on the client and reconnects
FREEZE_S = 15.0
#: the bearer token of the overlapping runs (from a token file); it must never show in Ray's state
TOKEN_SECRET = f"tok-{uuid.uuid4().hex}"


def _ray_state_text() -> str:
    """Everything Ray's state API shows of the actors, tasks and jobs, as one text."""
    import dataclasses

    from ray.util.state import list_actors, list_jobs, list_tasks

    ours = {"address": ray.get_runtime_context().gcs_address}  # not another user's Ray
    rows = [*list_actors(detail=True, limit=10_000, **ours),
            *list_tasks(detail=True, limit=10_000, **ours), *list_jobs(detail=True, **ours)]
    return json.dumps([dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r
                       for r in rows], default=str)


def _freeze(run, seen: dict) -> None:
    """Once ``run`` has made 5 updates: SIGSTOP its learner for :data:`FREEZE_S`, then SIGCONT."""
    import signal

    from ray.util.state import list_actors

    from services.train import actor_name

    deadline = time.monotonic() + 240
    while int(run.status.get("updates", 0)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    [actor] = list_actors(address=ray.get_runtime_context().gcs_address,
                          filters=[("name", "=", actor_name(run.run_id, "learner")),
                                   ("state", "=", "ALIVE")])
    seen.update(pid=actor.pid, incarnation=run.status["incarnation"])
    os.kill(actor.pid, signal.SIGSTOP)
    seen["stopped_at"] = time.monotonic()
    try:
        time.sleep(FREEZE_S)
        seen["frozen_updates"] = int(run.status.get("updates", 0))
    finally:
        os.kill(actor.pid, signal.SIGCONT)
        seen["continued_at"] = time.monotonic()


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory, redis_url):
    """Two runs of one name (different run directories) on the module's Redis, both started
    before either trains, so they overlap; their token comes from a file. While both run, Ray's
    state API is read, and the first run's learner is frozen (SIGSTOP) for :data:`FREEZE_S`.
    ``(runs, summaries, polls of the first run as (time, version), freeze record, state text,
    loop windows)``."""
    from services.train import ServiceRun

    tmp = tmp_path_factory.mktemp("overlap")
    token_file = tmp / "token"
    token_file.write_text(TOKEN_SECRET)
    data = small_config(tmp, num_unroll_workers=1, worker_num_cpus=0.25,
                        token_file=str(token_file))
    data.update(meta_steps=30, checkpoint_every=10)
    saved = os.environ.get("L2O_RPC_TIMEOUT_S")
    os.environ["L2O_RPC_TIMEOUT_S"] = "2"  # the driver's and (passed on) the actors' deadline
    runs = [ServiceRun(config_from_dict({**data, "run_dir": str(tmp / f"runs{k}")}), redis_url)
            for k in range(2)]
    polls: list[tuple[float, int]] = []
    seen: dict = {}
    windows: dict[int, tuple[float, float]] = {}

    def train(k: int) -> None:
        t0 = time.monotonic()
        runs[k].loop((lambda st: polls.append((time.monotonic(), int(st["version"]))))
                     if k == 0 else None, poll_s=0.1)
        windows[k] = (t0, time.monotonic())

    try:
        for run in runs:
            run.start()
        state = _ray_state_text()
        threads = [threading.Thread(target=train, args=(k,)) for k in range(2)]
        threads.append(threading.Thread(target=_freeze, args=(runs[0], seen)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        summaries = []
        for run in runs:
            run.stop(eval_drain_timeout_s=120)
            summaries.append(run.summarize(final_eval=False))
    finally:
        for run in runs:
            run.close()
        if saved is None:
            os.environ.pop("L2O_RPC_TIMEOUT_S", None)
        else:
            os.environ["L2O_RPC_TIMEOUT_S"] = saved
    return runs, summaries, polls, seen, state, windows


def test_two_overlapping_runs_of_one_name_are_told_apart(overlapping, redis_url):
    """Both runs train at the same time on one Redis: each finishes with its own run id,
    manifest, status and leaderboard rows; neither overwrites the other."""
    runs, summaries, _, _, _, windows = overlapping
    (a, b), (cfg_a, cfg_b) = summaries, (runs[0].cfg, runs[1].cfg)
    assert max(w[0] for w in windows.values()) < min(w[1] for w in windows.values())
    assert cfg_a.run_name == cfg_b.run_name and a["run_id"] != b["run_id"]
    assert {a["run_id"], b["run_id"]} == {run_id_of(cfg_a), run_id_of(cfg_b)}
    client, _ = redis_connection(redis_url)
    for cfg, summary in zip((cfg_a, cfg_b), summaries, strict=True):
        assert summary["updates"] >= cfg.meta_steps and summary["gradients_rejected"] == 0
        reg = Registry(client, summary["run_id"])
        manifest = reg.manifest()
        assert manifest["run_dir"] == str(cfg.run_path().resolve())
        assert manifest["run_name"] == cfg.run_name
        assert reg.state() == "done"
        versions = {r["version"] for r in reg.leaderboard(top=10_000)}
        assert {10, 20, 30} <= versions
        assert all(p.startswith(str(cfg.run_path().resolve()))
                   for p in reg.checkpoints().values())
        # only this run's worker pushed to this run's learner
        assert {w for w, _ in ok_records(client, reg)} == {"unroll-0"}
        assert not (cfg.run_path() / "secrets").exists()  # removed when the run ended
    board = {(r["run_id"], r["version"]) for r in leaderboard(client, top=10_000)}
    assert {(a["run_id"], 10), (b["run_id"], 10)} <= board
    listed = {r["run_id"]: r["state"] for r in list_runs(client)}
    assert listed[a["run_id"]] == "done" and listed[b["run_id"]] == "done"


def test_a_frozen_learner_is_waited_out(overlapping):
    """The learner SIGSTOPped past the RPC deadlines while its worker runs: the worker's calls
    time out and it reconnects; after SIGCONT the same learner (not a restart) goes on and the
    run finishes; the other run trained meanwhile."""
    runs, (a, b), polls, seen, _, _ = overlapping
    assert seen.get("continued_at"), seen
    assert seen["continued_at"] - seen["stopped_at"] >= FREEZE_S
    at_stop = max(v for t, v in polls if t <= seen["stopped_at"])
    during = [v for t, v in polls if seen["stopped_at"] + 1 < t < seen["continued_at"]]
    assert all(v == at_stop for v in during)  # frozen: no update, as the driver saw it
    assert max(v for _, v in polls) >= runs[0].cfg.meta_steps > at_stop  # went on after it
    versions = [v for _, v in polls]
    assert versions == sorted(versions)
    assert runs[0].status["incarnation"] == seen["incarnation"]  # the same learner
    [worker] = a["worker_stats"]
    assert worker["reconnects"] >= 1  # its calls failed and were retried
    assert a["updates"] >= runs[0].cfg.meta_steps and b["updates"] >= runs[1].cfg.meta_steps


def test_secrets_are_not_in_rays_state(overlapping, redis_url):
    """The bearer token and the Redis password reach the actors by file: nothing Ray's state
    API shows (actors, tasks, jobs, their runtime envs) holds them."""
    *_, state, _ = overlapping
    assert "l2o:" in state and "LearnerProcess" in state  # the run's actors are listed
    assert TOKEN_SECRET not in state
    if "@" in redis_url:
        password = redis_url.split("://", 1)[1].split("@", 1)[0].rpartition(":")[2]
        assert password and password not in state
