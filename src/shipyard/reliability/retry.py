"""Retry policies: how often, how far apart and for how long to try an operation again.

A `RetryPolicy` is data (it can sit in a stack file); `delays()` says what it would do,
without sleeping; `retry_async()` / `retry_sync()` carry it out on tenacity, optionally
behind a CircuitBreaker, whose opening ends the retries at once: once a thing is known to
be broken, waiting for it only delays the error.
"""

from __future__ import annotations

import asyncio
import enum
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from pydantic import Field, model_validator
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_never,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from shipyard.errors import ShipyardError
from shipyard.reliability.breaker import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    describe_error,
)
from shipyard.spec.models import Duration, Model
from shipyard.spec.units import format_duration

__all__ = [
    "Backoff",
    "RetryExhaustedError",
    "RetryListener",
    "RetryPolicy",
    "delays",
    "retry_async",
    "retry_sync",
]

T = TypeVar("T")
# Called before each wait: (number of the attempt that failed, its error, seconds to wait).
RetryListener = Callable[[int, BaseException, float], None]
ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]
_rng = random.Random()


class Backoff(enum.StrEnum):
    FIXED = "fixed"  # initial, every time
    LINEAR = "linear"  # initial * (1 + multiplier * n); multiplier defaults to 1
    EXPONENTIAL = "exponential"  # initial * multiplier**n; multiplier defaults to 2
    # uniform(0, min(max_delay, initial * multiplier**n)): "full jitter", so that many
    # clients failing together do not retry together
    EXPONENTIAL_JITTER = "exponential_jitter"


class RetryPolicy(Model):
    """How to retry; `n` counts retries from 0. Delays are capped at `max_delay`. It gives
    up after `max_attempts` attempts (None: no limit) or when the next attempt would start
    after `deadline` from the first one (None: no limit); with both None it never does."""

    backoff: Backoff = Backoff.EXPONENTIAL_JITTER
    initial: Duration = 1.0
    max_delay: Duration = 30.0
    max_attempts: int | None = Field(5, ge=1)
    deadline: Duration | None = None
    multiplier: float | None = Field(None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _consistent(self) -> RetryPolicy:
        if self.initial > self.max_delay:
            raise ValueError(
                f"initial ({format_duration(self.initial)}) must not exceed max_delay "
                f"({format_duration(self.max_delay)})"
            )
        if self.multiplier is not None:
            if self.backoff is Backoff.FIXED:
                raise ValueError("multiplier has no effect with fixed backoff")
            if self.backoff is not Backoff.LINEAR and self.multiplier < 1:
                raise ValueError(
                    f"multiplier must be at least 1 for {self.backoff.value} backoff, "
                    f"got {self.multiplier:g}"
                )
        return self

    @property
    def growth(self) -> float:
        """The multiplier in effect: as given, else 1 for linear and 2 for exponential."""
        if self.multiplier is not None:
            return self.multiplier
        return 1.0 if self.backoff is Backoff.LINEAR else 2.0


def _delay(policy: RetryPolicy, n: int, rng: random.Random) -> float:
    """The wait before retry `n` (0 = the wait after the first failed attempt)."""
    if policy.initial == 0:
        return 0.0
    kind = policy.backoff
    if kind is Backoff.FIXED:
        base = policy.initial
    elif kind is Backoff.LINEAR:
        base = policy.initial * (1.0 + policy.growth * n)
    else:
        try:
            base = policy.initial * policy.growth**n
        except OverflowError:
            base = math.inf
    base = min(base, policy.max_delay)
    return rng.uniform(0.0, base) if kind is Backoff.EXPONENTIAL_JITTER else base


def delays(policy: RetryPolicy, rng: random.Random | None = None) -> Iterator[float]:
    """The waits between attempts the policy asks for, assuming attempts take no time: one
    fewer than `max_attempts`, ending early at the `deadline`. Infinite when the policy sets
    neither. Deterministic for a seeded `rng` (only exponential_jitter draws from it)."""
    rng = rng or _rng
    elapsed, n = 0.0, 0
    while policy.max_attempts is None or n + 1 < policy.max_attempts:
        delay = _delay(policy, n, rng)
        if policy.deadline is not None and elapsed + delay > policy.deadline:
            return
        elapsed += delay
        yield delay
        n += 1


class RetryExhaustedError(ShipyardError):
    """Every attempt the policy allowed failed; the last error is the cause."""

    def __init__(self, attempts: int, elapsed: float, last_error: BaseException) -> None:
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error
        noun = "attempt" if attempts == 1 else "attempts"
        took = f"{elapsed:.1f}s" if elapsed >= 1 else f"{elapsed * 1000:.0f}ms"
        super().__init__(
            f"gave up after {attempts} {noun} over {took}: {describe_error(last_error)}"
        )


class _PolicyWait(wait_base):
    """The policy's backoff as a tenacity wait strategy (the same formula as `delays()`)."""

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        return _delay(self.policy, retry_state.attempt_number - 1, self.rng)


class _StopAtDeadline(stop_base):
    """Stops when the next attempt would start after the deadline. Unlike tenacity's own
    delay stops it reads an injected clock, so tests need not sleep."""

    def __init__(self, deadline: float, clock: Callable[[], float], started: float) -> None:
        self.deadline = deadline
        self.clock = clock
        self.started = started

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.clock() - self.started + retry_state.upcoming_sleep > self.deadline


class _StopWhenOpen(stop_base):
    """Stops as soon as the breaker is open: the next attempt would only be refused."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.breaker.state is CircuitState.OPEN


def _strategies(
    policy: RetryPolicy,
    retry_on: ExceptionTypes,
    on_retry: RetryListener | None,
    breaker: CircuitBreaker | None,
    rng: random.Random | None,
    clock: Callable[[], float],
    started: float,
) -> dict[str, Any]:
    """The tenacity settings shared by the async and the sync loop."""
    stops: list[stop_base] = []
    if policy.max_attempts is not None:
        stops.append(stop_after_attempt(policy.max_attempts))
    if policy.deadline is not None:
        stops.append(_StopAtDeadline(policy.deadline, clock, started))
    if breaker is not None:
        stops.append(_StopWhenOpen(breaker))
    stop: stop_base = stop_never
    for each in stops:
        stop = each if stop is stop_never else stop | each

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            error = state.outcome.exception()
            if error is not None:
                on_retry(state.attempt_number, error, state.upcoming_sleep)

    return {
        "stop": stop,
        "wait": _PolicyWait(policy, rng or _rng),
        # A refused call is not retried: the breaker already said when to come back.
        "retry": retry_if_exception_type(retry_on) & retry_if_not_exception_type(CircuitOpenError),
        "before_sleep": before_sleep,
    }


def _gave_up(error: RetryError, breaker: CircuitBreaker | None, elapsed: float) -> ShipyardError:
    last = error.last_attempt.exception()
    assert last is not None  # only failed attempts are retried
    if breaker is not None and breaker.state is CircuitState.OPEN:
        return breaker.open_error()
    return RetryExhaustedError(error.last_attempt.attempt_number, elapsed, last)


async def retry_async(
    policy: RetryPolicy,
    fn: Callable[..., Awaitable[T]],
    *args: Any,
    retry_on: ExceptionTypes = (Exception,),
    on_retry: RetryListener | None = None,
    breaker: CircuitBreaker | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Await `fn(*args)` until it succeeds, retrying errors of the `retry_on` types as the
    policy says. Other errors propagate at once, as does a cancellation. Gives up with
    RetryExhaustedError (caused by the last error), or with CircuitOpenError as soon as
    `breaker` is open; each attempt runs under `breaker.guard()`."""
    started = clock()
    retrying = AsyncRetrying(
        sleep=sleep, **_strategies(policy, retry_on, on_retry, breaker, rng, clock, started)
    )

    async def attempt() -> T:
        if breaker is None:
            return await fn(*args)
        with breaker.guard():
            return await fn(*args)

    try:
        return await retrying(attempt)
    except RetryError as exc:
        raise _gave_up(exc, breaker, clock() - started) from exc.last_attempt.exception()


def retry_sync(
    policy: RetryPolicy,
    fn: Callable[..., T],
    *args: Any,
    retry_on: ExceptionTypes = (Exception,),
    on_retry: RetryListener | None = None,
    breaker: CircuitBreaker | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`retry_async` for blocking code (the CLI, threads); never call it on the loop."""
    started = clock()
    retrying = Retrying(
        sleep=sleep, **_strategies(policy, retry_on, on_retry, breaker, rng, clock, started)
    )

    def attempt() -> T:
        if breaker is None:
            return fn(*args)
        with breaker.guard():
            return fn(*args)

    try:
        return retrying(attempt)
    except RetryError as exc:
        raise _gave_up(exc, breaker, clock() - started) from exc.last_attempt.exception()
