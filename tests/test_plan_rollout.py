"""The rollout decisions of the plan layer: a simulated rolling update, property-tested,
never breaks its bounds and always finishes; analysis verdicts on traffic windows."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.plan.rollout import (
    RollingCounts,
    Window,
    analyse,
    canary_replicas,
    canary_weights,
    rolling_step,
    window_of,
)
from shipyard.spec.update import UpdatePolicy


def simulate(replicas: int, surge: int, unavailable: int, seed: int) -> int:
    """Run a rolling update where each new instance becomes available after a random
    number of ticks; check the bounds at every tick; return the ticks it took."""
    rng = random.Random(seed)
    old_ready = old_total = replicas
    starting: list[int] = []  # ticks left until each new instance is available
    available = 0
    for tick in range(1, 10_000):
        step = rolling_step(RollingCounts(replicas, old_total, old_ready,
                                          len(starting) + available, available),
                            surge, unavailable)
        if step.done:
            return tick
        old_total -= step.stop_unready + step.stop_ready
        old_ready -= step.stop_ready
        starting += [rng.randint(0, 3) for _ in range(step.start)]
        assert old_total + len(starting) + available <= replicas + surge
        assert old_ready + available >= replicas - unavailable
        assert old_total >= 0 and old_ready >= 0
        if step.idle:  # time passes only when there is nothing to do
            available += sum(1 for t in starting if t <= 0)
            starting = [t - 1 for t in starting if t > 0]
    raise AssertionError("the rollout never finished")


@settings(max_examples=300, deadline=None)
@given(replicas=st.integers(0, 12), surge=st.integers(0, 4), unavailable=st.integers(0, 4),
       seed=st.integers(0, 2**16))
def test_rolling_update_keeps_its_bounds_and_finishes(replicas: int, surge: int,
                                                      unavailable: int, seed: int) -> None:
    if surge == 0 and unavailable == 0:
        unavailable = 1  # what surge_and_unavailable makes of it
    unavailable = min(unavailable, max(replicas, 1))
    simulate(replicas, surge, unavailable, seed)


@given(replicas=st.integers(1, 50), percent=st.integers(1, 100))
def test_percentages_round_like_kubernetes(replicas: int, percent: int) -> None:
    policy = UpdatePolicy(max_surge=f"{percent}%", max_unavailable=f"{percent}%")
    surge, unavailable = policy.surge_and_unavailable(replicas, fixed_ports=False)
    exact = replicas * percent / 100
    assert surge == -(-replicas * percent // 100) and surge >= exact
    if percent and (replicas * percent) // 100:
        assert unavailable == (replicas * percent) // 100 <= exact
    else:
        assert unavailable in (0, 1) and (surge, unavailable) != (0, 0)


def test_fixed_ports_forbid_surge() -> None:
    policy = UpdatePolicy(max_surge=2, max_unavailable=0)
    assert policy.surge_and_unavailable(4, fixed_ports=True) == (0, 1)
    assert policy.surge_and_unavailable(4, fixed_ports=False) == (2, 0)


def test_canary_replicas_and_weights() -> None:
    assert canary_replicas(10, 10) == 1 and canary_replicas(10, 50) == 5
    assert canary_replicas(3, 10) == 1 and canary_replicas(3, 100) == 3
    assert canary_weights("1", "2", 10) == {"1": 90, "2": 10}


def snapshot(requests: int, errors: int, fast: int) -> dict:
    """A RequestStats snapshot: `fast` answers under 5 ms, the rest around 1 s."""
    return {"requests": requests, "codes": {"2xx": requests - errors, "5xx": errors},
            "latency": {"buckets": {"0.005": fast, "1.0": requests, "+Inf": requests}}}


def test_window_between_snapshots_and_verdicts() -> None:
    window = window_of(snapshot(100, 0, 100), snapshot(200, 10, 150))
    assert (window.requests, window.errors) == (100, 10) and window.error_rate == 10.0
    assert 0.005 < (window.quantile(0.99) or 0) <= 1.0
    thresholds = {"max_error_rate": 5.0, "max_latency_p99": None, "max_relative": 2.0,
                  "min_requests": 20}
    assert analyse(window, None, **thresholds).outcome == "fail"
    assert analyse(Window(10, 0), None, **thresholds).outcome == "inconclusive"
    good = window_of(None, snapshot(100, 1, 100))
    assert analyse(good, None, **thresholds).outcome == "pass"
    slow = window_of(None, snapshot(100, 0, 0))
    assert analyse(slow, None, **{**thresholds, "max_latency_p99": 0.2}).outcome == "fail"
    # relative to a stable revision with no errors: 3% is above 2x0% + 1 point
    stable = window_of(None, snapshot(1000, 0, 1000))
    assert analyse(window_of(None, snapshot(100, 3, 100)), stable,
                   **thresholds).outcome == "fail"
    assert analyse(slow, stable, **thresholds).outcome == "fail"


def test_blue_green_and_canary_need_a_router() -> None:
    import pytest

    from shipyard.errors import SpecError
    from shipyard.spec.loader import parse_stack

    base = "name: s\nservices:\n  api:\n    command: [x]\n    ports: {http: %s}\n%s" \
           "    update: {strategy: canary}\n"
    with pytest.raises(SpecError, match="canary needs `expose: PORT`"):
        parse_stack(base % ("auto", ""))
    with pytest.raises(SpecError, match="a fixed port"):
        parse_stack(base % ("8080", "    expose: 9000\n"))
    assert parse_stack(base % ("auto", "    expose: 9000\n")).services["api"]


def test_plan_says_how_each_change_is_carried_out() -> None:
    from shipyard.plan.rollout import describe_update
    from shipyard.spec.models import Service

    def service(**fields: object) -> Service:
        return Service.model_validate({"command": ["x"], "ports": {"http": "auto"},
                                       "expose": 9000, **fields})

    assert describe_update("add", service(), ()) == "start"
    assert describe_update("remove", None, ()) == "stop"
    assert describe_update("change", service(replicas=3), ["replicas"]) == \
        "scale in place to 3, no restart"
    assert describe_update("change", service(replicas=4), ["env.A"]) == \
        "rolling (max surge 1, max unavailable 0)"
    assert describe_update("change", service(ports={"http": 80}), ["env.A"]) == \
        "rolling (in place, max surge 0, max unavailable 1)"
    assert describe_update("change", service(update={"strategy": "canary"}), ["env.A"]) \
        == "canary (10% → 50% → 100%)"
    assert describe_update("change", service(update={"strategy": "blue-green",
                                                     "promotion": "manual"}), ["command"]) \
        == "blue-green (manual promotion, previous kept 300s)"
    assert describe_update("change", service(update={"strategy": "recreate"}),
                           ["command"]).startswith("recreate")
