"""Retry policies: the delays they ask for, and retrying with and without a breaker."""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shipyard.reliability import (
    Backoff,
    BreakerConfig,
    CircuitBreaker,
    CircuitOpenError,
    RetryExhaustedError,
    RetryPolicy,
    delays,
    retry_async,
    retry_sync,
)


class FakeTime:
    """A clock that moves only when slept on (or told to), and remembers every sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleep_sync(seconds)

    def sleep_sync(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky:
    """Fails with ConnectionError until attempt `succeed_on` (0: never succeeds); each
    attempt takes `takes` seconds of fake time."""

    def __init__(self, succeed_on: int, time_: FakeTime | None = None, takes: float = 0.0) -> None:
        self.succeed_on = succeed_on
        self.time = time_
        self.takes = takes
        self.attempts = 0

    def sync(self, value: str = "ok") -> str:
        self.attempts += 1
        if self.time is not None:
            self.time.now += self.takes
        if self.attempts != self.succeed_on:
            raise ConnectionError(f"refused (attempt {self.attempts})")
        return value

    async def __call__(self, value: str = "ok") -> str:
        return self.sync(value)


def policy(**fields: Any) -> RetryPolicy:
    return RetryPolicy.model_validate(fields)


# -- the policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"backoff": "fixed", "initial": "2s"}, [2, 2, 2, 2]),
        ({"backoff": "linear", "initial": "1s"}, [1, 2, 3, 4]),
        ({"backoff": "linear", "initial": "1s", "multiplier": 0.5}, [1, 1.5, 2, 2.5]),
        ({"backoff": "linear", "initial": "1s", "max_delay": "2500ms"}, [1, 2, 2.5, 2.5]),
        ({"backoff": "exponential", "initial": "100ms"}, [0.1, 0.2, 0.4, 0.8]),
        ({"backoff": "exponential", "initial": "1s", "multiplier": 3}, [1, 3, 9, 27]),
        ({"backoff": "exponential", "initial": "1s", "max_delay": "5s"}, [1, 2, 4, 5]),
        ({"backoff": "exponential", "initial": 1, "max_attempts": 1}, []),
        ({"backoff": "exponential", "initial": 1, "max_attempts": 3}, [1, 2]),
        ({"backoff": "fixed", "initial": 1, "max_attempts": None, "deadline": "3s"}, [1, 1, 1]),
        (
            {"backoff": "exponential", "initial": 1, "max_attempts": None, "deadline": "10s"},
            [1, 2, 4],
        ),
        ({"backoff": "exponential", "initial": 0, "max_attempts": 3}, [0, 0]),
    ],
)
def test_delays(fields: dict[str, Any], expected: list[float]) -> None:
    assert list(delays(policy(**fields))) == pytest.approx(expected)


def test_full_jitter_draws_below_the_exponential_curve() -> None:
    p = policy(backoff="exponential_jitter", initial="1s", max_delay="10s", max_attempts=None)
    drawn = list(itertools.islice(delays(p, random.Random(7)), 2000))
    caps = [min(10.0, 2.0 ** min(n, 64)) for n in range(2000)]
    assert all(0 <= d <= cap for d, cap in zip(drawn, caps, strict=True))
    assert list(itertools.islice(delays(p, random.Random(7)), 2000)) == drawn
    late = drawn[10:]  # capped at 10s: uniform over [0, 10), mean near 5
    assert 4.5 < sum(late) / len(late) < 5.5


def test_an_unlimited_policy_never_overflows() -> None:
    p = policy(backoff="exponential", initial="1ms", max_delay="1m", max_attempts=None)
    assert list(itertools.islice(delays(p), 5000))[-1] == 60.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"backoff": "random"}, "backoff"),
        ({"initial": "10s", "max_delay": "5s"}, "initial (10s) must not exceed max_delay (5s)"),
        ({"backoff": "fixed", "multiplier": 2}, "no effect with fixed"),
        ({"backoff": "exponential", "multiplier": 0.5}, "at least 1 for exponential"),
        ({"multiplier": float("inf")}, "multiplier"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"deadline": "soon"}, "expected a duration"),
        ({"attempts": 3}, "attempts"),
    ],
)
def test_policy_is_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        policy(**fields)


def test_policy_reads_units_and_is_frozen() -> None:
    p = policy(initial="250ms", max_delay="1m", deadline="1m30s", max_attempts=None)
    assert (p.initial, p.max_delay, p.deadline, p.max_attempts) == (0.25, 60.0, 90.0, None)
    assert p.backoff is Backoff.EXPONENTIAL_JITTER and p.growth == 2.0
    assert policy(backoff="linear").growth == 1.0
    with pytest.raises(ValidationError):
        p.initial = 1.0  # type: ignore[misc]


policies = st.builds(
    RetryPolicy,
    backoff=st.sampled_from(list(Backoff)),
    initial=st.floats(0, 5),
    max_delay=st.floats(5, 100),
    max_attempts=st.one_of(st.none(), st.integers(1, 40)),
    deadline=st.one_of(st.none(), st.floats(0, 500)),
)


@settings(max_examples=300, deadline=None)
@given(p=policies, seed=st.integers(0, 2**32))
def test_delays_keep_to_the_policy(p: RetryPolicy, seed: int) -> None:
    got = list(itertools.islice(delays(p, random.Random(seed)), 200))
    assert all(0 <= d <= p.max_delay for d in got)
    if p.max_attempts is not None:
        assert len(got) <= p.max_attempts - 1
        if p.deadline is None:
            assert len(got) == p.max_attempts - 1
    if p.deadline is not None:
        assert sum(got) <= p.deadline
    if p.backoff is Backoff.FIXED:
        assert all(d == p.initial for d in got)
    if p.backoff in (Backoff.EXPONENTIAL, Backoff.LINEAR):
        assert got == sorted(got)  # never shrinks
    if p.backoff is Backoff.EXPONENTIAL_JITTER:
        assert all(d <= min(p.max_delay, p.initial * 2.0**n) for n, d in enumerate(got))


# -- retrying -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
async def test_a_flaky_call_succeeds_on_attempt_k(k: int) -> None:
    fake, flaky = FakeTime(), Flaky(succeed_on=k)
    seen: list[tuple[int, str, float]] = []
    p = policy(backoff="exponential", initial="100ms", max_attempts=5)
    result = await retry_async(
        p,
        flaky,
        "done",
        clock=fake,
        sleep=fake.sleep,
        on_retry=lambda n, error, delay: seen.append((n, str(error), delay)),
    )
    assert result == "done" and flaky.attempts == k
    assert fake.sleeps == pytest.approx([0.1, 0.2, 0.4][: k - 1])
    assert [(n, error) for n, error, _ in seen] == [
        (n, f"refused (attempt {n})") for n in range(1, k)
    ]
    assert [delay for *_, delay in seen] == fake.sleeps


async def test_giving_up_says_how_often_for_how_long_and_why() -> None:
    fake, flaky = FakeTime(), Flaky(succeed_on=0)
    p = policy(backoff="fixed", initial="800ms", max_attempts=5)
    with pytest.raises(RetryExhaustedError) as caught:
        await retry_async(p, flaky, clock=fake, sleep=fake.sleep)
    error = caught.value
    assert str(error) == (
        "gave up after 5 attempts over 3.2s: ConnectionError: refused (attempt 5)"
    )
    assert (error.attempts, error.elapsed) == (5, pytest.approx(3.2))
    assert isinstance(error.__cause__, ConnectionError) and error.last_error is error.__cause__


async def test_other_errors_are_not_retried() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        await retry_async(policy(), broken, retry_on=(ConnectionError,))
    assert calls == 1


async def test_the_deadline_bounds_when_attempts_start() -> None:
    # attempts take 0.5s, waits are 1s: attempts at 0, 1.5 and 3.0; a fourth would start at
    # 4.5, past the 3.5s deadline
    fake = FakeTime()
    flaky = Flaky(succeed_on=0, time_=fake, takes=0.5)
    p = policy(backoff="fixed", initial="1s", max_attempts=None, deadline="3.5s")
    with pytest.raises(RetryExhaustedError, match=r"gave up after 3 attempts over 3\.5s"):
        await retry_async(p, flaky, clock=fake, sleep=fake.sleep)
    assert fake.sleeps == [1.0, 1.0]


async def test_the_deadline_with_real_sleeps() -> None:
    flaky = Flaky(succeed_on=0)
    p = policy(
        backoff="fixed", initial="20ms", max_delay="20ms", max_attempts=None, deadline="100ms"
    )
    started = time.monotonic()
    with pytest.raises(RetryExhaustedError):
        await retry_async(p, flaky)
    assert time.monotonic() - started < 0.5
    assert 2 <= flaky.attempts <= 6


async def test_an_open_breaker_stops_retrying_at_once() -> None:
    fake, flaky = FakeTime(), Flaky(succeed_on=0)
    breaker = CircuitBreaker(
        "runtime:start", BreakerConfig(window=0, consecutive_failures=2), clock=fake
    )
    p = policy(backoff="fixed", initial="1s", max_attempts=10)
    with pytest.raises(CircuitOpenError, match="after 2 consecutive failures") as caught:
        await retry_async(p, flaky, breaker=breaker, clock=fake, sleep=fake.sleep)
    assert flaky.attempts == 2 and fake.sleeps == [1.0]  # no wait after it opened
    assert isinstance(caught.value.__cause__, ConnectionError)
    # already open: not even one attempt
    with pytest.raises(CircuitOpenError):
        await retry_async(p, flaky, breaker=breaker, clock=fake, sleep=fake.sleep)
    assert flaky.attempts == 2


async def test_success_through_a_breaker_is_recorded() -> None:
    fake = FakeTime()
    breaker = CircuitBreaker("x", BreakerConfig(window=0, consecutive_failures=3), clock=fake)
    flaky = Flaky(succeed_on=3)
    p = policy(backoff="fixed", initial="1s")
    assert await retry_async(p, flaky, breaker=breaker, clock=fake, sleep=fake.sleep) == "ok"
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow()  # the success reset the run of failures


async def test_cancelling_a_retry_loop_is_not_a_failure() -> None:
    breaker = CircuitBreaker("x", BreakerConfig(window=0, consecutive_failures=1))
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.sleep(10)

    task = asyncio.create_task(retry_async(policy(), hang, breaker=breaker))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.allow()


def test_retry_sync() -> None:
    fake = FakeTime()
    p = policy(backoff="linear", initial="1s", max_attempts=4)
    assert retry_sync(p, Flaky(succeed_on=3).sync, "x", clock=fake, sleep=fake.sleep_sync) == "x"
    assert fake.sleeps == [1.0, 2.0]
    with pytest.raises(RetryExhaustedError, match=r"gave up after 4 attempts over 6\.0s"):
        retry_sync(p, Flaky(succeed_on=0).sync, clock=fake, sleep=fake.sleep_sync)


def test_retry_sync_behind_a_breaker() -> None:
    fake = FakeTime()
    breaker = CircuitBreaker("x", BreakerConfig(window=0, consecutive_failures=1), clock=fake)
    flaky = Flaky(succeed_on=0)
    with pytest.raises(CircuitOpenError):
        retry_sync(policy(), flaky.sync, breaker=breaker, clock=fake, sleep=fake.sleep_sync)
    assert flaky.attempts == 1 and fake.sleeps == []


def test_short_waits_read_in_milliseconds() -> None:
    p = policy(backoff="fixed", initial="10ms", max_attempts=2)
    fake = FakeTime()
    with pytest.raises(RetryExhaustedError, match="gave up after 2 attempts over 10ms"):
        retry_sync(p, Flaky(succeed_on=0).sync, clock=fake, sleep=fake.sleep_sync)
