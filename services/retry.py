"""The one retry policy of the service's network calls: gRPC to the learner and Redis.

A :class:`RetryPolicy` says how to back off (exponential delays from ``initial_s``, doubling up to
``max_s``, each scaled by a random factor in ``[1 - jitter, 1]``) and for how long: no retry
starts whose sleep would end past ``deadline_s`` after the first attempt. :func:`retry_call`
runs a call under a policy with tenacity, retrying only errors that :func:`is_transient` (or the
caller's predicate) calls transient; at the deadline it raises :class:`RetryGaveUp`, naming what
was retried, how many times, for how long and the last error. :func:`poll_until` waits for a
condition under the same backoff. :class:`DeadlineRetry` is a policy as redis-py's own
``Retry``, with which a Redis client retries each command by itself.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import redis
import tenacity
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

T = TypeVar("T")


def env_seconds(name: str, default: float) -> float:
    """``$name`` as a positive number of seconds, else ``default``."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${name} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"${name} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff until a deadline (seconds throughout)."""

    deadline_s: float
    initial_s: float = 0.1
    max_s: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.deadline_s < 0 or self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ValueError(f"a retry policy needs deadline_s >= 0 and 0 < initial_s <= max_s, "
                             f"got {self}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must lie in [0, 1], got {self.jitter}")

    def backoff(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1, 2, …), before jitter."""
        return min(self.max_s, self.initial_s * 2 ** (retry - 1))


#: A learner that is away (a restart): the driver's status polls and a worker's fetch and push.
LEARNER_RESTART = RetryPolicy(deadline_s=300.0)

#: gRPC codes that mean "not reachable right now". UNKNOWN and INTERNAL are in: a learner killed
#: mid-stream can surface as "Stream removed".
TRANSIENT_GRPC_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


class RetryGaveUp(Exception):
    """A call still failed with a transient error when its retry deadline came."""

    def __init__(self, what: str, attempts: int, elapsed_s: float, last_error: BaseException):
        super().__init__(f"{what}: gave up after {attempts} attempt(s) in {elapsed_s:.1f} s: "
                         f"{describe(last_error)}")
        self.what = what
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.last_error = last_error


class RetryAborted(Exception):
    """The caller's ``abort`` said stop while a call was being retried."""


def grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status code ``exc`` carries (a ``grpc.RpcError`` or an error with ``.code``)."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            code = code()
        except Exception:  # noqa: BLE001 - an RpcError without a status
            code = None
    return code if isinstance(code, grpc.StatusCode) else None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` later may succeed: connection and timeout errors (Python's and
    redis-py's, but not a refused password) and gRPC's :data:`TRANSIENT_GRPC_CODES`.
    UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT and the like are not, and neither is a
    missing or unreadable file (a TLS certificate, say): a configuration error."""
    if isinstance(exc, redis.AuthenticationError | FileNotFoundError | PermissionError |
                  IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError | redis.ConnectionError |
                  redis.TimeoutError):
        return True
    code = grpc_code(exc)
    if code is not None:
        return code in TRANSIENT_GRPC_CODES
    return isinstance(exc, OSError)


def describe(exc: BaseException) -> str:
    """One line for ``exc``: ``CODE: details`` for a gRPC error, else ``Type: message``."""
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "details", None)):
        code = grpc_code(exc)
        return f"{code.name if code else 'UNKNOWN'}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class _JitteredBackoff(tenacity.wait.wait_base):
    """:meth:`RetryPolicy.backoff` times a random factor in ``[1 - jitter, 1]``."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        p = self.policy
        return p.backoff(retry_state.attempt_number) * random.uniform(1 - p.jitter, 1)


def _stop(policy: RetryPolicy, abort: Callable[[], bool] | None) -> tenacity.stop.stop_base:
    """Stop before a sleep that would end past the deadline, or once ``abort()`` is true."""
    stop = tenacity.stop_before_delay(policy.deadline_s)
    return stop if abort is None else tenacity.stop_any(stop, lambda _: abort())


def retrying(what: str, policy: RetryPolicy, *,
             transient: Callable[[BaseException], bool] = is_transient,
             on_transient: Callable[[BaseException], None] | None = None,
             before_retry: Callable[[], None] | None = None,
             abort: Callable[[], bool] | None = None,
             gave_up: type[RetryGaveUp] = RetryGaveUp,
             sleep: Callable[[float], None] = time.sleep) -> tenacity.Retrying:
    """A tenacity ``Retrying`` that calls a function under ``policy``.

    A ``transient`` error is retried: ``on_transient(error)`` is called, and ``before_retry()``
    just before the next attempt (to reconnect, say). Any other error propagates at once. When
    the deadline comes the call raises ``gave_up`` (:class:`RetryGaveUp` or a subclass) naming
    ``what``; when ``abort()`` turns true after a failure it raises :class:`RetryAborted`.
    """

    def after(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception()
        log.debug("%s: attempt %d failed: %s", what, state.attempt_number, describe(error))
        if on_transient is not None:
            on_transient(error)

    def give_up(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception()
        if abort is not None and abort():
            raise RetryAborted(f"{what}: stopped while retrying ({describe(error)})") from error
        raise gave_up(what, state.attempt_number, state.seconds_since_start or 0.0,
                      error) from error

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(transient), wait=_JitteredBackoff(policy),
        stop=_stop(policy, abort),
        before=(None if before_retry is None
                else lambda state: before_retry() if state.attempt_number > 1 else None),
        after=after, retry_error_callback=give_up, sleep=sleep)


def retry_call(fn: Callable[[], T], what: str, policy: RetryPolicy, **kwargs: Any) -> T:
    """``fn()`` under ``policy``; ``kwargs`` as for :func:`retrying`."""
    return retrying(what, policy, **kwargs)(fn)


def poll_until(done: Callable[[], bool], policy: RetryPolicy, *,
               abort: Callable[[], bool] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> bool:
    """Call ``done()`` until it returns true, backing off under ``policy``; false when the
    deadline comes or ``abort()`` turns true first. An error of ``done`` propagates."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda ok: not ok), wait=_JitteredBackoff(policy),
        stop=_stop(policy, abort), retry_error_callback=lambda _: False, sleep=sleep)(done)


class RedisUnavailable(RetryGaveUp):
    """Redis did not answer within its outage deadline (a restart that took too long, or gone)."""


class DeadlineRetry(Retry):
    """``policy`` as redis-py's ``Retry``, which a Redis client applies to every command: the
    full-jitter ``ExponentialWithJitterBackoff`` (each delay random in ``[0, backoff]``), bounded
    by wall time (``policy.deadline_s`` from a command's first attempt) rather than by a count,
    which fast errors (a refused connection) would use up long before the deadline. Past it:
    :class:`RedisUnavailable`, naming ``what``."""

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        # redis-py's n-th delay is random in [0, min(cap, base * 2**n)]: base = initial_s / 2
        super().__init__(ExponentialWithJitterBackoff(cap=policy.max_s, base=policy.initial_s / 2),
                         -1)
        self.policy = policy
        self.what = what

    def call_with_retry(self, do, fail, *args, **kwargs):  # noqa: ANN001, ANN201 - redis-py's
        """``do()`` retried as redis-py does; past the deadline :class:`RedisUnavailable`."""
        start = time.monotonic()
        attempts = [0]

        def failed(error: Exception, *rest: Any) -> None:
            fail(error, *rest)
            attempts[0] += 1
            elapsed = time.monotonic() - start
            if elapsed >= self.policy.deadline_s:
                raise RedisUnavailable(self.what, attempts[0], elapsed, error) from error

        return super().call_with_retry(do, failed, *args, **kwargs)
