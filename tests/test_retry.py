"""The retry policy (``services.retry``): what is retried, for how long, and how it gives up."""

from __future__ import annotations

import time

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("tenacity")

import redis  # noqa: E402

from services.retry import (  # noqa: E402
    DeadlineRetry,
    RedisUnavailable,
    RetryAborted,
    RetryGaveUp,
    RetryPolicy,
    is_transient,
    poll_until,
    retry_call,
)


class FakeRpcError(grpc.RpcError):
    """A ``grpc.RpcError`` with a status, as a failed call raises it."""

    def __init__(self, code: grpc.StatusCode, details: str = "connection refused") -> None:
        super().__init__()
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def failing(times: int, error: BaseException, result: str = "ok"):
    """A call that raises ``error`` ``times`` times, then returns ``result``; and its call log."""
    calls: list[float] = []

    def call() -> str:
        calls.append(time.monotonic())
        if len(calls) <= times:
            raise error
        return result

    return call, calls


def test_retries_a_transient_error_then_succeeds():
    call, calls = failing(3, FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    slept, failures, reconnects = [], [], []
    policy = RetryPolicy(deadline_s=60.0, initial_s=0.1, max_s=0.3, jitter=0.0)
    out = retry_call(call, "Status", policy, sleep=slept.append, on_transient=failures.append,
                     before_retry=lambda: reconnects.append(len(calls)))
    assert out == "ok" and len(calls) == 4
    assert slept == pytest.approx([0.1, 0.2, 0.3])  # doubling, capped at max_s
    assert len(failures) == 3 and all(isinstance(e, FakeRpcError) for e in failures)
    assert reconnects == [1, 2, 3]  # before each retry, never before the first attempt


def test_jitter_scales_each_delay_into_its_range():
    call, _ = failing(5, ConnectionError("refused"))
    slept: list[float] = []
    retry_call(call, "x", RetryPolicy(deadline_s=60.0, initial_s=0.2, max_s=0.4, jitter=0.5),
               sleep=slept.append)
    bounds = [0.2, 0.4, 0.4, 0.4, 0.4]
    assert all(b / 2 <= s <= b for s, b in zip(slept, bounds, strict=True))


def test_gives_up_at_the_deadline_with_a_clear_message():
    call, calls = failing(10**6, FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect"))
    policy = RetryPolicy(deadline_s=0.3, initial_s=0.02, max_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(RetryGaveUp) as e:
        retry_call(call, "PushGradient to 127.0.0.1:1", policy)
    elapsed = time.monotonic() - t0
    assert 0.2 < elapsed < 0.3 + 0.2  # no sleep that would end past the deadline
    err = e.value
    assert err.attempts == len(calls) > 3 and isinstance(err.last_error, FakeRpcError)
    assert str(err) == (f"PushGradient to 127.0.0.1:1: gave up after {len(calls)} attempt(s) "
                        f"in {err.elapsed_s:.1f} s: UNAVAILABLE: failed to connect")
    assert err.__cause__ is err.last_error


def test_gives_up_as_the_callers_error_class():
    class Unavailable(RetryGaveUp, ConnectionError):
        pass

    call, calls = failing(10**6, TimeoutError("slow"))
    with pytest.raises(Unavailable, match=r"^Fetch: gave up after 1 attempt\(s\) in 0.0 s: "
                                          "TimeoutError: slow$"):
        retry_call(call, "Fetch", RetryPolicy(deadline_s=0.0), gave_up=Unavailable)
    assert len(calls) == 1


@pytest.mark.parametrize("error", [
    FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "bad token"),
    FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "wrong run"),
    ValueError("a bug"),
    redis.AuthenticationError("invalid password"),
])
def test_does_not_retry_a_non_transient_error(error):
    call, calls = failing(1, error)
    slept: list[float] = []
    with pytest.raises(type(error)) as e:
        retry_call(call, "Status", RetryPolicy(deadline_s=60.0), sleep=slept.append)
    assert e.value is error and len(calls) == 1 and slept == []


def test_the_caller_can_abort_the_retries():
    call, calls = failing(10**6, ConnectionError("refused"))
    with pytest.raises(RetryAborted, match="push seq 3: stopped while retrying"):
        retry_call(call, "push seq 3", RetryPolicy(deadline_s=60.0), sleep=lambda _: None,
                   abort=lambda: len(calls) >= 2)
    assert len(calls) == 2


def test_transient_errors():
    assert is_transient(ConnectionError()) and is_transient(TimeoutError())
    assert is_transient(redis.ConnectionError()) and is_transient(redis.TimeoutError())
    assert is_transient(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert not is_transient(FakeRpcError(grpc.StatusCode.PERMISSION_DENIED))
    assert not is_transient(redis.AuthenticationError())
    assert not is_transient(RetryGaveUp("x", 1, 0.0, ConnectionError()))


def test_policy_checks_its_figures():
    with pytest.raises(ValueError):
        RetryPolicy(deadline_s=1.0, initial_s=2.0, max_s=1.0)
    with pytest.raises(ValueError):
        RetryPolicy(deadline_s=1.0, jitter=1.5)


def test_redis_retry_is_bounded_by_wall_time_not_by_a_count():
    policy = RetryPolicy(deadline_s=0.3, initial_s=0.01, max_s=0.02)
    retry = DeadlineRetry(policy, "Redis at test")
    answers = iter([redis.ConnectionError("refused"), redis.TimeoutError("slow"), "PONG"])

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retry.call_with_retry(flaky, lambda *_: None) == "PONG"

    def refused() -> str:
        raise redis.ConnectionError("refused")

    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"Redis at test: gave up after \d+ attempt") as e:
        retry.call_with_retry(refused, lambda *_: None)
    assert 0.3 <= time.monotonic() - start < 2.0
    assert e.value.attempts > 5  # fast errors: many attempts, stopped by time, not by a count


def test_poll_until_waits_for_the_condition():
    answers = iter([False, False, True])
    slept: list[float] = []
    policy = RetryPolicy(deadline_s=60.0, initial_s=0.002, max_s=0.1, jitter=0.0)
    assert poll_until(lambda: next(answers), policy, sleep=slept.append)
    assert slept == pytest.approx([0.002, 0.004])


def test_poll_until_stops_at_the_deadline_or_when_aborted():
    calls: list[int] = []

    def never() -> bool:
        calls.append(1)
        return False

    assert not poll_until(never, RetryPolicy(deadline_s=0.0))
    assert len(calls) == 1
    assert not poll_until(never, RetryPolicy(deadline_s=60.0), sleep=lambda _: None,
                          abort=lambda: len(calls) >= 4)
    assert len(calls) == 4


def test_the_learner_client_gives_up_naming_the_call_and_the_learner():
    import socket

    from services.client import LearnerClient, LearnerUnavailable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = LearnerClient(f"127.0.0.1:{port}", "token", "run", max_wait_s=0.3)
    try:
        with pytest.raises(LearnerUnavailable, match=rf"^Status to learner at 127.0.0.1:{port}: "
                                                     r"gave up after \d+ attempt\(s\) in 0\.\d s: "
                                                     "UNAVAILABLE: ") as e:
            client.status()
        assert isinstance(e.value, ConnectionError) and e.value.attempts > 1
        assert client.reconnects == e.value.attempts - 1
    finally:
        client.close()
