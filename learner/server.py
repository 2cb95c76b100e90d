"""The gRPC server around a :class:`~learner.core.Learner` (service ``l2o.v1.Learner``).

:func:`serve` starts it with bearer-token authentication, optional TLS, gRPC health checking
(``SERVING``), server reflection and keepalive (a dead client's connection is closed). A refused
gradient is answered with an ``Ack`` carrying the reason, never a gRPC error, so the worker learns
why. The header of a pushed gradient is checked
(run, generation, staleness, duplicate, size limit, manifest against θ) before any tensor bytes are
taken in, and the bytes are collected into a buffer of exactly the declared size, so an oversized
or mismatched push is refused without being buffered.

A stalled client holds no thread for long: at most ``max_push_streams`` ``PushGradient`` streams
are served at once, and at most ``max_push_streams_per_client`` from one client (one connection,
as gRPC's ``peer()`` names it), so one client cannot take every slot; more are answered
RESOURCE_EXHAUSTED, to be retried later. A stream that
sends nothing for ``stream_idle_s`` seconds is cancelled by a :class:`StreamWatchdog` (its partial
gradient is dropped), and the server has threads to spare beyond the pushes, so ``Status``,
``FetchTheta`` and health checks answer while pushes hang.

Methods: ``FetchTheta`` (server stream of θ chunks, or one ``unchanged`` chunk),
``PushGradient`` (client stream of gradient chunks → ``Ack``), ``PushSmallGradient`` (the same in
one message, for gradients that fit in one chunk) and ``Status``. Requests and replies are the
generated classes of ``proto/l2o_pb2.py``; :func:`add_learner_servicer` registers them with a
gradient-chunk parser that turns an unparsable message into a MALFORMED ``Ack``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from learner.core import GradientHeader, Learner, SubmitResult
from proto import l2o_pb2
from proto.wire import (
    DEFAULT_CHUNK_BYTES,
    ByteAssembler,
    Reason,
    TreeTemplate,
    WireError,
    check_manifest,
    flatten_tree,
    manifest_from_proto,
    manifest_to_proto,
    theta_messages,
    total_bytes,
)
from services.auth import BearerTokenInterceptor, server_credentials

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The full name of the learner service, as health checking and reflection know it.
SERVICE_NAME = l2o_pb2.DESCRIPTOR.services_by_name["Learner"].full_name

#: Per-message limit on both sides: a chunk (≤ 1 MiB) plus a manifest of many tensors.
GRPC_MESSAGE_LIMIT = 64 << 20

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
    ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
    # fewer, larger HTTP/2 frames and a wider window for megabyte chunks
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    ("grpc.http2.lookahead_bytes", 16 << 20),
]

#: Both sides ping a connection every 30 s (idle or not) and close it when a ping goes unanswered
#: for 10 s, so a peer that died or froze (SIGSTOP, a lost host) fails its calls with UNAVAILABLE
#: instead of leaving them waiting.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

#: The channel options of a learner client.
CLIENT_OPTIONS = GRPC_OPTIONS + KEEPALIVE_OPTIONS

#: The server's options: it accepts a client's pings down to every 10 s (clients send one every
#: 30 s; a client pinging faster is warned off by GOAWAY). Every 10 minutes a connection is asked
#: to move (GOAWAY: clients reconnect by themselves) and calls still open on it 10 minutes later
#: are cancelled: the last bound on a call that stalls before its handler runs (a unary request
#: whose message never completes holds a thread that no handler-side limit can free).
SERVER_OPTIONS = GRPC_OPTIONS + KEEPALIVE_OPTIONS + [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_connection_age_ms", 600_000),
    ("grpc.max_connection_age_grace_ms", 600_000),
]

#: ``PushGradient`` streams served at once; one more is answered RESOURCE_EXHAUSTED.
MAX_PUSH_STREAMS = 8
#: ``PushGradient`` streams one client (connection) may have served at once: a worker pushes one
#: gradient at a time, plus a retry that may overlap a push it gave up on.
MAX_PUSH_STREAMS_PER_CLIENT = 2
#: Seconds a ``PushGradient`` stream may send nothing before it is cancelled.
STREAM_IDLE_S = 30.0
#: Server threads beyond the push streams' (``Status``, ``FetchTheta``, health, small pushes).
SPARE_THREADS = 8


def header_from_proto(h: l2o_pb2.GradientHeader) -> GradientHeader:
    """The learner's :class:`GradientHeader` of a wire header."""
    return GradientHeader(run_id=h.run_id, theta_version=int(h.theta_version),
                          gen_id=int(h.gen_id), worker_id=h.worker_id, seq=int(h.seq),
                          incarnation=int(h.incarnation), estimator=h.estimator,
                          inner_steps=int(h.inner_steps), mean_inner_loss=float(h.mean_inner_loss))


def ack_from_result(result: SubmitResult) -> l2o_pb2.Ack:
    """The wire ``Ack`` of a learner result."""
    return l2o_pb2.Ack(accepted=result.accepted, reason=int(result.reason), detail=result.detail,
                       version=result.version)


@dataclass(frozen=True)
class Unparsable:
    """A pushed message that is not a ``GradientChunk``; the push is refused as MALFORMED."""

    detail: str


def parse_gradient_chunk(message: bytes) -> l2o_pb2.GradientChunk | Unparsable:
    """A serialized ``GradientChunk``; never raises (gRPC would fail the call, and the worker
    would not learn why), an unparsable message comes back as :class:`Unparsable`."""
    try:
        return l2o_pb2.GradientChunk.FromString(message)
    except DecodeError as e:
        return Unparsable(f"unparsable GradientChunk: {e}")


class StreamWatchdog:
    """Cancels the calls whose request streams have sent nothing for ``idle_s`` seconds.

    :meth:`watch` registers a call; its chunks, passed through the returned wrapper, are its signs
    of life, and once they are all read the call is no longer watched (what follows, such as
    waiting for room in the learner's buffer, is the server's time, not the client's). One thread
    checks the registered calls, and only while there are any.
    """

    def __init__(self, idle_s: float):
        if idle_s <= 0:
            raise ValueError(f"idle_s must be positive, got {idle_s}")
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._last: dict[grpc.ServicerContext, float] = {}
        self._expired: set[grpc.ServicerContext] = set()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, context: grpc.ServicerContext
              ) -> Iterator[Callable[[Iterator[T]], Iterator[T]]]:
        """Watch ``context``'s call for the ``with`` block; yields ``alive(chunks)``, which
        passes ``chunks`` through, each one resetting the idle clock."""

        def alive(chunks: Iterator[T]) -> Iterator[T]:
            for chunk in chunks:
                with self._lock:
                    if context in self._last:  # not cancelled yet
                        self._last[context] = time.monotonic()
                yield chunk
            self._forget(context)

        with self._lock:
            self._last[context] = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="learner-stream-watchdog")
                self._thread.start()
        try:
            yield alive
        finally:
            self._forget(context)
            with self._lock:
                self._expired.discard(context)

    def _forget(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._last.pop(context, None)

    def expired(self, context: grpc.ServicerContext) -> bool:
        """Whether the watchdog cancelled ``context``'s call."""
        with self._lock:
            return context in self._expired

    def _run(self) -> None:
        period = min(self.idle_s / 4, 1.0)
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                if not self._last:
                    self._thread = None
                    return
                idle = [c for c, t in self._last.items() if now - t > self.idle_s]
                for c in idle:
                    del self._last[c]
                self._expired.update(idle)
            for context in idle:
                context.cancel()


class LearnerServicer:
    """Serves one learner: θ downloads, gradient uploads and status.

    Its push methods take ``GradientChunk`` messages or :class:`Unparsable`: register it with
    :func:`add_learner_servicer`, not the generated ``add_LearnerServicer_to_server``.
    """

    def __init__(self, learner: Learner, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *,
                 max_push_streams: int = MAX_PUSH_STREAMS, stream_idle_s: float = STREAM_IDLE_S,
                 max_push_streams_per_client: int = MAX_PUSH_STREAMS_PER_CLIENT):
        self.learner = learner
        self.chunk_bytes = chunk_bytes
        self.max_push_streams = max_push_streams
        self.max_push_streams_per_client = max_push_streams_per_client
        self._push_slots = threading.BoundedSemaphore(max_push_streams)
        self._per_client: Counter[str] = Counter()  # peer -> its pushes being served
        self._per_client_lock = threading.Lock()
        self.watchdog = StreamWatchdog(stream_idle_s)
        self.template = TreeTemplate(learner.theta)
        self._cache_lock = threading.Lock()
        self._cache: tuple[int, int, list[l2o_pb2.ThetaChunk]] | None = None

    def _encoded(self, version: int, gen_id: int, theta: Any) -> list[l2o_pb2.ThetaChunk]:
        """θ's chunk messages, built once per version."""
        with self._cache_lock:
            if self._cache is None or self._cache[:2] != (version, gen_id):
                manifest, views = flatten_tree(theta)
                header = l2o_pb2.ThetaHeader(
                    run_id=self.learner.run_id, version=version, gen_id=gen_id,
                    incarnation=self.learner.incarnation,
                    manifest=manifest_to_proto(manifest), total_bytes=total_bytes(manifest))
                self._cache = (version, gen_id,
                               list(theta_messages(version, header, views, self.chunk_bytes)))
            return self._cache[2]

    def FetchTheta(self, request: l2o_pb2.FetchRequest, context: grpc.ServicerContext
                   ) -> Iterator[l2o_pb2.ThetaChunk]:
        """θ in chunks, or one ``unchanged`` chunk when the caller already has this version of
        this incarnation: a caller whose θ came from an earlier learner (``have_incarnation``
        differs) always gets θ, whatever its ``have_version``.
        """
        learner = self.learner
        if request.run_id != learner.run_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"WRONG_RUN: run {request.run_id!r}, the learner serves "
                          f"{learner.run_id!r}")
        version, gen_id, theta = learner.snapshot()
        if request.have_version == version and request.have_incarnation == learner.incarnation:
            yield l2o_pb2.ThetaChunk(unchanged=True, version=version)
            return
        yield from self._encoded(version, gen_id, theta)

    def PushGradient(self, request_iterator: Iterator[l2o_pb2.GradientChunk | Unparsable],
                     context: grpc.ServicerContext) -> l2o_pb2.Ack:
        """Take one gradient; the ``Ack`` says accepted or why not.

        RESOURCE_EXHAUSTED when ``max_push_streams`` pushes are in progress, or
        ``max_push_streams_per_client`` from this client; a stream idle for ``stream_idle_s`` is
        cancelled and what it sent is dropped."""
        peer = context.peer()
        with self._per_client_lock:
            mine = self._per_client[peer] < self.max_push_streams_per_client
            if mine:
                self._per_client[peer] += 1
        if not mine:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_push_streams_per_client} gradient pushes of this client in "
                          "progress; retry later")
        if not self._push_slots.acquire(blocking=False):
            self._release_client(peer)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_push_streams} gradient pushes in progress; retry later")
        try:
            with self.watchdog.watch(context) as alive:
                try:
                    return ack_from_result(self._push(alive(request_iterator)))
                except grpc.RpcError:  # the call ended under us: the client left, or idled
                    if self.watchdog.expired(context):
                        log.warning("a gradient push from %s sent nothing for %.0f s: cancelled",
                                    context.peer(), self.watchdog.idle_s)
                    raise
        finally:
            self._push_slots.release()
            self._release_client(peer)

    def _release_client(self, peer: str) -> None:
        with self._per_client_lock:
            self._per_client[peer] -= 1
            if self._per_client[peer] <= 0:
                del self._per_client[peer]

    def PushSmallGradient(self, request: l2o_pb2.GradientChunk | Unparsable,
                          context: grpc.ServicerContext) -> l2o_pb2.Ack:
        """Take one gradient sent as a single chunk (header and all bytes)."""
        return ack_from_result(self._push(iter((request,))))

    def _push(self, chunks: Iterator[l2o_pb2.GradientChunk | Unparsable]) -> SubmitResult:
        learner = self.learner
        first = next(chunks, l2o_pb2.GradientChunk())
        if isinstance(first, Unparsable):
            return learner.reject(Reason.MALFORMED, first.detail)
        if not first.HasField("header"):
            return learner.reject(Reason.MALFORMED, "the first chunk carries no header")
        header = header_from_proto(first.header)
        try:
            manifest = manifest_from_proto(first.header.manifest)
            total = check_manifest(manifest, max_bytes=learner.config.max_message_bytes)
            if first.header.total_bytes != total:
                raise WireError(Reason.MALFORMED, f"total_bytes {first.header.total_bytes} but "
                                                  f"the manifest describes {total}")
        except WireError as e:
            return learner.reject(e.reason, e.detail)
        early = learner.precheck(header, total)
        if early is not None:
            return early
        try:
            self.template.check(manifest)
            asm = ByteAssembler(manifest, checked=True)
            asm.add(first.data)
            for chunk in chunks:
                if isinstance(chunk, Unparsable):
                    raise WireError(Reason.MALFORMED, chunk.detail)
                if chunk.HasField("header"):
                    raise WireError(Reason.MALFORMED, "a second header in one gradient stream")
                asm.add(chunk.data)
            grad = asm.finish(like=self.template)
        except WireError as e:
            return learner.reject(e.reason, e.detail)
        try:
            return learner.submit(grad, header)
        except Exception as e:  # never leave the worker guessing
            log.exception("submit failed")
            return learner.reject(Reason.INTERNAL, f"{type(e).__name__}: {e}")

    def Status(self, request: l2o_pb2.StatusRequest, context: grpc.ServicerContext
               ) -> l2o_pb2.StatusReply:
        """The learner's figures."""
        s = self.learner.status()
        return l2o_pb2.StatusReply(
            run_id=s["run_id"], version=s["version"], gen_id=s["gen_id"], updates=s["updates"],
            buffer_depth=s["buffer_depth"], staleness_mean=s["staleness_mean"],
            staleness_max=s["staleness_max"], accepted=s["accepted"],
            dropped_stale=s["dropped_stale"], dropped_oldest=s["dropped_oldest"],
            rejected=s["rejected"], duplicate=s["duplicate"], unique_workers=s["unique_workers"],
            gradients_per_second=s["gradients_per_second"], last_meta_loss=s["last_meta_loss"],
            rejected_by_reason=s["rejected_by_reason"], worker_last_seq=s["worker_last_seq"],
            applied=s["applied"], incarnation=s["incarnation"],
            failed_updates=s["failed_updates"], skipped_nonfinite=s["skipped_nonfinite"],
            last_error=s["last_error"], fatal_error=s["fatal_error"],
            dropped_at_stop=s["dropped_at_stop"],
        )


def add_learner_servicer(servicer: LearnerServicer, server: grpc.Server) -> None:
    """Register ``servicer`` under ``l2o.v1.Learner``; pushed chunks are parsed by
    :func:`parse_gradient_chunk`, everything else by the generated classes."""
    handlers = {
        "FetchTheta": grpc.unary_stream_rpc_method_handler(
            servicer.FetchTheta, request_deserializer=l2o_pb2.FetchRequest.FromString,
            response_serializer=l2o_pb2.ThetaChunk.SerializeToString),
        "PushGradient": grpc.stream_unary_rpc_method_handler(
            servicer.PushGradient, request_deserializer=parse_gradient_chunk,
            response_serializer=l2o_pb2.Ack.SerializeToString),
        "PushSmallGradient": grpc.unary_unary_rpc_method_handler(
            servicer.PushSmallGradient, request_deserializer=parse_gradient_chunk,
            response_serializer=l2o_pb2.Ack.SerializeToString),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status, request_deserializer=l2o_pb2.StatusRequest.FromString,
            response_serializer=l2o_pb2.StatusReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def serve(learner: Learner, host: str, port: int, token: str | None,
          tls_cert: str | None = None, tls_key: str | None = None,
          max_workers: int | None = None, *, allow_no_token: bool = False,
          chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_push_streams: int = MAX_PUSH_STREAMS,
          stream_idle_s: float = STREAM_IDLE_S,
          max_push_streams_per_client: int = MAX_PUSH_STREAMS_PER_CLIENT
          ) -> tuple[grpc.Server, int]:
    """Start the learner's gRPC server on ``host:port`` (0: a free port); ``(server, bound_port)``.

    Every RPC but health checks and reflection needs ``authorization: Bearer <token>``. A missing
    token is refused unless ``allow_no_token`` (then the service is open: local experiments only).
    With ``tls_cert`` and ``tls_key`` the port speaks TLS. ``max_push_streams`` gradient pushes are
    served at once (``max_push_streams_per_client`` from one connection), each cancelled after
    ``stream_idle_s`` seconds without a chunk, on ``max_workers`` threads (default:
    :data:`SPARE_THREADS` more, which keep ``Status`` and health
    checks answering; it must exceed ``max_push_streams``). Stop it with ``server.stop(grace)``.
    """
    if not token and not allow_no_token:
        raise ValueError("serve() needs a bearer token (or allow_no_token=True)")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both tls_cert and tls_key")
    if max_push_streams < 1:
        raise ValueError(f"max_push_streams must be at least 1, got {max_push_streams}")
    if max_workers is None:
        max_workers = max_push_streams + SPARE_THREADS
    if max_workers <= max_push_streams:
        raise ValueError(f"max_workers {max_workers} leaves no thread beside "
                         f"{max_push_streams} push streams for Status and health checks")
    interceptors = [BearerTokenInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="learner-rpc"),
                         interceptors=interceptors, options=SERVER_OPTIONS)
    add_learner_servicer(LearnerServicer(
        learner, chunk_bytes, max_push_streams=max_push_streams, stream_idle_s=stream_idle_s,
        max_push_streams_per_client=max_push_streams_per_client), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = format_address(host, port)
    if tls_cert is not None:
        bound = server.add_secure_port(address, server_credentials(tls_cert, tls_key))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise RuntimeError(f"could not bind the learner server to {address}")
    server.start()
    log.info("learner %s serving on %s", learner.run_id, format_address(host, bound))
    return server, bound
