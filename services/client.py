"""The worker's side of the learner service: fetch θ, push gradients, read status.

:class:`LearnerClient` reconnects by itself: a call that finds the learner ``UNAVAILABLE`` is
retried with jittered exponential backoff for up to ``max_wait_s`` seconds, rediscovering the
address through ``resolve_address`` (e.g. a registry lookup) before each retry, so a worker survives
a learner restart at the same or a new address. A pushed gradient that is retried may already have
been taken the first time; the learner then answers DUPLICATE, which means it is in.

A restarted learner is a new *incarnation* (an id in every θ it sends): :meth:`LearnerClient.fetch`
says which incarnation the θ it holds came from, so θ is sent again in full after a restart even at
an equal version number, and every pushed gradient carries the incarnation of the θ it was
computed on (the learner refuses another one's as STALE_INCARNATION).

No call waits forever: each has a deadline (``rpc_timeout_s``, plus time in proportion to the bytes
of a streamed θ or gradient), the channel pings the learner (keepalive) so a dead or frozen peer
fails the call, and a call that hits its deadline is retried like an unavailable learner. A
configuration error (an address that is not ``host:port``, a missing certificate file) is raised
at once, not retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from learner.server import CLIENT_OPTIONS, SERVICE_NAME
from proto import l2o_pb2, l2o_pb2_grpc
from proto.wire import (
    DEFAULT_CHUNK_BYTES,
    ByteAssembler,
    Reason,
    WireError,
    flatten_tree,
    gradient_messages,
    manifest_from_proto,
    manifest_to_proto,
    total_bytes,
)
from services.auth import auth_metadata, channel_credentials
from services.retry import RetryGaveUp, RetryPolicy, env_seconds, grpc_code, retry_call

log = logging.getLogger(__name__)

T = TypeVar("T")


class LearnerRpcError(RuntimeError):
    """The learner refused a call (other than by being unavailable)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class LearnerAuthError(LearnerRpcError):
    """The learner refused the bearer token (UNAUTHENTICATED)."""


class LearnerUnavailable(RetryGaveUp, ConnectionError):
    """The learner could not be reached within the client's ``max_wait_s`` (a connection error:
    a caller with a longer deadline of its own may retry it)."""


#: The default deadline of a call, in seconds; streams get more in proportion to their bytes.
RPC_TIMEOUT_S = 30.0
#: The slowest transfer a streamed θ or gradient is given time for, in bytes per second.
MIN_STREAM_BYTES_PER_S = 1 << 20
#: The deadline of a θ download whose size is not known yet (the client's first), in seconds.
FIRST_FETCH_TIMEOUT_S = 600.0
#: gRPC target schemes dialled as they are (``dns:///host:port``, ``unix:/path``…).
TARGET_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


def check_address(address: str) -> str:
    """``address`` if it is ``host:port`` (``[v6]:port``) or a gRPC target URI (``dns:``,
    ``unix:``…); else ValueError, a configuration error that no retry would cure."""
    if address.startswith(TARGET_SCHEMES):
        return address
    try:
        parts = urlsplit(f"//{address}")
        ok = bool(parts.hostname) and parts.port is not None and parts.path == "" \
            and not any(c.isspace() for c in address)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"learner address {address!r} is not host:port")
    return address


@dataclass(frozen=True)
class FetchResult:
    """θ as fetched: its version, generation and incarnation, and the tree (None when
    unchanged)."""

    version: int
    gen_id: int
    theta: Any | None
    incarnation: int


def _refusal(error: grpc.RpcError) -> LearnerRpcError:
    """``error`` (not retried) as :class:`LearnerAuthError` or :class:`LearnerRpcError`."""
    code = grpc_code(error) or grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    cls = LearnerAuthError if code == grpc.StatusCode.UNAUTHENTICATED else LearnerRpcError
    return cls(code, details)


def reason_name(ack: l2o_pb2.Ack) -> str:
    """The name of an ``Ack``'s reason (``"OK"``, ``"STALE"``, …)."""
    return Reason(ack.reason).name


class LearnerClient:
    """A connection to one run's learner.

    Args:
        address: ``host:port`` of the learner.
        token: the bearer token (None: send none).
        run_id: the run; θ and gradients of other runs are refused.
        root_cert: PEM file of the root certificate to trust; given, the channel uses TLS.
        resolve_address: called before each reconnect for the learner's current address.
        max_wait_s: how long a call keeps retrying an unavailable learner before
            :class:`LearnerUnavailable`.
        backoff_initial_s, backoff_max_s: the retry delays (doubling, jitter in [½, 1]×).
        chunk_bytes: the size of the chunks a gradient is cut into.
        like: template tree for fetched θ (default: nested dicts/lists rebuilt from the paths).
        rpc_timeout_s: the deadline of each call (default ``$L2O_RPC_TIMEOUT_S``, else
            :data:`RPC_TIMEOUT_S`); a streamed θ or gradient gets
            ``min_stream_bytes_per_s`` more time per byte (a first θ download of unknown size,
            without ``like``, :data:`FIRST_FETCH_TIMEOUT_S`). A call past its deadline is
            retried.
        min_stream_bytes_per_s: the slowest transfer rate a stream is given time for.

    Calls that fail with UNAVAILABLE, CANCELLED (as when the learner shuts down mid-call),
    DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED (the learner's push streams are all busy) are
    retried. ValueError at once for an ``address`` that is not ``host:port``, FileNotFoundError
    for a missing ``root_cert``. A client may be shared by threads, but a reconnect replaces
    its channel: give each thread its own client when the learner may restart.
    """

    def __init__(self, address: str, token: str | None, run_id: str,
                 root_cert: str | None = None, *,
                 resolve_address: Callable[[], str] | None = None,
                 max_wait_s: float = 60.0, backoff_initial_s: float = 0.05,
                 backoff_max_s: float = 2.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 like: Any = None, rpc_timeout_s: float | None = None,
                 min_stream_bytes_per_s: float = MIN_STREAM_BYTES_PER_S):
        if rpc_timeout_s is None:
            rpc_timeout_s = env_seconds("L2O_RPC_TIMEOUT_S", RPC_TIMEOUT_S)
        if rpc_timeout_s <= 0 or min_stream_bytes_per_s <= 0:
            raise ValueError("rpc_timeout_s and min_stream_bytes_per_s must be positive")
        self.address = check_address(address)
        self.run_id = run_id
        self.root_cert = root_cert
        self.resolve_address = resolve_address
        #: how calls are retried (``services.retry``): until ``max_wait_s``, doubling delays
        self.retry_policy = RetryPolicy(deadline_s=max_wait_s, initial_s=backoff_initial_s,
                                        max_s=backoff_max_s)
        self.chunk_bytes = chunk_bytes
        self.like = like
        self.rpc_timeout_s = rpc_timeout_s
        self.min_stream_bytes_per_s = min_stream_bytes_per_s
        # θ's size: from the template, else once a download has told it
        self._theta_bytes = None if like is None else total_bytes(flatten_tree(like)[0])
        self._retry_codes = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                             grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED}
        self.last_gen_id = 0
        #: the incarnation of the last θ fetched (0: none yet)
        self.last_incarnation = 0
        self.reconnects = 0
        self._metadata = auth_metadata(token)
        self._channel: grpc.Channel | None = None
        self._connect()

    # --- connection --------------------------------------------------------------------------

    def _connect(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self.root_cert is not None:
            self._channel = grpc.secure_channel(self.address, channel_credentials(self.root_cert),
                                                options=CLIENT_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(self.address, options=CLIENT_OPTIONS)
        stub = l2o_pb2_grpc.LearnerStub(self._channel)
        self._fetch = stub.FetchTheta
        self._push = stub.PushGradient
        self._push_small = stub.PushSmallGradient
        self._status = stub.Status
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _reconnect(self) -> None:
        if self.resolve_address is not None:
            try:
                new = self.resolve_address()
                if new and new != self.address:
                    check_address(new)
                    log.info("learner moved from %s to %s", self.address, new)
                    self.address = new
            except Exception:
                log.exception("resolve_address failed; retrying %s", self.address)
        self.reconnects += 1
        self._connect()

    def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> LearnerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` under the client's retry policy, reconnecting before each retry; a refusal
        as :class:`LearnerRpcError` (:class:`LearnerAuthError` for a refused token)."""
        try:
            return retry_call(fn, f"{what} to learner at {self.address}", self.retry_policy,
                              transient=self._retryable, before_retry=self._reconnect,
                              gave_up=LearnerUnavailable)
        except grpc.RpcError as e:
            raise _refusal(e) from None

    def _stream_timeout(self, nbytes: int | None) -> float:
        """The deadline of a stream of ``nbytes`` (None: not known yet)."""
        if nbytes is None:
            return max(self.rpc_timeout_s, FIRST_FETCH_TIMEOUT_S)
        return self.rpc_timeout_s + nbytes / self.min_stream_bytes_per_s

    def _retryable(self, error: BaseException) -> bool:
        return isinstance(error, grpc.RpcError) and grpc_code(error) in self._retry_codes

    # --- calls -------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the learner's health check says SERVING; :class:`LearnerUnavailable` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout

        def check() -> None:
            remaining = deadline - time.monotonic()
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                       timeout=max(0.05, min(remaining, 5.0)))
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise ConnectionError(f"health status {reply.status}, not SERVING")

        def waiting(error: BaseException) -> bool:
            return isinstance(error, ConnectionError) or grpc_code(error) in (
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

        try:
            retry_call(check, f"Health check of learner at {self.address}",
                       replace(self.retry_policy, deadline_s=timeout), transient=waiting,
                       before_retry=self._reconnect, gave_up=LearnerUnavailable)
        except grpc.RpcError as e:
            raise _refusal(e) from None

    def fetch(self, have_version: int = -1, like: Any = None) -> FetchResult:
        """θ unless the learner's version is ``have_version`` of the incarnation of the last θ this
        client fetched (then ``theta=None``)."""
        like = self.like if like is None else like
        have_incarnation = self.last_incarnation

        def call() -> FetchResult:
            stream = self._fetch(
                l2o_pb2.FetchRequest(run_id=self.run_id, have_version=have_version,
                                     have_incarnation=have_incarnation),
                metadata=self._metadata, timeout=self._stream_timeout(self._theta_bytes))
            first = next(stream, None)
            if first is None:
                raise LearnerRpcError(grpc.StatusCode.DATA_LOSS, "empty θ stream")
            if first.unchanged:
                stream.cancel()
                return FetchResult(int(first.version), self.last_gen_id, None, have_incarnation)
            if not first.HasField("header"):
                stream.cancel()
                raise WireError(Reason.MALFORMED, "the first θ chunk carries no header")
            h = first.header
            self._theta_bytes = int(h.total_bytes)
            asm = ByteAssembler(manifest_from_proto(h.manifest))
            asm.add(first.data)
            for chunk in stream:
                asm.add(chunk.data)
            return FetchResult(int(h.version), int(h.gen_id), asm.finish(like=like),
                               int(h.incarnation))

        result = self._call(call, "FetchTheta")
        if result.theta is not None:
            self.last_gen_id, self.last_incarnation = result.gen_id, result.incarnation
        return result

    def fetch_theta(self, have_version: int = -1) -> tuple[int, Any | None]:
        """``(version, θ)``, θ None when the learner's version equals ``have_version``."""
        r = self.fetch(have_version)
        return r.version, r.theta

    def push_gradient(self, grad_tree: Any, *, theta_version: int, gen_id: int, incarnation: int,
                      worker_id: str | int, seq: int, estimator: str = "",
                      inner_steps: int = 0, mean_inner_loss: float = float("nan")
                      ) -> l2o_pb2.Ack:
        """Stream one gradient computed on θ ``(incarnation, gen_id, theta_version)``; the
        learner's ``Ack`` (``accepted``: taken into its buffer, ``reason``, ``detail``,
        ``version``). A retried push answered DUPLICATE was taken by an earlier attempt."""
        manifest, views = flatten_tree(grad_tree)
        total = total_bytes(manifest)
        header = l2o_pb2.GradientHeader(
            run_id=self.run_id, theta_version=theta_version, gen_id=gen_id,
            incarnation=incarnation,
            worker_id=str(worker_id), seq=seq, estimator=estimator, inner_steps=inner_steps,
            mean_inner_loss=mean_inner_loss, manifest=manifest_to_proto(manifest),
            total_bytes=total)

        def chunks() -> Iterator[l2o_pb2.GradientChunk]:
            return gradient_messages(header, views, self.chunk_bytes)

        if total <= self.chunk_bytes:  # one message: a unary call, cheaper than a stream
            message = next(chunks())
            return self._call(lambda: self._push_small(message, metadata=self._metadata,
                                                       timeout=self.rpc_timeout_s),
                              "PushSmallGradient")
        return self._call(lambda: self._push(chunks(), metadata=self._metadata,
                                             timeout=self._stream_timeout(total)),
                          "PushGradient")

    def status(self) -> dict[str, Any]:
        """The learner's figures as a dict (the fields of ``StatusReply``)."""
        reply = self._call(lambda: self._status(l2o_pb2.StatusRequest(), metadata=self._metadata,
                                                timeout=self.rpc_timeout_s), "Status")
        out: dict[str, Any] = {}
        for f in reply.DESCRIPTOR.fields:
            value = getattr(reply, f.name)
            out[f.name] = dict(value) if f.message_type is not None else value
        return out
