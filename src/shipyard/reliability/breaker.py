"""Circuit breakers: stop hammering something that keeps failing, and probe it gently later.

A breaker is CLOSED while calls mostly succeed. It OPENs when the failure rate over a
sliding window of recent calls reaches a threshold, or after N failures in a row; while
open every call is refused at once. After `recovery_timeout` the next check moves it to
HALF_OPEN, where a few trial calls are let through: enough successes close it again, one
failure re-opens it and restarts the timeout.

The breaker is built for one asyncio loop (no locks), owns no timer (time is read from an
injected clock when a call is checked) and does no I/O: transitions are reported to an
`on_change` listener, which the engine turns into events and metrics.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, TypeVar

from shipyard.errors import ShipyardError

__all__ = [
    "BreakerConfig",
    "ChangeListener",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "Guard",
    "describe_error",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


class CircuitState(StrEnum):
    CLOSED = "closed"  # calls flow; outcomes are counted
    OPEN = "open"  # calls are refused until the recovery timeout has passed
    HALF_OPEN = "half-open"  # a few trial calls decide between closed and open


_HALF_OPEN = CircuitState.HALF_OPEN  # enum attribute lookups are slow on the hot path

ChangeListener = Callable[["CircuitBreaker", CircuitState, CircuitState, str], None]


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker opens and how it recovers. Durations are in seconds."""

    failure_rate_threshold: float = 0.5  # open when failures / calls in the window >= this
    window: int = 20  # the last N calls make the sliding window (0 = no rate rule)
    minimum_calls: int = 5  # the rate rule waits for this many calls in the window
    consecutive_failures: int = 5  # open after N failures in a row (0 = no such rule)
    recovery_timeout: float = 30.0  # open → half-open after this long
    half_open_max_calls: int = 1  # trial calls in flight at once while half-open
    success_threshold: int = 1  # trial successes needed to close

    def __post_init__(self) -> None:
        if not 0.0 < self.failure_rate_threshold <= 1.0:
            raise ValueError(
                f"failure_rate_threshold must be in (0, 1], got {self.failure_rate_threshold}"
            )
        if self.window < 0 or self.consecutive_failures < 0:
            raise ValueError("window and consecutive_failures must not be negative")
        if self.window == 0 and self.consecutive_failures == 0:
            raise ValueError("a breaker needs a failure-rate window or consecutive_failures")
        if self.window and not 1 <= self.minimum_calls <= self.window:
            raise ValueError(
                f"minimum_calls must be between 1 and window ({self.window}), "
                f"got {self.minimum_calls}"
            )
        if not self.recovery_timeout >= 0.0:  # also refuses NaN
            raise ValueError(f"recovery_timeout must not be negative, got {self.recovery_timeout}")
        if self.half_open_max_calls < 1 or self.success_threshold < 1:
            raise ValueError("half_open_max_calls and success_threshold must be at least 1")


class CircuitOpenError(ShipyardError):
    """A call was refused because its circuit is open (or half-open with every trial slot
    taken): failing fast instead of waiting on something known to be broken."""

    def __init__(
        self, name: str, state: CircuitState, reason: str | None, retry_in: float | None
    ) -> None:
        self.name = name
        self.state = state
        self.reason = reason
        self.retry_in = retry_in
        if state is CircuitState.OPEN:
            message = f"circuit for {name} is open"
            if reason:
                message += f" after {reason}"
            if retry_in is not None:
                message += f"; next trial in {retry_in:.1f}s"
        else:
            message = f"circuit for {name} is half-open and its trial calls are in flight"
        super().__init__(message)


def describe_error(error: BaseException) -> str:
    """One line naming an error: our own errors by their message, others with their type
    (`ConnectionRefusedError: [Errno 111] ...`), since the type often says the most."""
    if isinstance(error, ShipyardError):
        return error.message
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class CircuitBreaker:
    """A circuit breaker for one thing that can fail: a service's restarts, a probe, a
    runtime operation. Use `allow()`/`check()` then `record_success()`/`record_failure()`,
    or let `guard()` / `call()` do both around a call.

    `allow()` and `check()` admit a call; while half-open each admitted call holds one of the
    `half_open_max_calls` trial slots until its outcome is recorded (or `release()`d, for a
    call that ended without a verdict). Outcomes recorded while open are ignored.
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_consecutive",
        "_epoch",
        "_failures_in_window",
        "_opened_reason",
        "_outcomes",
        "_retry_at",
        "_state",
        "_trial_successes",
        "_trials",
        "config",
        "name",
        "on_change",
        "opens",
    )

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: ChangeListener | None = None,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self.on_change = on_change
        self.opens = 0  # how many times it opened: a counter for the metrics
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._closed = True  # the whole fast path of allow(): one attribute read
        # Bumped on every transition: an outcome carries the epoch its call was admitted
        # in, so a call that straddles a transition cannot pass for a trial call.
        self._epoch = 0
        self._outcomes: deque[bool] = deque(maxlen=max(self.config.window, 1))
        self._failures_in_window = 0
        self._consecutive = 0
        self._trials = 0
        self._trial_successes = 0
        self._opened_reason: str | None = None
        self._retry_at: float | None = None

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"

    @property
    def state(self) -> CircuitState:
        """The state as last decided. An open breaker whose timeout has passed still reads
        OPEN until the next `allow()`/`check()` moves it to HALF_OPEN."""
        return self._state

    @property
    def opened_reason(self) -> str | None:
        """Why it opened (`5 consecutive failures (last: exit code 1)`); None when closed."""
        return self._opened_reason

    @property
    def retry_at(self) -> float | None:
        """Clock time from which a trial call is admitted; None unless open."""
        return self._retry_at

    def allow(self) -> bool:
        """Admit a call or refuse it. Costs one attribute read while closed."""
        if self._closed:
            return True
        return self._admit() is not None

    def check(self) -> None:
        """Admit a call or raise CircuitOpenError saying why and for how long."""
        if self._closed:
            return
        if self._admit() is None:
            raise self.open_error()

    def open_error(self) -> CircuitOpenError:
        """The error a refused call gets now: why the circuit opened, when it retries."""
        retry_in = None
        if self._retry_at is not None:
            retry_in = max(self._retry_at - self._clock(), 0.0)
        return CircuitOpenError(self.name, self._state, self._opened_reason, retry_in)

    def record_success(self) -> None:
        """Count a successful call; in half-open, enough of them close the breaker."""
        self._record(None, True, "")

    def record_failure(self, reason: str = "") -> None:
        """Count a failed call; `reason` (e.g. `exit code 1`) ends up in `opened_reason`."""
        self._record(None, False, reason)

    def release(self) -> None:
        """Give back a trial slot taken by a call that ended without a verdict (cancelled)."""
        self._release(self._epoch)

    def reset(self, reason: str = "reset") -> None:
        """Close the breaker and forget its history, e.g. after an operator's restart."""
        if self._state is not CircuitState.CLOSED:
            self._transition(CircuitState.CLOSED, reason)
        else:
            self._clear()

    def guard(self) -> Guard:
        """`with breaker.guard(): ...` checks before the block and records its outcome: an
        Exception is a failure, leaving normally a success; a cancellation records nothing.
        Raises CircuitOpenError instead of running the block when refused."""
        return Guard(self)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await `fn(*args, **kwargs)` under `guard()`."""
        with Guard(self):
            return await fn(*args, **kwargs)

    # -- the slow path -------------------------------------------------------------------

    def _admit(self) -> int | None:
        """The epoch the admitted call belongs to, or None when refused."""
        if self._state is CircuitState.OPEN:
            assert self._retry_at is not None
            if self._clock() < self._retry_at:
                return None
            self._transition(
                CircuitState.HALF_OPEN,
                f"recovery timeout of {self.config.recovery_timeout:g}s elapsed",
            )
        if self._state is CircuitState.HALF_OPEN:
            if self._trials >= self.config.half_open_max_calls:
                return None
            self._trials += 1
        return self._epoch

    def _record(self, epoch: int | None, ok: bool, reason: str) -> None:
        if epoch is not None and epoch != self._epoch:
            return  # admitted before the last transition: says nothing about the present
        if self._closed:
            self._count(ok, reason)
        elif self._state is _HALF_OPEN and self._trials > 0:
            self._trials -= 1
            if not ok:
                self._open("a failed trial call", reason)
                return
            self._trial_successes += 1
            needed = self.config.success_threshold
            if self._trial_successes >= needed:
                calls = "call" if needed == 1 else "calls"
                self._transition(CircuitState.CLOSED, f"{needed} trial {calls} succeeded")

    def _count(self, ok: bool, reason: str) -> None:
        config = self.config
        outcomes = self._outcomes
        if config.window:
            if len(outcomes) == outcomes.maxlen and not outcomes[0]:
                self._failures_in_window -= 1
            outcomes.append(ok)
            if not ok:
                self._failures_in_window += 1
        if ok:
            self._consecutive = 0
            return
        self._consecutive += 1
        if config.consecutive_failures and self._consecutive >= config.consecutive_failures:
            self._open(f"{self._consecutive} consecutive failures", reason)
        elif (
            config.window
            and len(outcomes) >= config.minimum_calls
            and self._failures_in_window / len(outcomes) >= config.failure_rate_threshold
        ):
            self._open(
                f"{self._failures_in_window} of the last {len(outcomes)} calls failed", reason
            )

    def _open(self, why: str, last: str) -> None:
        self._retry_at = self._clock() + self.config.recovery_timeout
        self._transition(CircuitState.OPEN, f"{why} (last: {last})" if last else why)

    def _release(self, epoch: int) -> None:
        if epoch == self._epoch and self._state is CircuitState.HALF_OPEN and self._trials:
            self._trials -= 1

    def _clear(self) -> None:
        self._outcomes.clear()
        self._failures_in_window = 0
        self._consecutive = 0
        self._trials = 0
        self._trial_successes = 0

    def _transition(self, new: CircuitState, reason: str) -> None:
        old = self._state
        self._state = new
        self._closed = new is CircuitState.CLOSED
        self._epoch += 1
        self._clear()
        if new is CircuitState.OPEN:
            self.opens += 1
            self._opened_reason = reason
        else:
            self._retry_at = None
            if new is CircuitState.CLOSED:
                self._opened_reason = None
        if self.on_change is not None:
            try:
                self.on_change(self, old, new, reason)
            except Exception:  # a broken listener must not break the calls it watches
                log.exception("circuit breaker listener failed for %s", self.name)


class Guard:
    """The context manager `guard()` returns; remembers the epoch its call was admitted in."""

    __slots__ = ("_breaker", "_epoch")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._epoch = 0

    def __enter__(self) -> None:
        breaker = self._breaker
        if breaker._closed:
            self._epoch = breaker._epoch
            return
        epoch = breaker._admit()
        if epoch is None:
            raise breaker.open_error()
        self._epoch = epoch

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._breaker._record(self._epoch, True, "")
        elif isinstance(exc, Exception):
            self._breaker._record(self._epoch, False, describe_error(exc))
        else:  # cancelled or interrupted: no verdict on the thing being called
            self._breaker._release(self._epoch)
