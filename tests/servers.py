"""Real servers the tests start on loopback: an external-style Redis and an S3-compatible
object store (moto's server mode)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis

from services.redis_server import redis_server_binary

PASSWORD = "s3cret-pw"


class ExternalRedis:
    """A ``redis-server`` on a loopback TCP port with a password and AOF (everysec) in ``dir``;
    :meth:`kill` SIGKILLs it and :meth:`start` starts it again on the same port and data."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start the server and wait until it answers."""
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--requirepass", PASSWORD, "--appendonly", "yes", "--appendfsync", "everysec",
             "--dir", str(self.dir), "--save", "", "--databases", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                probe.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server (no save, no clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Kill the server for good."""
        self.kill()

@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment (so in the processes it starts), then the
    environment as it was."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: the fake credentials the S3 server takes (moto accepts any)
S3_SECRET = "moto-secret-key-not-for-logs"


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port, with ``AWS_*`` credentials and
    ``AWS_ENDPOINT_URL`` pointing at it set in this process's environment (and so in the Ray
    nodes and actors started from it) for the duration; yields a fresh bucket's ``s3://`` URL."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "l2o-test", "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    bucket = f"l2o-{uuid.uuid4().hex[:8]}"
    try:
        with environment(env):
            S3FileSystem.clear_instance_cache()  # none bound to another test's server
            S3FileSystem().mkdir(bucket)
            yield f"s3://{bucket}"
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()
