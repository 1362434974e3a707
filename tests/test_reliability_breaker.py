"""Circuit breakers: when they open, how they recover, what they tell the listener."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.errors import ShipyardError
from shipyard.reliability import (
    BreakerConfig,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
)
from shipyard.reliability.breaker import Guard

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Recorder:
    changes: list[tuple[CircuitState, CircuitState, str]] = field(default_factory=list)

    def __call__(
        self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState, reason: str
    ) -> None:
        assert breaker.state is new  # the listener sees the breaker after the change
        self.changes.append((old, new, reason))


def make(**config: float) -> tuple[CircuitBreaker, Clock, Recorder]:
    clock, recorder = Clock(), Recorder()
    breaker = CircuitBreaker(
        "service:api", BreakerConfig(**config), clock=clock, on_change=recorder
    )
    return breaker, clock, recorder


def run(breaker: CircuitBreaker, clock: Clock, script: str) -> str:
    """Play a script: `s` success, `f` failure, `a` allow (records A/R: admitted or
    refused), `+N` advance the clock by N seconds. Returns the admissions and the state."""
    admissions = ""
    for step in script.split():
        if step == "s":
            breaker.record_success()
        elif step == "f":
            breaker.record_failure()
        elif step == "a":
            admissions += "A" if breaker.allow() else "R"
        else:
            clock.now += float(step)
    return f"{admissions} {breaker.state.value}".strip()


@pytest.mark.parametrize(
    ("config", "script", "expected"),
    [
        # consecutive failures (5 by default); a success resets the run
        ({}, "f f f f", "closed"),
        ({"window": 0}, "f f f f f", "open"),
        ({"window": 0}, "f f f f s f f f f", "closed"),
        ({}, "f f f f f a", "R open"),
        # failure rate over the window, once minimum_calls have been seen
        ({"consecutive_failures": 0}, "f s f s", "closed"),
        ({"consecutive_failures": 0}, "f s f s f", "open"),  # 3 of 5 = 60%
        ({"consecutive_failures": 0}, "s s s f f", "closed"),  # 40%
        ({"consecutive_failures": 0}, "s s s f f f", "open"),  # 50%
        (
            {"consecutive_failures": 0, "window": 4, "minimum_calls": 4},
            "f s s s s s f s",
            "closed",
        ),  # the first failure slid out of the window
        (
            {
                "consecutive_failures": 0,
                "window": 4,
                "minimum_calls": 4,
                "failure_rate_threshold": 0.75,
            },
            "s f s f f",
            "open",
        ),
        (
            {
                "consecutive_failures": 0,
                "failure_rate_threshold": 0.7,
                "window": 10,
                "minimum_calls": 10,
            },
            "s s s f f f f f f f",
            "open",
        ),  # 7/10 is 0.7 exactly
        # recovery: half-open after the timeout, one trial at a time by default
        ({}, "f f f f f +29.9 a", "R open"),
        ({}, "f f f f f +30 a", "A half-open"),
        ({}, "f f f f f +30 a a", "AR half-open"),
        ({}, "f f f f f +30 a s", "A closed"),
        ({}, "f f f f f +30 a f", "A open"),
        ({}, "f f f f f +30 a f +29 a +1 a", "ARA half-open"),  # the timeout restarted
        ({"half_open_max_calls": 2}, "f f f f f +30 a a a", "AAR half-open"),
        ({"success_threshold": 2}, "f f f f f +30 a s", "A half-open"),
        ({"success_threshold": 2}, "f f f f f +30 a s a s", "AA closed"),
        ({"success_threshold": 2}, "f f f f f +30 a s a f", "AA open"),
        ({"recovery_timeout": 0}, "f f f f f a", "A half-open"),
        # outcomes while open, or in half-open without a trial in flight, change nothing
        ({}, "f f f f f s s s +30", "open"),
        ({}, "f f f f f +30 a s f", "A closed"),
        ({}, "f f f f f +30 s s a", "A half-open"),
        # closing starts afresh: the old failures are forgotten
        ({}, "f f f f f +30 a s f f f f", "A closed"),
    ],
)
def test_transitions(config: dict[str, float], script: str, expected: str) -> None:
    breaker, clock, _ = make(**config)
    assert run(breaker, clock, script) == expected


def test_reasons_and_listener() -> None:
    breaker, clock, recorder = make()
    for _ in range(5):
        breaker.record_failure("exit code 1")
    assert breaker.opened_reason == "5 consecutive failures (last: exit code 1)"
    assert breaker.retry_at == clock.now + 30
    clock.now += 30
    assert breaker.allow()
    breaker.record_failure()
    clock.now += 30
    breaker.check()
    breaker.record_success()
    assert breaker.opened_reason is None and breaker.retry_at is None
    assert recorder.changes == [
        (CLOSED, OPEN, "5 consecutive failures (last: exit code 1)"),
        (OPEN, HALF_OPEN, "recovery timeout of 30s elapsed"),
        (HALF_OPEN, OPEN, "a failed trial call"),
        (OPEN, HALF_OPEN, "recovery timeout of 30s elapsed"),
        (HALF_OPEN, CLOSED, "1 trial call succeeded"),
    ]
    assert breaker.opens == 2


def test_rate_reason() -> None:
    breaker, _, _ = make(consecutive_failures=0)
    run(breaker, Clock(), "f s f s f")
    assert breaker.opened_reason == "3 of the last 5 calls failed"


def test_check_says_why_and_when() -> None:
    breaker, clock, _ = make()
    for _ in range(5):
        breaker.record_failure()
    clock.now += 17.7
    with pytest.raises(CircuitOpenError) as caught:
        breaker.check()
    assert str(caught.value) == (
        "circuit for service:api is open after 5 consecutive failures; next trial in 12.3s"
    )
    assert isinstance(caught.value, ShipyardError) and caught.value.exit_code == 1
    assert caught.value.retry_in == pytest.approx(12.3)
    clock.now += 12.3
    breaker.check()  # the trial call
    with pytest.raises(CircuitOpenError, match="half-open and its trial calls are in flight"):
        breaker.check()


def test_guard_records_outcomes() -> None:
    breaker, _, _ = make(window=0, consecutive_failures=2)
    with breaker.guard():
        pass
    for _ in range(2):
        with pytest.raises(ConnectionError), breaker.guard():
            raise ConnectionError("refused")
    assert breaker.state is OPEN
    assert breaker.opened_reason == "2 consecutive failures (last: ConnectionError: refused)"
    ran = False
    with pytest.raises(CircuitOpenError), breaker.guard():
        ran = True
    assert not ran


def test_a_cancelled_trial_gives_its_slot_back() -> None:
    breaker, clock, _ = make(recovery_timeout=1)
    run(breaker, clock, "f f f f f +1")
    with pytest.raises(asyncio.CancelledError), breaker.guard():
        raise asyncio.CancelledError
    assert breaker.state is HALF_OPEN
    assert breaker.allow()  # the slot is free again
    breaker.release()
    assert breaker.allow()


def test_a_call_admitted_before_a_transition_is_not_a_trial() -> None:
    breaker, clock, _ = make(recovery_timeout=1)
    slow = breaker.guard()
    slow.__enter__()  # admitted while closed
    run(breaker, clock, "f f f f f +1")
    trial = breaker.guard()
    trial.__enter__()  # the one trial of the half-open state
    slow.__exit__(None, None, None)  # succeeds late: says nothing about now
    assert breaker.state is HALF_OPEN
    assert not breaker.allow()  # the trial still holds its slot
    trial.__exit__(None, None, None)
    assert breaker.state is CLOSED


async def test_call() -> None:
    breaker, _, _ = make(window=0, consecutive_failures=1)
    calls = 0

    async def fn(x: int, *, y: int) -> int:
        nonlocal calls
        calls += 1
        if x < 0:
            raise OSError("boom")
        return x + y

    assert await breaker.call(fn, 1, y=2) == 3
    with pytest.raises(OSError):
        await breaker.call(fn, -1, y=0)
    with pytest.raises(CircuitOpenError):
        await breaker.call(fn, 1, y=2)
    assert calls == 2


def test_reset_closes_and_forgets() -> None:
    breaker, clock, recorder = make()
    run(breaker, clock, "f f f f f")
    breaker.reset("operator restart")
    assert breaker.state is CLOSED and recorder.changes[-1] == (OPEN, CLOSED, "operator restart")
    assert run(breaker, clock, "f f f f") == "closed"
    breaker.reset()
    assert run(breaker, clock, "f f f f") == "closed"  # the four before were forgotten


def test_a_failing_listener_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def listener(*_: object) -> None:
        raise RuntimeError("listener bug")

    breaker = CircuitBreaker(
        "x", BreakerConfig(window=0, consecutive_failures=1), on_change=listener
    )
    with caplog.at_level(logging.ERROR):
        breaker.record_failure()
    assert breaker.state is OPEN
    assert "listener failed for x" in caplog.text


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"failure_rate_threshold": 0}, "failure_rate_threshold"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"window": 0, "consecutive_failures": 0}, "needs a failure-rate window"),
        ({"window": 5, "minimum_calls": 6}, "minimum_calls"),
        ({"minimum_calls": 0}, "minimum_calls"),
        ({"recovery_timeout": -1}, "recovery_timeout"),
        ({"recovery_timeout": float("nan")}, "recovery_timeout"),
        ({"half_open_max_calls": 0}, "at least 1"),
        ({"success_threshold": 0}, "at least 1"),
        ({"consecutive_failures": -1}, "negative"),
    ],
)
def test_config_is_checked(config: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BreakerConfig(**config)


# -- property: the breaker against a plain reference model -------------------------------


class Reference:
    """The rules as written in the design, with nothing clever: a list for the window."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.state = CLOSED
        self.epoch = 0
        self.outcomes: list[bool] = []
        self.consecutive = self.trials = self.successes = 0
        self.retry_at = 0.0
        self.changes: list[tuple[CircuitState, CircuitState]] = []

    def go(self, new: CircuitState) -> None:
        self.changes.append((self.state, new))
        self.state, self.epoch = new, self.epoch + 1
        self.outcomes, self.consecutive, self.trials, self.successes = [], 0, 0, 0

    def trip(self, now: float) -> None:
        self.retry_at = now + self.config.recovery_timeout
        self.go(OPEN)

    def admit(self, now: float) -> int | None:
        if self.state is OPEN:
            if now < self.retry_at:
                return None
            self.go(HALF_OPEN)
        if self.state is HALF_OPEN:
            if self.trials >= self.config.half_open_max_calls:
                return None
            self.trials += 1
        return self.epoch

    def finish(self, epoch: int, outcome: str, now: float) -> None:
        config = self.config
        if epoch != self.epoch:
            return
        if outcome == "cancel":
            if self.state is HALF_OPEN:
                self.trials -= 1
        elif self.state is CLOSED:
            ok = outcome == "ok"
            if config.window:
                self.outcomes = [*self.outcomes, ok][-config.window :]
            self.consecutive = 0 if ok else self.consecutive + 1
            rate_rule = (
                config.window
                and len(self.outcomes) >= config.minimum_calls
                and self.outcomes.count(False) / len(self.outcomes) >= config.failure_rate_threshold
            )
            consecutive_rule = (
                config.consecutive_failures and self.consecutive >= config.consecutive_failures
            )
            if not ok and (rate_rule or consecutive_rule):
                self.trip(now)
        elif self.state is HALF_OPEN:
            self.trials -= 1
            if outcome == "fail":
                self.trip(now)
            else:
                self.successes += 1
                if self.successes >= config.success_threshold:
                    self.go(CLOSED)


@st.composite
def configs(draw: st.DrawFn) -> BreakerConfig:
    window = draw(st.integers(0, 6))
    return BreakerConfig(
        failure_rate_threshold=draw(st.sampled_from([0.2, 0.5, 0.6, 0.75, 1.0])),
        window=window,
        minimum_calls=draw(st.integers(1, window)) if window else 1,
        consecutive_failures=draw(st.integers(0 if window else 1, 4)),
        recovery_timeout=draw(st.sampled_from([0.0, 1.0, 5.0])),
        half_open_max_calls=draw(st.integers(1, 3)),
        success_threshold=draw(st.integers(1, 3)),
    )


# Weighted towards admitting and failing, so that calls straddle transitions often.
operations = st.lists(
    st.sampled_from(
        [("admit", 0)] * 4
        + [("fail", 0), ("fail", -1), ("fail", -1)]  # 0: the oldest call, -1: the newest
        + [("ok", 0), ("ok", -1)]
        + [("cancel", 0), ("tick", 1.0), ("tick", 5.0)]
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(config=configs(), ops=operations)
def test_breaker_follows_the_rules(config: BreakerConfig, ops: list[tuple[str, float]]) -> None:
    clock, recorder = Clock(), Recorder()
    breaker = CircuitBreaker("x", config, clock=clock, on_change=recorder)
    model = Reference(config)
    # Calls in flight: (guard, the model's epoch, transitions seen when it was admitted,
    # whether it was admitted as a half-open trial). What counts as a trial is judged from
    # the listener alone, independently of the reference model.
    in_flight: list[tuple[Guard, int, int, bool]] = []
    trial_successes = 0
    for op, arg in ops:
        seen = len(recorder.changes)
        if op == "tick":
            clock.now += arg
        elif op == "admit":
            guard = breaker.guard()
            epoch = model.admit(clock.now)
            try:
                guard.__enter__()
            except CircuitOpenError:
                assert epoch is None
            else:
                assert epoch is not None
                trial = breaker.state is HALF_OPEN
                in_flight.append((guard, epoch, len(recorder.changes), trial))
        elif in_flight:
            guard, epoch, admitted, trial = in_flight.pop(int(arg) % len(in_flight))
            if op == "ok":
                guard.__exit__(None, None, None)
            elif op == "fail":
                guard.__exit__(OSError, OSError("down"), None)
            else:
                guard.__exit__(asyncio.CancelledError, asyncio.CancelledError(), None)
            if op == "ok" and trial and admitted == seen:
                trial_successes += 1
            model.finish(epoch, op, clock.now)

        assert breaker.state is model.state
        # every transition reaches the listener exactly once, in order
        assert [(old, new) for old, new, _ in recorder.changes] == model.changes
        for old, new, _ in recorder.changes[seen:]:
            if (old, new) == (HALF_OPEN, CLOSED):
                assert trial_successes >= config.success_threshold
            if new is HALF_OPEN:
                trial_successes = 0
        if breaker.state is HALF_OPEN:  # never more trials in flight than allowed
            trials = [c for c in in_flight if c[3] and c[2] == len(recorder.changes)]
            assert len(trials) <= config.half_open_max_calls
        assert (breaker.opened_reason is None) == (breaker.state is CLOSED)
        assert (breaker.retry_at is not None) == (breaker.state is OPEN)
    assert breaker.opens == sum(1 for _, new in model.changes if new is OPEN)
