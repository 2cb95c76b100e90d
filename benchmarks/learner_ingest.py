"""Learner ingest: gradients/s and MB/s through the real gRPC learner vs a raw loopback socket.

For θ of 5 thousand and 10 million float32, a learner server runs in a child process (bearer
token, sha256-checked chunks, full validation, a meta-update every ``batch_size`` gradients) and
this process pushes gradients to it over loopback with ``LearnerClient`` from several threads. In
the same run a raw TCP socket server in a child process receives the same number of bytes per
message (length-prefixed, one-byte acknowledgement per message, no checks), so the figures are
comparable on the same machine at the same moment. For reference, a "bare gRPC" server that only
drains the same chunk messages shows what gRPC itself costs, apart from the learner's work
(sha256 verification, validation, buffering and meta-updates). Targets (issue 3): ≥ 50% of the
socket's MB/s for 10M; ≥ 1000 gradients/s for 5k.

    python -m benchmarks.learner_ingest [--seconds 8] [--out benchmarks/results/learner_ingest.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

TOKEN = "bench-token"
RUN = "bench"


def make_theta(n: int) -> dict[str, np.ndarray]:
    """θ of ``n`` float32 values in a few leaves (like a small network)."""
    big = n - 64 - 64
    return {"net": {"w": np.zeros(big, np.float32), "b": np.zeros(64, np.float32)},
            "out": np.zeros(64, np.float32)}


def _learner_main(n: int, batch_size: int, ready: Any, mark: Any, stop: Any) -> None:
    import optax

    from l2o.io.config import ServiceConfig
    from learner.core import Learner
    from learner.server import serve

    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"l2o-bench-{os.getpid()}"
    cfg = ServiceConfig(batch_size=batch_size, max_staleness=10**9, buffer_size=4 * batch_size,
                        backpressure="block")
    learner = Learner(make_theta(n), optax.sgd(1e-3), cfg, run_dir, RUN,
                      checkpoint_every=10**9, tensorboard=False)
    server, port = serve(learner, "127.0.0.1", 0, TOKEN, max_workers=16)
    ready.put(port)
    mark.wait()
    cpu0 = time.process_time()
    stop.wait()
    status = {**learner.status(), "cpu_s": time.process_time() - cpu0}
    server.stop(0).wait()
    learner.stop(checkpoint=False)
    ready.put(status)


def _bare_grpc_main(ready: Any, stop: Any) -> None:
    """A gRPC server with the learner's method names that only drains the chunks (no checks)."""
    from concurrent import futures

    import grpc

    from learner.server import GRPC_OPTIONS, SERVICE_NAME
    from proto import l2o_pb2

    ack = l2o_pb2.Ack(accepted=True).SerializeToString()

    def drain(requests: Any, context: Any) -> bytes:
        for _ in requests:
            pass
        return ack

    handlers = {
        "PushGradient": grpc.stream_unary_rpc_method_handler(drain),
        "PushSmallGradient": grpc.unary_unary_rpc_method_handler(lambda r, c: ack),
    }
    server = grpc.server(futures.ThreadPoolExecutor(16), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ready.put(port)
    stop.wait()
    server.stop(0).wait()


def bench_bare_grpc(n: int, clients: int, seconds: float, max_messages: int) -> dict[str, Any]:
    """The client's pushes to a server that only drains them: gRPC's own cost, for reference."""
    from services.client import LearnerClient

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_bare_grpc_main, args=(ready, stop), daemon=True)
    proc.start()
    port = ready.get(timeout=120)
    theta = make_theta(n)
    grad = {"net": {"w": np.full_like(theta["net"]["w"], 1e-3),
                    "b": np.full_like(theta["net"]["b"], 1e-3)},
            "out": np.full_like(theta["out"], 1e-3)}
    conns = [LearnerClient(f"127.0.0.1:{port}", None, RUN) for _ in range(clients)]

    def send_one(t: int, i: int) -> None:
        conns[t].push_gradient(grad, theta_version=0, gen_id=0, incarnation=0,
                               worker_id=f"w{t}", seq=i)

    for t in range(clients):
        send_one(t, -1)
    count, wall = _run_clients(clients, seconds, max_messages, send_one)
    for c in conns:
        c.close()
    stop.set()
    proc.join(30)
    return {"gradients": count, "seconds": wall, "gradients_per_s": count / wall,
            "mb_per_s": count * 4 * n / wall / 1e6}


def _socket_main(ready: Any, stop: Any) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    ready.put(srv.getsockname()[1])

    def handle(conn: socket.socket) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        with conn:
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    return
                (left,) = struct.unpack("<Q", head)
                if len(buf) < left:
                    buf = bytearray(left)
                    view = memoryview(buf)
                got = 0
                while got < left:
                    k = conn.recv_into(view[got:left])
                    if not k:
                        return
                    got += k
                conn.sendall(b"k")

    srv.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
    srv.close()


def _run_clients(clients: int, seconds: float, max_messages: int, send_one: Any
                 ) -> tuple[int, float]:
    """Each thread calls ``send_one(thread, i)`` until the time or message budget is spent."""
    count = [0] * clients
    deadline = [0.0]
    start_barrier = threading.Barrier(clients + 1)

    def loop(t: int) -> None:
        start_barrier.wait()
        i = 0
        while time.perf_counter() < deadline[0] and sum(count) < max_messages:
            send_one(t, i)
            i += 1
            count[t] += 1

    threads = [threading.Thread(target=loop, args=(t,)) for t in range(clients)]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start_barrier.wait()
    for th in threads:
        th.join()
    return sum(count), time.perf_counter() - t0


def bench_grpc(n: int, clients: int, seconds: float, max_messages: int, batch_size: int
               ) -> dict[str, Any]:
    """Push gradients of θ with ``n`` floats through the real learner server."""
    from services.client import LearnerClient, reason_name

    ctx = mp.get_context("spawn")
    ready, mark, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_learner_main, args=(n, batch_size, ready, mark, stop),
                       daemon=True)
    proc.start()
    port = ready.get(timeout=120)
    theta = make_theta(n)
    grad = {"net": {"w": np.full_like(theta["net"]["w"], 1e-3),
                    "b": np.full_like(theta["net"]["b"], 1e-3)},
            "out": np.full_like(theta["out"], 1e-3)}
    nbytes = 4 * n
    conns = [LearnerClient(f"127.0.0.1:{port}", TOKEN, RUN) for _ in range(clients)]
    conns[0].wait_ready(60)
    incarnation = conns[0].status()["incarnation"]
    refused: dict[str, int] = {}

    def send_one(t: int, i: int) -> None:
        ack = conns[t].push_gradient(grad, theta_version=0, gen_id=0, incarnation=incarnation,
                                     worker_id=f"w{t}", seq=i,
                                     estimator="bench", inner_steps=1, mean_inner_loss=0.0)
        if not ack.accepted:
            refused[reason_name(ack)] = refused.get(reason_name(ack), 0) + 1

    for t in range(clients):  # warm-up: connections, jit of the meta-update
        send_one(t, -1)
    mark.set()
    cpu0 = time.process_time()
    count, wall = _run_clients(clients, seconds, max_messages, send_one)
    client_cpu = time.process_time() - cpu0
    for c in conns:
        c.close()
    stop.set()
    status = ready.get(timeout=120)
    proc.join(30)
    return {"gradients": count, "seconds": wall, "gradients_per_s": count / wall,
            "mb_per_s": count * nbytes / wall / 1e6, "refused": refused,
            "learner_updates": status["updates"], "learner_accepted": status["accepted"],
            "client_cpu_ms_per_gradient": 1e3 * client_cpu / max(count, 1),
            "learner_cpu_ms_per_gradient": 1e3 * status["cpu_s"] / max(count, 1)}


def bench_socket(n: int, clients: int, seconds: float, max_messages: int) -> dict[str, Any]:
    """Move the same bytes per message over a raw loopback TCP socket."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_socket_main, args=(ready, stop), daemon=True)
    proc.start()
    port = ready.get(timeout=60)
    payload = np.full(n, 1e-3, np.float32)
    view = memoryview(payload.view(np.uint8))
    socks = []
    for _ in range(clients):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)

    def send_one(t: int, i: int) -> None:
        s = socks[t]
        s.sendall(struct.pack("<Q", view.nbytes))
        s.sendall(view)
        if s.recv(1) != b"k":
            raise RuntimeError("socket server went away")

    send_one(0, -1)
    count, wall = _run_clients(clients, seconds, max_messages, send_one)
    for s in socks:
        s.close()
    stop.set()
    proc.join(30)
    return {"gradients": count, "seconds": wall, "gradients_per_s": count / wall,
            "mb_per_s": count * 4 * n / wall / 1e6}


def main(argv: list[str] | None = None) -> int:
    """Run both sizes, print a table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--out", default="benchmarks/results/learner_ingest.json")
    args = parser.parse_args(argv)
    cases = [
        # name, floats, client threads, message cap, learner batch_size
        ("5k", 5_000, 4, 100_000, 8),
        ("10M", 10_000_000, 2, 400, 4),
    ]
    rows = []
    for name, n, clients, cap, batch in cases:
        grpc_r = bench_grpc(n, clients, args.seconds, cap, batch)
        bare_r = bench_bare_grpc(n, clients, args.seconds, cap)
        sock_r = bench_socket(n, clients, args.seconds, cap)
        rows.append({"theta": name, "floats": n, "bytes_per_gradient": 4 * n,
                     "clients": clients, "batch_size": batch, "grpc": grpc_r,
                     "bare_grpc": bare_r, "socket": sock_r,
                     "mb_per_s_ratio": grpc_r["mb_per_s"] / sock_r["mb_per_s"],
                     "bare_grpc_mb_per_s_ratio": bare_r["mb_per_s"] / sock_r["mb_per_s"]})
    print("learner = the real server; bare gRPC = same client and messages, server only drains")
    print(f"{'theta':>6} {'learner grad/s':>15} {'MB/s':>8} {'bare gRPC grad/s':>17} {'MB/s':>8} "
          f"{'socket grad/s':>14} {'MB/s':>8} {'learner/socket':>15}")
    for r in rows:
        g, b, s = r["grpc"], r["bare_grpc"], r["socket"]
        print(f"{r['theta']:>6} {g['gradients_per_s']:>15.1f} {g['mb_per_s']:>8.1f} "
              f"{b['gradients_per_s']:>17.1f} {b['mb_per_s']:>8.1f} "
              f"{s['gradients_per_s']:>14.1f} {s['mb_per_s']:>8.1f} {r['mb_per_s_ratio']:>15.2f}")
    for r in rows:
        g = r["grpc"]
        print(f"{r['theta']}: CPU per gradient: client {g['client_cpu_ms_per_gradient']:.2f} ms, "
              f"learner {g['learner_cpu_ms_per_gradient']:.2f} ms; refused {g['refused']}")
    small, large = rows[0], rows[1]
    targets = {
        "small_gradients_per_s>=1000": small["grpc"]["gradients_per_s"] >= 1000,
        "large_mb_per_s_ratio>=0.5": large["mb_per_s_ratio"] >= 0.5,
    }
    print("targets:", ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "learner_ingest", "rows": rows, "targets": targets,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "seconds_per_measurement": args.seconds, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                       time.gmtime()),
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
