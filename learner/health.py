"""``python -m learner.health [HOST:PORT]``: exit 0 when the learner there is serving.

A container health check (docker-compose.yml) through standard gRPC health checking
(``grpc.health.v1.Health/Check`` of the whole server, which the learner's server marks serving
with its service), which needs no bearer token; exit 1 with one line on stderr otherwise.
Plain-text gRPC only (a learner without ``service.tls_*``). It imports gRPC only, not the
learner (nor JAX), so it is cheap to run every few seconds.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, timeout_s: float = 5.0) -> str:
    """The learner's health status at ``address`` (``SERVING``, ``NOT_SERVING``…); raises
    :class:`grpc.RpcError` when it does not answer within ``timeout_s``."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    """The command line: exit 0 when ``SERVING``."""
    p = argparse.ArgumentParser(prog="python -m learner.health", description=__doc__)
    p.add_argument("address", nargs="?", default="localhost:50051", help="HOST:PORT")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")
    args = p.parse_args(argv)
    try:
        status = check(args.address, args.timeout)
    except grpc.RpcError as e:
        print(f"learner at {args.address}: {e.code().name}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"learner at {args.address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
