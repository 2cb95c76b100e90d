"""Nothing hangs: stalled gradient streams, call deadlines, keepalive and configuration errors,
over real gRPC on loopback with a real learner (issue 13, items 4, 6 and 7)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import optax
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_learner import RUN, TOKEN, grad_like, make_theta, push

from l2o.io.config import ServiceConfig
from learner.core import Learner
from learner.server import CLIENT_OPTIONS, SERVER_OPTIONS, SERVICE_NAME, serve
from proto import l2o_pb2, l2o_pb2_grpc
from proto.wire import (
    MIN_CHUNK_BYTES,
    flatten_tree,
    gradient_messages,
    manifest_to_proto,
    total_bytes,
)
from services.auth import auth_metadata
from services.client import LearnerClient, LearnerUnavailable, check_address
from services.retry import is_transient

IDLE_S = 2.0  # the server's idle limit on a push stream in these tests
CHUNK = MIN_CHUNK_BYTES


def big_theta() -> dict[str, np.ndarray]:
    """A θ of a few chunks."""
    return {"w": np.zeros(3 * CHUNK // 4 + 1000, np.float32), "b": np.zeros(7, np.float32)}


def gradient_chunks(seq: int, incarnation: int) -> list[l2o_pb2.GradientChunk]:
    """A valid gradient for :func:`big_theta` (θ of learner ``incarnation``), cut into chunks."""
    manifest, views = flatten_tree(grad_like(big_theta(), 0.01))
    header = l2o_pb2.GradientHeader(
        run_id=RUN, theta_version=0, gen_id=0, worker_id="staller", seq=seq, estimator="tbptt",
        incarnation=incarnation,
        inner_steps=1, mean_inner_loss=1.0, manifest=manifest_to_proto(manifest),
        total_bytes=total_bytes(manifest))
    return list(gradient_messages(header, views, CHUNK))


def stalled(first: l2o_pb2.GradientChunk, release: threading.Event
            ) -> Iterator[l2o_pb2.GradientChunk]:
    """A client that sends the first chunk of a gradient, then nothing until ``release``."""
    yield first
    release.wait()


def timed(fn, limit_s: float):  # noqa: ANN001, ANN201 - any call
    """``fn()``, asserting it returned within ``limit_s`` seconds."""
    t0 = time.monotonic()
    out = fn()
    assert time.monotonic() - t0 < limit_s, f"took {time.monotonic() - t0:.1f} s"
    return out


def test_stalled_push_streams_leave_status_and_health_answering(tmp_path: Path) -> None:
    """13 authenticated PushGradient streams that stall after their first chunk: one client's
    third is turned away (2 per client), then of 10 clients' streams 6 take the remaining push
    slots and 4 are turned away, all with RESOURCE_EXHAUSTED; Status, health and FetchTheta answer
    within 2 s meanwhile; the stalled streams are cancelled after the idle limit, their partial
    gradients dropped; a slow stream that keeps sending is not; a normal push then succeeds."""
    learner = Learner(big_theta(), optax.sgd(0.1), ServiceConfig(max_staleness=100), tmp_path,
                      RUN, checkpoint_every=1000, tensorboard=False)
    server, port = serve(learner, "127.0.0.1", 0, TOKEN, max_push_streams=8,
                         stream_idle_s=IDLE_S)
    address = f"127.0.0.1:{port}"
    release = threading.Event()
    # one connection per channel: the server tells clients apart by their connection
    channels = [grpc.insecure_channel(address, options=[*CLIENT_OPTIONS,
                                                        ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(11)]
    channel = channels[0]
    client = LearnerClient(address, TOKEN, RUN, max_wait_s=5.0, rpc_timeout_s=2.0)
    try:
        stub = l2o_pb2_grpc.LearnerStub(channel)
        firsts = iter([gradient_chunks(seq, learner.incarnation)[0] for seq in range(13)])

        def open_stalled(stubs: list, turned_away: int) -> list:
            calls = [s.PushGradient.future(stalled(next(firsts), release),
                                           metadata=auth_metadata(TOKEN)) for s in stubs]
            deadline = time.monotonic() + 5.0  # until the turned-away ones are answered
            while sum(c.done() for c in calls) < turned_away and time.monotonic() < deadline:
                time.sleep(0.05)
            return calls

        calls = open_stalled([stub] * 3, 1)  # one client: 2 served, its third turned away
        calls += open_stalled([l2o_pb2_grpc.LearnerStub(c) for c in channels[1:]], 4)
        busy = [c for c in calls if c.done()]
        assert len(busy) == 5
        assert {c.code() for c in busy} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert sum("of this client" in c.details() for c in busy) == 1

        t_stall = time.monotonic()
        status = timed(client.status, 2.0)
        assert status["accepted"] == 0 and status["version"] == 0
        health = health_pb2_grpc.HealthStub(channel)
        reply = timed(lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                           timeout=2.0), 2.0)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert timed(lambda: client.fetch_theta()[0], 2.0) == 0

        stalled_calls = [c for c in calls if c not in busy]
        for c in stalled_calls:  # the watchdog cancels them soon after the idle limit
            with pytest.raises(grpc.RpcError):
                c.result(timeout=IDLE_S + 5.0)
            assert c.code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - t_stall < IDLE_S + 5.0
        assert learner.status()["accepted"] == 0  # nothing of the partial gradients went in

        # slow but alive: a chunk every IDLE_S / 2 keeps the stream open
        chunks = gradient_chunks(100, learner.incarnation)
        assert len(chunks) >= 3

        def slow() -> Iterator[l2o_pb2.GradientChunk]:
            for chunk in chunks:
                yield chunk
                time.sleep(IDLE_S / 2)

        ack = stub.PushGradient(slow(), metadata=auth_metadata(TOKEN), timeout=30.0)
        assert ack.accepted, ack.detail

        # a normal (streamed) push from a fresh client
        streaming = LearnerClient(address, TOKEN, RUN, max_wait_s=5.0, chunk_bytes=CHUNK)
        ack = push(streaming, grad_like(big_theta(), 0.01), version=0, seq=0, worker="w1")
        streaming.close()
        assert ack.accepted, ack.detail
        assert learner.wait_for_version(2, timeout=10)
    finally:
        release.set()
        client.close()
        for c in channels:
            c.close()
        server.stop(0)
        learner.stop(checkpoint=False)


def test_a_silent_learner_fails_calls_at_their_deadline() -> None:
    """A peer that accepts TCP connections but never answers: every call ends at its deadline
    and the client gives up after ``max_wait_s``, instead of waiting forever."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # accepted by the kernel, never read
        client = LearnerClient(f"127.0.0.1:{listener.getsockname()[1]}", TOKEN, RUN,
                               max_wait_s=1.5, rpc_timeout_s=0.5, backoff_initial_s=0.05,
                               like=make_theta())  # θ's size bounds a download's deadline
        try:
            for call in (client.status, client.fetch_theta,
                         lambda: push(client, grad_like(make_theta(), 0.0))):
                t0 = time.monotonic()
                with pytest.raises(LearnerUnavailable):
                    call()
                assert time.monotonic() - t0 < 5.0
        finally:
            client.close()


def test_configuration_errors_are_raised_at_once(tmp_path: Path) -> None:
    """A learner address that is not host:port or a missing certificate: an error at once."""
    for bad in ("localhost", "host:port", "http://x:1", "x:70000", ""):
        with pytest.raises(ValueError, match="not host:port"):
            check_address(bad)
    for good in ("127.0.0.1:5", "[::1]:50051", "learner.local:443", "dns:///x:1", "unix:/s"):
        assert check_address(good) == good
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="not host:port"):
        LearnerClient("localhost", TOKEN, RUN)
    with pytest.raises(FileNotFoundError, match="root certificate"):
        LearnerClient("127.0.0.1:1", TOKEN, RUN, root_cert=str(tmp_path / "missing.pem"))
    assert time.monotonic() - t0 < 1.0
    assert not is_transient(FileNotFoundError("missing.pem"))  # a retry loop stops at once
    learner = Learner(make_theta(), optax.sgd(0.1), ServiceConfig(), tmp_path, RUN,
                      tensorboard=False, start=False)
    with pytest.raises(FileNotFoundError, match="TLS file"):
        serve(learner, "127.0.0.1", 0, TOKEN, str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    with pytest.raises(ValueError, match="max_workers"):
        serve(learner, "127.0.0.1", 0, TOKEN, max_workers=8, max_push_streams=8)


def test_the_learner_command_reports_a_missing_tls_file_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from learner.process import main

    config = tmp_path / "c.yaml"
    config.write_text(f"run_name: tls\nrun_dir: {tmp_path}\ntask: {{name: quadratic}}\n"
                      "optimizer: {name: learned_adam}\n"
                      f"service: {{tls_cert: {tmp_path}/c.pem, tls_key: {tmp_path}/k.pem}}\n")
    assert main(["--config", str(config), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "c.pem" in err and len(err.splitlines()) == 1


def test_keepalive_is_set_and_the_server_accepts_the_clients_pings() -> None:
    client, server = dict(CLIENT_OPTIONS), dict(SERVER_OPTIONS)
    for options in (client, server):
        assert options["grpc.keepalive_time_ms"] > 0 and options["grpc.keepalive_timeout_ms"] > 0
        assert options["grpc.keepalive_permit_without_calls"] == 1
    # a client pinging faster than the server allows would be sent GOAWAY (too_many_pings)
    assert client["grpc.keepalive_time_ms"] >= server[
        "grpc.http2.min_recv_ping_interval_without_data_ms"]
