"""The learner service over real gRPC on loopback: apply, reject, authenticate, resume."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jax
import numpy as np
import optax
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import assert_tree_allclose, assert_tree_equal

from l2o.io.checkpoints import latest_checkpoint, load_checkpoint
from l2o.io.config import ServiceConfig, TrainConfig
from learner.core import GradientHeader, Learner
from learner.health import main as health_main
from learner.process import LearnerProcess
from learner.server import SERVICE_NAME, serve
from proto import l2o_pb2
from proto.wire import (
    Reason,
    WireError,
    decode_tree,
    encode_tree,
    unflatten_paths,
)
from services.auth import load_token
from services.client import LearnerAuthError, LearnerClient, LearnerRpcError, reason_name

TOKEN = "test-token-123"
RUN = "run-a"


def make_theta() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"layer": {"w": rng.normal(size=(4, 3)).astype(np.float32),
                      "b": np.zeros(3, np.float32)},
            "scale": np.ones((), np.float32)}


def grad_like(theta: Any, value: float) -> Any:
    return jax.tree_util.tree_map(lambda x: np.full(np.shape(x), value, np.float32), theta)


@contextlib.contextmanager
def service(tmp_path: Path, tx: optax.GradientTransformation | None = None, *,
            learner: Learner | None = None, start: bool = True, block_timeout_s: float = 30.0,
            **cfg: Any) -> Iterator[tuple[Learner, LearnerClient, int]]:
    if learner is None:
        learner = Learner(make_theta(), tx or optax.sgd(0.1), ServiceConfig(**cfg), tmp_path,
                          RUN, checkpoint_every=1000, tensorboard=False, start=start,
                          block_timeout_s=block_timeout_s)
    server, port = serve(learner, "127.0.0.1", 0, TOKEN)
    client = LearnerClient(f"127.0.0.1:{port}", TOKEN, RUN, max_wait_s=5.0)
    try:
        yield learner, client, port
    finally:
        client.close()
        server.stop(0)
        learner.stop(checkpoint=False)


def push(client: LearnerClient, grad: Any, *, version: int = 0, seq: int = 0,
         worker: str = "w0", gen_id: int = 0, loss: float = 1.0,
         incarnation: int | None = None) -> l2o_pb2.Ack:
    """Push ``grad`` stamped with ``incarnation`` (default: the learner's current one)."""
    if incarnation is None:
        incarnation = client.status()["incarnation"]
    return client.push_gradient(grad, theta_version=version, gen_id=gen_id,
                                incarnation=incarnation, worker_id=worker, seq=seq,
                                estimator="tbptt", inner_steps=20, mean_inner_loss=loss)


def test_reason_enum_mirrors_proto() -> None:
    assert {r.name: r.value for r in Reason} == dict(l2o_pb2.Reason.items())


def test_wire_roundtrip_and_errors() -> None:
    theta = make_theta()
    manifest, chunks = encode_tree(theta, chunk_bytes=256 << 10)
    chunks = list(chunks)
    assert_tree_equal(decode_tree(manifest, chunks, like=theta), theta)
    rebuilt = decode_tree(manifest, chunks)  # no template: nested dicts from the paths
    assert_tree_equal(rebuilt, theta)
    assert set(rebuilt) == {"layer", "scale"}
    assert unflatten_paths(["[0]", "[1]['a']"], [1, 2]) == [1, {"a": 2}]
    corrupt = [bytes([chunks[0][0] ^ 1]) + chunks[0][1:]] + chunks[1:]
    cases = [
        (corrupt, {"like": theta}, Reason.BAD_CHECKSUM),
        ([chunks[0][:-4]], {"like": theta}, Reason.MALFORMED),
        (chunks + [b"xx"], {"like": theta}, Reason.MALFORMED),
        (chunks, {"like": {"other": theta["layer"], "scale": theta["scale"]}}, Reason.WRONG_TREE),
        (chunks, {"like": {**theta, "scale": np.ones(2, np.float32)}}, Reason.WRONG_SHAPE),
        (chunks, {"like": {**theta, "scale": np.ones((), np.float64)}}, Reason.WRONG_DTYPE),
        (chunks, {"max_bytes": 8}, Reason.TOO_LARGE),
    ]
    for data, kwargs, reason in cases:
        with pytest.raises(WireError) as e:
            decode_tree(manifest, data, **kwargs)
        assert e.value.reason == reason, (reason, e.value)


def test_accepts_and_applies_hand_computed_update(tmp_path: Path) -> None:
    tx = optax.adam(1e-2)
    with service(tmp_path, tx, batch_size=2, max_staleness=1) as (learner, client, _):
        client.wait_ready(10)
        version, theta0 = client.fetch_theta()
        assert version == 0
        assert_tree_equal(theta0, make_theta())
        g1, g2 = grad_like(theta0, 1.0), grad_like(theta0, -3.0)
        ack = push(client, g1, seq=0, loss=2.0)
        assert ack.accepted and reason_name(ack) == "OK"
        assert learner.version == 0  # one of batch_size=2 gradients: no update yet
        assert push(client, g2, seq=1, worker="w1", loss=4.0).accepted
        assert learner.wait_for_version(1, timeout=30)
        state = tx.init(make_theta())
        mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
        updates, _ = tx.update(mean, state, make_theta())
        expected = optax.apply_updates(make_theta(), updates)
        version, theta1 = client.fetch_theta(have_version=0)
        assert version == 1
        assert_tree_allclose(theta1, expected, rtol=1e-6, atol=1e-7)
        assert client.fetch_theta(have_version=1) == (1, None)
        status = client.status()
        assert status["version"] == 1 and status["updates"] == 1
        assert status["accepted"] == 2 and status["applied"] == 2
        assert status["unique_workers"] == 2 and status["last_meta_loss"] == pytest.approx(3.0)
        assert status["worker_last_seq"] == {"w0": 0, "w1": 1}


def test_rejections_leave_theta_and_state_untouched(tmp_path: Path) -> None:
    tx = optax.adam(1e-2)
    with service(tmp_path, tx, batch_size=1, max_staleness=0,
                 max_message_bytes=64 << 10) as (learner, client, _):
        theta = make_theta()
        assert push(client, grad_like(theta, 0.5), seq=0).accepted
        assert learner.wait_for_version(1, timeout=30)
        version, theta1 = client.fetch_theta()
        state1 = learner.opt_state
        good = grad_like(theta, 1.0)
        nan = grad_like(theta, 1.0)
        nan["layer"]["w"][1, 2] = np.nan
        inf = grad_like(theta, 1.0)
        inf["scale"] = np.array(np.inf, np.float32)
        wrong_shape = {**grad_like(theta, 1.0), "scale": np.ones(3, np.float32)}
        wrong_tree = {"layer": grad_like(theta, 1.0)["layer"], "bias": np.ones((), np.float32)}
        wrong_dtype = jax.tree_util.tree_map(lambda x: x.astype(np.float64), good)
        oversized = {**grad_like(theta, 1.0), "scale": np.ones(100_000, np.float32)}
        cases = [
            (nan, {"version": 1, "seq": 10}, "NAN_OR_INF"),
            (inf, {"version": 1, "seq": 11}, "NAN_OR_INF"),
            (wrong_shape, {"version": 1, "seq": 12}, "WRONG_SHAPE"),
            (wrong_tree, {"version": 1, "seq": 13}, "WRONG_TREE"),
            (wrong_dtype, {"version": 1, "seq": 14}, "WRONG_DTYPE"),
            (oversized, {"version": 1, "seq": 15}, "TOO_LARGE"),
            (good, {"version": 0, "seq": 16}, "STALE"),  # 1 - 0 > max_staleness 0
            (good, {"version": 1, "seq": 0}, "DUPLICATE"),  # seq 0 was applied
            (good, {"version": 1, "seq": 17, "gen_id": 3}, "STALE_GENERATION"),
        ]
        for grad, kwargs, reason in cases:
            ack = push(client, grad, **kwargs)
            assert not ack.accepted and reason_name(ack) == reason, (reason, ack)
            assert ack.detail and ack.version == 1
        other_run = LearnerClient(client.address, TOKEN, "run-b", max_wait_s=5.0)
        ack = push(other_run, good, version=1, seq=18)
        assert reason_name(ack) == "WRONG_RUN"
        with pytest.raises(LearnerRpcError, match="WRONG_RUN"):
            other_run.fetch_theta()
        other_run.close()
        assert learner.version == 1 and learner.status()["buffer_depth"] == 0
        assert_tree_equal(client.fetch_theta()[1], theta1)
        assert_tree_equal(learner.opt_state, state1)
        status = client.status()
        assert status["dropped_stale"] == 1 and status["duplicate"] == 1
        assert status["rejected"] == 8 and status["rejected_by_reason"]["NAN_OR_INF"] == 2
        # the learner still takes a good gradient afterwards
        assert push(client, good, version=1, seq=19).accepted
        assert learner.wait_for_version(2, timeout=30)


def test_authentication_health_and_reflection(tmp_path: Path) -> None:
    with service(tmp_path) as (_, client, port):
        address = f"127.0.0.1:{port}"
        for token in (None, "wrong-token"):
            bad = LearnerClient(address, token, RUN, max_wait_s=5.0)
            with pytest.raises(LearnerAuthError, match="UNAUTHENTICATED"):
                bad.status()
            with pytest.raises(LearnerAuthError):
                bad.fetch_theta()
            with pytest.raises(LearnerAuthError):
                push(bad, grad_like(make_theta(), 1.0))
            bad.close()
        with grpc.insecure_channel(address) as channel:  # no token needed for these
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            names = {s.name for r in responses for s in r.list_services_response.service}
            assert SERVICE_NAME in names and SERVICE_NAME == "l2o.v1.Learner"
        assert client.status()["accepted"] == 0  # nothing got through
        assert health_main([address]) == 0  # the container health check, without a token
    assert health_main([address, "--timeout", "0.5"]) == 1  # stopped: unhealthy


def _port_other_than(port: int) -> int:
    """A free loopback port that is not ``port`` (the OS may hand a just-freed port out again,
    and a client would then reach the new server without having to find it)."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] != port:
                return s.getsockname()[1]


def test_checkpoint_restart_resumes_version_and_dedup(tmp_path: Path) -> None:
    tx = optax.adam(1e-2)
    seen: list[tuple[Path, int]] = []
    cfg = ServiceConfig(batch_size=1, max_staleness=2)
    learner = Learner(make_theta(), tx, cfg, tmp_path, RUN, checkpoint_every=2,
                      on_params_checkpoint=lambda p, v: seen.append((p, v)), tensorboard=False)
    server, port = serve(learner, "127.0.0.1", 0, TOKEN)
    address = {"now": f"127.0.0.1:{port}"}
    client = LearnerClient(address["now"], TOKEN, RUN, max_wait_s=30.0,
                           resolve_address=lambda: address["now"])
    try:
        for seq in range(3):
            assert push(client, grad_like(make_theta(), 1.0 + seq), version=seq, seq=seq).accepted
            assert learner.wait_for_version(seq + 1, timeout=30)
        assert [v for _, v in seen] == [2]  # every checkpoint_every=2 updates
        assert client.fetch(have_version=-1).version == 3  # the client holds θ(3) of `learner`
        server.stop(0)
        learner.stop(checkpoint=True)  # as on SIGTERM
        learner.save_checkpoint()  # the same version again: no second eval job
        assert [v for _, v in seen] == [2, 3]
        assert latest_checkpoint(tmp_path, "full").name == "full_00000003.ckpt"
        _, meta = load_checkpoint(seen[-1][0])
        assert meta["kind"] == "params" and meta["version"] == 3 and meta["gen_id"] == 0

        resumed = Learner.resume(make_theta(), tx, cfg, tmp_path, RUN, checkpoint_every=2,
                                 tensorboard=False)
        assert resumed.resumed_from is not None and resumed.version == 3
        assert_tree_equal(resumed.theta, learner.theta)
        assert_tree_equal(resumed.opt_state, learner.opt_state)
        server2, port2 = serve(resumed, "127.0.0.1", _port_other_than(port), TOKEN)
        address["now"] = f"127.0.0.1:{port2}"  # the client rediscovers the new address
        try:
            # a new incarnation: θ comes in full although the version is the one the client has
            result = client.fetch(have_version=3)
            assert result.version == 3 and result.incarnation == resumed.incarnation
            assert resumed.incarnation != learner.incarnation
            assert_tree_equal(result.theta, jax.tree_util.tree_map(np.asarray, learner.theta))
            assert client.fetch_theta(have_version=3) == (3, None)  # now it is unchanged
            ack = push(client, grad_like(make_theta(), 1.0), version=3, seq=4,
                       incarnation=learner.incarnation)
            assert reason_name(ack) == "STALE_INCARNATION" and not ack.accepted
            ack = push(client, grad_like(make_theta(), 1.0), version=3, seq=2)
            assert reason_name(ack) == "DUPLICATE"
            assert push(client, grad_like(make_theta(), 1.0), version=3, seq=3).accepted
            assert resumed.wait_for_version(4, timeout=30)
            assert client.status()["accepted"] == 4 and client.reconnects >= 1
            assert client.status()["rejected_by_reason"]["STALE_INCARNATION"] == 1
        finally:
            server2.stop(0)
            resumed.stop(checkpoint=False)
    finally:
        client.close()
        server.stop(0)


def test_backpressure_drop_oldest_and_block(tmp_path: Path) -> None:
    with service(tmp_path, start=False, batch_size=1, buffer_size=2,
                 backpressure="drop_oldest") as (learner, client, _):
        for seq in range(5):
            assert push(client, grad_like(make_theta(), float(seq)), seq=seq).accepted
        status = client.status()
        assert status["accepted"] == 5 and status["dropped_oldest"] == 3
        assert status["buffer_depth"] == 2
        assert learner.step() and learner.step() and not learner.step()
        assert learner.version == 2
    with service(tmp_path / "b", start=False, batch_size=1, buffer_size=1, backpressure="block",
                 block_timeout_s=0.2) as (learner, client, _):
        assert push(client, grad_like(make_theta(), 1.0), seq=0).accepted
        ack = push(client, grad_like(make_theta(), 1.0), seq=1)
        assert reason_name(ack) == "BUFFER_FULL" and not ack.accepted
        assert learner.status()["buffer_depth"] == 1 and learner.version == 0


def test_submit_in_process_counts_stale_at_apply(tmp_path: Path) -> None:
    learner = Learner(make_theta(), optax.sgd(0.1), ServiceConfig(batch_size=1, max_staleness=0),
                      tmp_path, RUN, tensorboard=False, start=False)
    g = grad_like(make_theta(), 1.0)
    for seq in range(2):
        header = GradientHeader(RUN, theta_version=0, gen_id=0, worker_id="w", seq=seq,
                                incarnation=learner.incarnation)
        assert learner.submit(g, header).accepted
    assert learner.step()  # applies the first; the second is now 1 version behind
    assert not learner.step()
    s = learner.status()
    assert s["version"] == 1 and s["dropped_stale"] == 1 and s["buffer_depth"] == 0


def test_learner_process_serves_and_checkpoints(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("L2O_TOKEN", raising=False)
    cfg = TrainConfig(run_name="proc", run_dir=str(tmp_path))
    proc = LearnerProcess(cfg, theta=make_theta())
    assert proc.token_path is not None and proc.token_path.stat().st_mode & 0o077 == 0
    address = proc.start()
    try:
        token = load_token(token_file=proc.token_path)
        client = LearnerClient(address, token, "proc", max_wait_s=5.0)
        client.wait_ready(10)
        assert client.fetch_theta()[0] == 0
        ack = client.push_gradient(grad_like(make_theta(), 1.0), theta_version=0, gen_id=0,
                                   incarnation=client.last_incarnation, worker_id=7, seq=0)
        assert ack.accepted
        assert proc.learner.wait_for_version(1, timeout=30)
        client.close()
    finally:
        status = proc.stop()
    assert status["version"] == 1
    assert latest_checkpoint(tmp_path / "proc", "full") is not None
    again = LearnerProcess(cfg, theta=make_theta(), token="t", autostart=True)
    try:
        assert again.learner.resumed_from is not None
    finally:
        again.stop(checkpoint=False)


def test_multi_chunk_stream_and_raw_protobuf_clients(tmp_path: Path) -> None:
    """Gradients larger than a chunk go as a client stream; a plain protobuf stub interoperates."""
    theta = {"w": np.zeros(300_000, np.float32), "b": np.zeros(7, np.float32)}  # ~1.2 MB
    learner = Learner(theta, optax.sgd(1.0), ServiceConfig(batch_size=1, max_staleness=5,
                                                           max_message_bytes=2 << 20),
                      tmp_path, RUN, tensorboard=False)
    with service(tmp_path, learner=learner) as (_, client, port):
        grad = {"w": np.linspace(-1, 1, 300_000, dtype=np.float32), "b": np.ones(7, np.float32)}
        assert push(client, grad).accepted
        assert learner.wait_for_version(1, timeout=30)
        version, got = client.fetch_theta()
        assert version == 1
        np.testing.assert_allclose(got["w"], -grad["w"])
        np.testing.assert_allclose(got["b"], -grad["b"])
        too_big = {"w": np.zeros(600_000, np.float32), "b": np.zeros(7, np.float32)}
        ack = push(client, too_big, version=1, seq=1)
        assert reason_name(ack) == "TOO_LARGE"

        # the generated protobuf stub speaks the same wire format
        from proto import l2o_pb2_grpc
        from proto.wire import flatten_tree, iter_chunks, manifest_to_proto

        manifest, views = flatten_tree(grad)
        chunks = list(iter_chunks(views))
        assert len(chunks) == 2

        def header(seq: int, **kw: Any) -> l2o_pb2.GradientHeader:
            fields = dict(run_id=RUN, theta_version=1, gen_id=0, worker_id="raw", seq=seq,
                          incarnation=learner.incarnation,
                          manifest=manifest_to_proto(manifest),
                          total_bytes=sum(s.length for s in manifest))
            return l2o_pb2.GradientHeader(**{**fields, **kw})

        corrupt = bytes([chunks[1][0] ^ 0xFF]) + chunks[1][1:]
        streams = [
            ("MALFORMED", [l2o_pb2.GradientChunk(data=chunks[0])]),  # no header
            ("BAD_CHECKSUM", [l2o_pb2.GradientChunk(header=header(2), data=chunks[0]),
                              l2o_pb2.GradientChunk(data=corrupt)]),
            ("MALFORMED", [l2o_pb2.GradientChunk(header=header(3), data=chunks[0])]),  # short
            ("MALFORMED", [l2o_pb2.GradientChunk(header=header(4, total_bytes=5),
                                                 data=chunks[0])]),
            ("MALFORMED", [l2o_pb2.GradientChunk(header=header(5), data=chunks[0]),  # 2 headers
                           l2o_pb2.GradientChunk(header=header(5), data=chunks[1])]),
            ("OK", [l2o_pb2.GradientChunk(header=header(6), data=chunks[0]),
                    l2o_pb2.GradientChunk(data=chunks[1])]),
        ]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = l2o_pb2_grpc.LearnerStub(channel)
            md = (("authorization", f"Bearer {TOKEN}"),)
            for want, stream in streams:
                ack = stub.PushGradient(iter(stream), metadata=md, timeout=30)
                assert Reason(ack.reason).name == want and ack.accepted == (want == "OK"), ack
            raw_push = channel.stream_unary(f"/{SERVICE_NAME}/PushGradient",
                                            response_deserializer=l2o_pb2.Ack.FromString)
            ack = raw_push(iter([b"\x0a\x05ab"]), metadata=md, timeout=30)  # truncated header
            assert Reason(ack.reason).name == "MALFORMED" and "unparsable" in ack.detail, ack
            assert learner.wait_for_version(2, timeout=30)
            first = next(iter(stub.FetchTheta(
                l2o_pb2.FetchRequest(run_id=RUN, have_version=2,
                                     have_incarnation=learner.incarnation),
                metadata=md, timeout=30)))
            assert first.unchanged and first.version == 2
            chunks_back = list(stub.FetchTheta(l2o_pb2.FetchRequest(run_id=RUN, have_version=0),
                                               metadata=md, timeout=30))
            assert chunks_back[0].header.version == 2 and len(chunks_back) == 2
            assert stub.Status(l2o_pb2.StatusRequest(), metadata=md, timeout=30).version == 2


def test_new_generation_refuses_old_generation(tmp_path: Path) -> None:
    with service(tmp_path, batch_size=1, max_staleness=3) as (learner, client, _):
        g = grad_like(make_theta(), 1.0)
        gen = learner.new_generation(grad_like(make_theta(), 0.0))
        assert gen == 1 and learner.version == 1
        result = client.fetch(have_version=0)
        assert result.gen_id == 1
        assert_tree_equal(result.theta, grad_like(make_theta(), 0.0))
        assert reason_name(push(client, g, version=1, seq=0, gen_id=0)) == "STALE_GENERATION"
        assert push(client, g, version=1, seq=1, gen_id=1).accepted


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    learner = Learner(make_theta(), optax.sgd(0.1), ServiceConfig(), tmp_path, RUN,
                      tensorboard=False)
    server, port = serve(learner, "127.0.0.1", 0, TOKEN, tls_cert=cert, tls_key=key)
    try:
        client = LearnerClient(f"localhost:{port}", TOKEN, RUN, root_cert=cert, max_wait_s=5.0)
        client.wait_ready(10)
        assert client.fetch_theta()[0] == 0 and push(client, grad_like(make_theta(), 1.0)).accepted
        client.close()
        plain = LearnerClient(f"127.0.0.1:{port}", TOKEN, RUN, max_wait_s=0.5)
        with pytest.raises(ConnectionError):  # a plaintext client cannot talk to a TLS port
            plain.status()
        plain.close()
    finally:
        server.stop(0)
        learner.stop(checkpoint=False)


def test_cli_serves_and_checkpoints_on_sigterm(tmp_path: Path) -> None:
    """``python -m learner`` prints its address, serves, and checkpoints on SIGTERM."""
    import os
    import queue
    import signal
    import subprocess
    import sys
    import threading

    pytest.importorskip("l2o.optimizers.registry")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("run_name: cli\ntask: {name: quadratic}\noptimizer: {name: learned_adam}\n")
    env = {**os.environ, "L2O_TOKEN": TOKEN, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "learner", "--config", str(cfg), "--run-dir",
         str(tmp_path / "run"), "--port", "0"],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        address = None
        while address is None:
            line = lines.get(timeout=120)
            if line.startswith("learner serving run cli at "):
                address = line.rsplit(" ", 1)[1].strip()
        client = LearnerClient(address, TOKEN, "cli", max_wait_s=10.0)
        version, theta = client.fetch_theta()
        ack = client.push_gradient(jax.tree_util.tree_map(lambda x: np.full_like(x, 0.1), theta),
                                   theta_version=version, gen_id=0,
                                   incarnation=client.last_incarnation, worker_id="w", seq=0)
        assert ack.accepted
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    full = latest_checkpoint(tmp_path / "run", "full")
    assert full is not None
    _, meta = load_checkpoint(full)
    assert meta["kind"] == "full" and meta["run_id"] == "cli" and meta["optimizer"]["name"]
    assert meta["dedup"] == {"w": [0, [0]]}


def test_token_sources_and_unreachable_learner(tmp_path: Path, monkeypatch: Any) -> None:
    from services.auth import TokenError
    from services.client import LearnerUnavailable

    monkeypatch.setenv("L2O_TEST_TOKEN", "  from-env \n")
    assert load_token("L2O_TEST_TOKEN") == "from-env"
    monkeypatch.delenv("L2O_TEST_TOKEN")
    assert load_token("L2O_TEST_TOKEN") is None
    (tmp_path / "tok").write_text("from-file\n")
    assert load_token("L2O_TEST_TOKEN", tmp_path / "tok") == "from-file"
    (tmp_path / "empty").write_text("\n")
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(TokenError):
            load_token(token_file=bad)
    with pytest.raises(ValueError, match="token"):
        serve(Learner(make_theta(), optax.sgd(0.1), ServiceConfig(), tmp_path, RUN,
                      tensorboard=False, start=False), "127.0.0.1", 0, None)
    with socket_port() as port:  # a port nobody listens on
        client = LearnerClient(f"127.0.0.1:{port}", TOKEN, RUN, max_wait_s=0.3,
                               backoff_initial_s=0.05)
        with pytest.raises(LearnerUnavailable):
            client.status()
        with pytest.raises(LearnerUnavailable):
            client.wait_ready(timeout=0.3)
        assert client.reconnects >= 1
        client.close()


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
    try:
        yield s.getsockname()[1]
    finally:
        s.close()
