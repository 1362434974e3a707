"""Restart decisions: policy, give-up, backoff with jitter."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.plan.restart import RestartDecision, backoff_delay, decide_restart
from shipyard.spec.models import RestartPolicy


def policy(**fields: Any) -> RestartPolicy:
    return RestartPolicy.model_validate({"jitter": 0} | fields)


@pytest.mark.parametrize(
    ("fields", "code", "restarts", "expected"),
    [
        ({"policy": "no"}, 0, 0, RestartDecision(False, 0.0, "completed", "completed")),
        ({"policy": "no"}, 1, 0,
         RestartDecision(False, 0.0, "restart policy is 'no'", "failed")),
        ({"policy": "no"}, None, 0,
         RestartDecision(False, 0.0, "restart policy is 'no'", "failed")),
        ({}, 0, 3, RestartDecision(False, 0.0, "completed", "completed")),
        ({}, 1, 0, RestartDecision(True, 1.0, "restart policy is 'on-failure'", None)),
        ({}, -9, 2, RestartDecision(True, 4.0, "restart policy is 'on-failure'", None)),
        ({}, None, 5, RestartDecision(True, 32.0, "restart policy is 'on-failure'", None)),
        ({}, 1, 6, RestartDecision(True, 60.0, "restart policy is 'on-failure'", None)),
        ({}, 1, 10, RestartDecision(False, 0.0, "gave up after 10 restarts", "failed")),
        ({"policy": "always"}, 0, 0,
         RestartDecision(True, 1.0, "restart policy is 'always'", None)),
        ({"policy": "always", "max_restarts": 2}, 0, 2,
         RestartDecision(False, 0.0, "gave up after 2 restarts", "failed")),
        ({"max_restarts": 0}, 1, 0,
         RestartDecision(False, 0.0, "gave up after 0 restarts", "failed")),
        ({"max_restarts": None}, 1, 10_000,
         RestartDecision(True, 60.0, "restart policy is 'on-failure'", None)),
        ({"backoff": "fixed", "initial": "3s"}, 2, 7,
         RestartDecision(True, 3.0, "restart policy is 'on-failure'", None)),
        ({"initial": "200ms", "max": "1s"}, 1, 1,
         RestartDecision(True, 0.4, "restart policy is 'on-failure'", None)),
    ],
)
def test_decisions(fields: dict[str, Any], code: int | None, restarts: int,
                   expected: RestartDecision) -> None:
    assert decide_restart(policy(**fields), code, restarts) == expected


def test_exit_zero_of_a_service_meant_to_keep_running_is_a_failure() -> None:
    decision = decide_restart(policy(), 0, 0, one_shot_success_completes=False)
    assert decision.restart
    decision = decide_restart(policy(policy="no"), 0, 0, one_shot_success_completes=False)
    assert decision.final_state == "failed"


@pytest.mark.parametrize(
    ("random", "expected"),
    [(0.0, 6.4), (0.5, 8.0), (0.999999, 9.6), (-1.0, 6.4), (7.0, 9.6)],  # base 1s * 2**3
)
def test_jitter_spreads_the_delay(random: float, expected: float) -> None:
    decision = decide_restart(policy(jitter=0.2), 1, 3, random=random)
    assert decision.delay == pytest.approx(expected, abs=1e-4)


def test_jitter_never_exceeds_max() -> None:
    assert backoff_delay(policy(jitter=0.5), 20, random=0.99) == 60.0
    assert backoff_delay(policy(jitter=1.0, initial="1s"), 0, random=0.0) == 0.0


@given(
    st.sampled_from(["no", "on-failure", "always"]),
    st.sampled_from(["exponential", "fixed"]),
    st.floats(0, 100), st.floats(0, 1000), st.floats(0, 1),
    st.one_of(st.none(), st.integers(0, 20)),
    st.one_of(st.none(), st.integers(-20, 255)),
    st.integers(0, 5000),
    st.floats(0, 1, exclude_max=True),
)
@settings(max_examples=300, deadline=None)
def test_delays_stay_within_bounds_and_restarts_are_capped(
    mode: str, backoff: str, initial: float, maximum: float, jitter: float,
    max_restarts: int | None, code: int | None, restarts: int, draw: float,
) -> None:
    p = policy(policy=mode, backoff=backoff, initial=initial, max=maximum, jitter=jitter,
               max_restarts=max_restarts)
    decision = decide_restart(p, code, restarts, random=draw)
    assert 0.0 <= decision.delay <= maximum
    assert decision.restart == (decision.final_state is None)
    if max_restarts is not None and restarts >= max_restarts:
        assert not decision.restart
    if not decision.restart:
        assert decision.delay == 0.0
        assert decision.final_state == ("completed" if code == 0 and mode != "always"
                                        else "failed")
    if mode == "no":
        assert not decision.restart
    if mode == "always" and (max_restarts is None or restarts < max_restarts):
        assert decision.restart


def test_every_retry_shape_is_available_to_restarts() -> None:
    from shipyard.plan.restart import backoff_delay
    from shipyard.spec.models import RestartPolicy

    def waits(backoff: str, draw: float = 0.5) -> list[float]:
        policy = RestartPolicy(backoff=backoff, initial=1, max=5, jitter=0)
        return [backoff_delay(policy, n, random=draw) for n in range(5)]

    assert waits("fixed") == [1, 1, 1, 1, 1]
    assert waits("linear") == [1, 2, 3, 4, 5]
    assert waits("exponential") == [1, 2, 4, 5, 5]
    assert waits("exponential_jitter", 0.5) == [0.5, 1, 2, 2.5, 2.5]
    assert waits("exponential_jitter", 0.0) == [0, 0, 0, 0, 0]
