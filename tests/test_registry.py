"""The Redis registry alone, on a real (embedded) Redis server: fast, no Ray, no JAX."""

from __future__ import annotations

import math
import time
import uuid

import pytest

from services.redis_server import EmbeddedRedis, redis_connection
from services.registry import (
    GLOBAL_LEADERBOARD,
    Registry,
    leaderboard,
    list_runs,
    run_status,
    task_key,
)


@pytest.fixture(scope="module")
def client():
    """A client of this process's embedded server (or of $REDIS_URL), stopped after the module
    so that a later test's run can start this process's server on its own run directory."""
    from services.redis_server import shutdown_embedded

    c, _url = redis_connection()
    yield c
    shutdown_embedded()


@pytest.fixture
def reg(client):
    """A fresh run's registry, deleted afterwards."""
    r = Registry(client, f"test-{uuid.uuid4().hex[:8]}", eval_max_deliveries=3, eval_idle_ms=50)
    yield r
    r.delete_run()


def test_embedded_server_uses_a_unix_socket_and_stops():
    srv = EmbeddedRedis()
    try:
        assert srv.url.startswith("unix://")
        c, url = redis_connection(srv.url)
        assert url == srv.url
        assert c.config_get("port")["port"] == "0"  # no TCP listener at all
        c.set("k", "v")
        # another process would connect by this URL: a second client sees the same data
        c2, _ = redis_connection(srv.url)
        assert c2.get("k") == "v"
    finally:
        srv.stop()
    assert not srv.alive()
    assert not srv.dir.exists()


def test_password_in_url_is_honoured_and_not_leaked(tmp_path):
    srv = EmbeddedRedis()
    try:
        c, _ = redis_connection(srv.url)
        c.config_set("requirepass", "s3cret")
        good = f"unix://:s3cret@{srv.socket}"
        c2, _ = redis_connection(good)
        assert c2.ping()
        with pytest.raises(ConnectionError) as e:
            redis_connection(f"unix://:wrong@{srv.socket}")
        assert "wrong" not in str(e.value)
        c2.config_set("requirepass", "")
    finally:
        srv.stop()


def test_manifest_status_discovery_and_index(client, reg):
    reg.write_manifest({"seed": 3}, run_dir="/tmp/x")
    assert reg.manifest()["config"] == {"seed": 3}
    assert reg.state() is None and not reg.should_stop()
    reg.set_status("running", version=5, counts={"accepted": 2})
    st = reg.status()
    assert st["state"] == "running" and st["version"] == 5 and st["counts"]["accepted"] == 2
    reg.set_learner_address("127.0.0.1:1234")
    assert reg.learner_address() == "127.0.0.1:1234"
    reg.set_status("done")
    assert reg.should_stop()
    assert reg.run_id in [r["run_id"] for r in list_runs(client)]
    s = run_status(client, reg.run_id)
    assert s["state"] == "done" and s["learner_address"] == "127.0.0.1:1234"
    with pytest.raises(KeyError):
        run_status(client, "no-such-run-" + uuid.uuid4().hex)


def test_seq_is_monotone_per_worker(reg):
    assert [reg.next_seq("w0") for _ in range(3)] == [0, 1, 2]
    assert reg.next_seq("w1") == 0
    # a "restarted" worker (new Registry object) continues where it left off
    again = Registry(reg.r, reg.run_id)
    assert again.next_seq("w0") == 3 and again.peek_seq("w0") == 4
    # a learner that remembers more seqs than this Redis: the counter jumps past them, never back
    assert again.ensure_seq_at_least("w0", 10) == 10 and again.next_seq("w0") == 10
    assert again.ensure_seq_at_least("w0", 2) == 11 and again.next_seq("w0") == 11


def test_eval_queue_claim_ack(reg):
    jid = reg.record_checkpoint("/ck/params_1.ckpt", 1)
    assert reg.checkpoints() == {1: "/ck/params_1.ckpt"}
    assert reg.evals_outstanding() == 1
    job = reg.claim_eval("a", block_ms=100)
    assert job is not None and job.id == jid and job.version == 1 and job.deliveries == 1
    assert reg.eval_backlog() == {"queued": 0, "pending": 1}
    patient = Registry(reg.r, reg.run_id, eval_idle_ms=60_000)
    assert patient.claim_eval("b", block_ms=0) is None  # held by "a", not idle long enough
    reg.store_eval_result(1, {"learned_final_loss": 1.0, "adam_final_loss": 2.0, "speedup": 3.0})
    reg.ack_eval(job)
    assert reg.evals_outstanding() == 0
    assert reg.eval_result(1)["score"] == pytest.approx(0.5)


def test_idle_job_is_reclaimed_by_another_consumer(reg):
    reg.enqueue_eval("/p", 7)
    job = reg.claim_eval("dead-worker", block_ms=100)
    assert job is not None
    time.sleep(0.12)  # > eval_idle_ms: its consumer is presumed dead
    again = reg.claim_eval("live-worker", block_ms=0)
    assert again is not None and again.id == job.id and again.deliveries == 2
    # the original holder's heartbeat no longer holds it
    assert not reg.touch_eval(job, "dead-worker")
    assert reg.touch_eval(again, "live-worker")
    reg.ack_eval(again)
    assert reg.evals_outstanding() == 0


def test_failing_job_is_retried_then_dead_lettered(reg):
    reg.enqueue_eval("/bad", 3)
    seen = []
    for _ in range(10):
        job = reg.claim_eval("w", block_ms=100)
        if job is None:
            break
        seen.append(job.deliveries)
        dead = reg.fail_eval(job, f"boom {job.deliveries}")
        assert dead == (job.deliveries >= 3)
    assert seen == [1, 2, 3]
    dl = reg.dead_letters()
    assert len(dl) == 1 and dl[0]["version"] == "3" and "boom 3" in dl[0]["error"]
    assert reg.evals_outstanding() == 0
    assert run_status(reg.r, reg.run_id)["dead_letters"] == 1


def test_job_that_kills_its_workers_is_dead_lettered_on_reclaim(reg):
    reg.enqueue_eval("/crash", 4)
    for i in range(3):
        job = reg.claim_eval(f"w{i}", block_ms=100)
        assert job is not None and job.deliveries == i + 1
        time.sleep(0.07)  # the worker "dies" holding it
    assert reg.claim_eval("w9", block_ms=0) is None
    assert len(reg.dead_letters()) == 1


def test_leaderboard_ranks_lower_scores_first(client, reg):
    other = Registry(client, reg.run_id + "-b")
    try:
        reg.store_eval_result(1, {"learned_final_loss": 4.0, "adam_final_loss": 2.0})
        reg.store_eval_result(2, {"learned_final_loss": 1.0, "adam_final_loss": 2.0})
        other.store_eval_result(5, {"learned_final_loss": 1.5, "adam_final_loss": 2.0})
        reg.store_eval_result(3, {"learned_final_loss": math.nan, "adam_final_loss": 2.0})
        mine = reg.leaderboard()
        assert [r["version"] for r in mine] == [2, 1, 3]
        assert [r["score"] for r in mine[:2]] == [0.5, 2.0]
        rows = [r for r in leaderboard(client, top=1000)
                if r["run_id"] in (reg.run_id, other.run_id)]
        assert [(r["run_id"], r["version"]) for r in rows] == [
            (reg.run_id, 2), (other.run_id, 5), (reg.run_id, 1), (reg.run_id, 3)]
        assert leaderboard(client, run_id=other.run_id)[0]["version"] == 5
    finally:
        other.delete_run()
    reg.delete_run()
    assert not [m for m in client.zrange(GLOBAL_LEADERBOARD, 0, -1)
                if m.startswith(reg.run_id + "@")]


def test_adam_sweep_cache(reg):
    k = task_key({"name": "quadratic", "kwargs": {}}, 50, 3, [1e-3, 1e-2])
    assert k == task_key({"name": "quadratic", "kwargs": {}}, 50, 3, [0.001, 0.01])
    assert k != task_key({"name": "quadratic", "kwargs": {}}, 51, 3, [1e-3, 1e-2])
    assert reg.get_adam_sweep(k) is None
    reg.set_adam_sweep(k, {"best_lr": 0.01, "final_loss": 0.5})
    assert reg.get_adam_sweep(k)["best_lr"] == 0.01
    reg.r.delete(f"l2o:adam:{k}")


def test_reclaim_skips_a_pending_entry_that_was_deleted(reg):
    first = reg.enqueue_eval("/gone", 1)
    second = reg.enqueue_eval("/here", 2)
    assert reg.claim_eval("a", block_ms=100).id == first
    assert reg.claim_eval("a", block_ms=100).id == second
    reg.r.xdel(reg.eval_stream, first)  # deleted but never acknowledged
    time.sleep(0.07)
    job = reg.claim_eval("b", block_ms=0)
    assert job is not None and job.id == second and job.path == "/here"
