"""Autoscaling: the policy model, the HPA formula, stabilization, step limits, bounds."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shipyard.plan.autoscale import (
    Decision,
    MetricSample,
    PastRecommendation,
    decide,
    prune_history,
)
from shipyard.spec.autoscale import AutoscalePolicy, MetricKind, Step

TICK = 15.0


def policy(**fields: Any) -> AutoscalePolicy:
    base = {"min": 1, "max": 100, "metrics": [{"cpu": "70%"}], "down_stabilization": 0}
    return AutoscalePolicy.model_validate(base | fields)


def cpu(value: float, at: float = 0.0) -> list[MetricSample]:
    return [MetricSample("cpu", value, at)]


# --- the policy model -----------------------------------------------------------------

def test_stack_file_shorthand() -> None:
    p = AutoscalePolicy.model_validate({
        "min": 1, "max": 10,
        "metrics": [
            {"cpu": "70%"}, {"memory": "80%", "weight": 2}, {"requests_per_second": 100},
            {"latency_p99": "200ms"}, {"queue_length": 50},
            {"custom": {"name": "jobs", "url": "http://127.0.0.1:9000/stats",
                        "json_path": "$.pending", "target": 20}},
            {"prometheus": {"query": "sum(rate(x[1m]))", "target": "5", "name": "x"}},
        ],
        "up_cooldown": "30s", "down_cooldown": "5m",
        "max_step_up": "50%", "max_step_down": 2, "interval": "10s",
    })
    got = [(m.name, m.kind, m.target, m.weight) for m in p.metrics]
    assert got == [
        ("cpu", MetricKind.CPU, 70.0, 1.0),
        ("memory", MetricKind.MEMORY, 80.0, 2.0),
        ("requests_per_second", MetricKind.REQUESTS_PER_SECOND, 100.0, 1.0),
        ("latency_p99", MetricKind.LATENCY_P99, 0.2, 1.0),
        ("queue_length", MetricKind.QUEUE_LENGTH, 50.0, 1.0),
        ("jobs", MetricKind.CUSTOM, 20.0, 1.0),
        ("x", MetricKind.PROMETHEUS, 5.0, 1.0),
    ]
    assert (p.up_stabilization, p.down_stabilization, p.interval) == (30.0, 300.0, 10.0)
    assert p.max_step_up == Step(amount=50, percent=True)
    assert p.max_step_down == Step(amount=2)
    assert p.algorithm == "proportional" and p.tolerance == 0.1
    assert p.history_window == 300.0


def test_defaults() -> None:
    p = AutoscalePolicy.model_validate({"max": 3, "metrics": [{"cpu": 70}]})
    assert (p.min, p.up_stabilization, p.down_stabilization, p.interval) == (1, 0, 300, 15)
    assert p.max_step_up is None and p.max_step_down is None


@pytest.mark.parametrize(
    ("fields", "loc", "message"),
    [
        ({"min": 5, "max": 2}, ("max",), "max (2) must not be below min (5)"),
        ({"min": -1}, ("min",), "greater than or equal to 0"),
        ({"metrics": []}, ("metrics",), "at least 1"),
        ({"metrics": [{"cpu": "seventy"}]}, ("metrics", 0, "cpu"), "percentage like 70%"),
        ({"metrics": [{"cpu": "0%"}]}, ("metrics", 0, "cpu"), "positive number"),
        ({"metrics": [{"latency_p99": "fast"}]}, ("metrics", 0, "latency_p99"), "duration"),
        ({"metrics": [{"queue_length": -3}]}, ("metrics", 0, "queue_length"), "positive"),
        ({"metrics": [{"cpu": 70, "memory": 80}]}, ("metrics", 0),
         "exactly one of cpu, memory"),
        ({"metrics": [{"weight": 2}]}, ("metrics", 0), "exactly one"),
        ({"metrics": [{"cpu": 70, "weight": 0}]}, ("metrics", 0, "weight"), "greater than 0"),
        ({"metrics": [{"gpu": 70}]}, ("metrics", 0, "gpu"), "Extra inputs"),
        ({"metrics": [{"cpu": 70}, {"cpu": 50}]}, ("metrics",), "'cpu' appears twice"),
        ({"metrics": [{"custom": {"name": "j", "url": "ftp://x", "target": 1}}]},
         ("metrics", 0, "custom", "url"), "http://"),
        ({"metrics": [{"custom": {"name": "j", "url": "http://x", "json_path": "pending",
                                  "target": 1}}]},
         ("metrics", 0, "custom", "json_path"), "start with '$'"),
        ({"up_cooldown": "30s", "up_stabilization": "30s"}, (), "not both"),
        ({"down_cooldown": "soon"}, ("down_cooldown",), "duration"),
        ({"max_step_up": "lots"}, ("max_step_up",), "percentage like 50%"),
        ({"max_step_down": 0}, ("max_step_down", "amount"), "greater than 0"),
        ({"interval": 0}, ("interval",), "above zero"),
        ({"tolerance": 1.5}, ("tolerance",), "less than 1"),
        ({"algorithm": "pid"}, ("algorithm",), "proportional"),
        ({"cooldown": "1m"}, ("cooldown",), "Extra inputs"),
    ],
)
def test_errors_are_located(fields: dict[str, Any], loc: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        AutoscalePolicy.model_validate({"max": 4, "metrics": [{"cpu": 70}]} | fields)
    errors = info.value.errors()
    assert any(e["loc"] == loc and message in e["msg"] for e in errors), errors


def test_policy_is_frozen() -> None:
    with pytest.raises(ValidationError):
        policy().min = 3  # type: ignore[misc]


# --- the HPA formula, table-driven --------------------------------------------------

@pytest.mark.parametrize(
    ("current", "samples", "metrics", "expected"),
    [
        (3, {"cpu": 92}, [{"cpu": "70%"}], 4),
        (1, {"cpu": 140}, [{"cpu": "70%"}], 2),
        (4, {"cpu": 35}, [{"cpu": "70%"}], 2),
        (10, {"cpu": 76}, [{"cpu": "70%"}], 10),  # ratio 1.086: inside the tolerance
        (10, {"cpu": 78}, [{"cpu": "70%"}], 12),  # ratio 1.114: ceil(11.14)
        (5, {"cpu": 64}, [{"cpu": "70%"}], 5),  # ratio 0.914: inside
        (5, {"cpu": 60}, [{"cpu": "70%"}], 5),  # ceil(4.29) = 5
        (5, {"cpu": 50}, [{"cpu": "70%"}], 4),  # ceil(3.57)
        (2, {"cpu": 35, "requests_per_second": 300},
         [{"cpu": "70%"}, {"requests_per_second": 100}], 6),  # the largest wins
        (3, {"latency_p99": 0.4}, [{"latency_p99": "200ms"}], 6),
        (2, {"queue_length": 120}, [{"queue_length": 50}], 5),
        (2, {"cpu": 700}, [{"cpu": "70%"}], 20),
        (8, {"cpu": 1}, [{"cpu": "70%"}], 1),
        (4, {"jobs": 45}, [{"custom": {"name": "jobs", "url": "http://h/", "target": 20}}], 9),
    ],
)
def test_hpa_formula(current: int, samples: dict[str, float], metrics: list[Any],
                     expected: int) -> None:
    got = decide(policy(metrics=metrics), current,
                 [MetricSample(n, v, 0.0) for n, v in samples.items()], [], 0.0)
    assert got.desired == expected
    assert got.recommendation == expected


def test_reason_says_what_and_why() -> None:
    got = decide(policy(), 3, cpu(92), [], 0.0)
    assert got == Decision(4, "cpu 92% vs target 70% over 3 instances → 4", got.inputs, 4)
    (metric,) = got.inputs
    assert (metric.name, metric.value, metric.target, metric.proposal) == ("cpu", 92, 70, 4)
    reason = decide(policy(max=5), 2, cpu(700), [], 0.0).reason
    assert reason == "cpu 700% vs target 70% over 2 instances → 20; max is 5 → 5"
    reason = decide(policy(metrics=[{"latency_p99": "200ms"}]), 1,
                    [MetricSample("latency_p99", 0.25, 0)], [], 0).reason
    assert reason == "latency_p99 250ms vs target 200ms over 1 instance → 2"


@pytest.mark.parametrize("algorithm", ["proportional", "weighted"])
def test_extreme_values(algorithm: str) -> None:
    p = policy(algorithm=algorithm, metrics=[{"cpu": "0.001%"}, {"memory": "80%"}])
    samples = [MetricSample("cpu", 1e308, 0), MetricSample("memory", 0.0, 0)]
    got = decide(p, 50, samples, [], 0)
    assert got.desired == (100 if algorithm == "proportional" else 75)
    assert "cpu 1e+308% vs target 0.001%" in got.reason
    assert decide(p, 50, [MetricSample("memory", 0.0, 0)], [], 0).desired == 50


def test_bounds_apply_to_the_recommendation_too() -> None:
    got = decide(policy(min=2, max=5), 3, cpu(1), [], 0.0)
    assert (got.desired, got.recommendation) == (2, 2)
    assert decide(policy(min=2, max=5), 3, cpu(1000), [], 0.0).recommendation == 5


# --- weighted -----------------------------------------------------------------------

WEIGHTED = {"algorithm": "weighted",
            "metrics": [{"cpu": "70%"}, {"latency_p99": "200ms", "weight": 3}]}


@pytest.mark.parametrize(
    ("current", "cpu_value", "latency", "expected"),
    [
        (4, 70, 0.2, 4),  # load 1.0
        (4, 140, 0.2, 6),  # (2 + 3) / 4 = 1.25 > 1.2: ceil(4 * 1.5)
        (4, 70, 0.3, 6),  # (1 + 4.5) / 4 = 1.375 > 1.2: ceil(4 * 1.5)
        (1, 70, 0.3, 2),  # at least one more
        (4, 35, 0.1, 3),  # 0.5 < 0.8: floor(4 * 0.75)
        (1, 35, 0.1, 1),  # floor(0.75) = 0, but min is 1
        (4, 56, 0.2, 4),  # (0.8 + 3) / 4 = 0.95: between the thresholds
    ],
)
def test_weighted(current: int, cpu_value: float, latency: float, expected: int) -> None:
    samples = [MetricSample("cpu", cpu_value, 0), MetricSample("latency_p99", latency, 0)]
    got = decide(policy(**WEIGHTED), current, samples, [], 0.0)
    assert got.desired == expected, got.reason
    assert got.reason.startswith("weighted load ")


# --- missing data ---------------------------------------------------------------------

def test_no_data_holds_and_says_so() -> None:
    got = decide(policy(), 3, [], [], 100.0)
    assert (got.desired, got.recommendation) == (3, None)
    assert got.reason == "no data for cpu: holding at 3"
    stale = decide(policy(), 3, cpu(500, at=100.0 - 46), [], 100.0)
    assert (stale.desired, stale.recommendation) == (3, None)
    nan = decide(policy(), 3, cpu(math.nan, at=100.0), [], 100.0)
    assert nan.desired == 3 and nan.inputs[0].value is None


def test_no_data_still_honours_bounds() -> None:
    got = decide(policy(max=4), 6, [], [], 0.0)
    assert got.desired == 4 and got.reason == "no data for cpu: holding at 6; max is 4 → 4"


def test_partial_data_scales_up_but_never_down() -> None:
    p = policy(metrics=[{"cpu": "70%"}, {"memory": "80%"}])
    assert decide(p, 3, cpu(140), [], 0.0).desired == 6
    got = decide(p, 3, cpu(10), [], 0.0)
    assert got.desired == 3
    assert "not scaling down without data for memory" in got.reason


def test_newest_sample_wins() -> None:
    samples = [MetricSample("cpu", 200, 10.0), MetricSample("cpu", 70, 20.0)]
    assert decide(policy(), 3, samples, [], 20.0).desired == 3


def test_zero_instances_are_not_measured() -> None:
    got = decide(policy(min=0), 0, cpu(500), [], 0.0)
    assert (got.desired, got.recommendation) == (0, None)
    assert decide(policy(min=2), 0, cpu(500), [], 0.0).desired == 2


# --- stabilization and steps ------------------------------------------------------

def test_down_window_keeps_the_highest_recent_recommendation() -> None:
    p = policy(down_stabilization="5m")
    history = [PastRecommendation(0.0, 6), PastRecommendation(15.0, 4)]
    got = decide(p, 6, cpu(10, 30.0), history, 30.0)
    assert got.desired == 6 and got.recommendation == 1
    assert "down-stabilization (5m) allows 6" in got.reason
    # once the 6 has left the window, the 4 is the highest
    assert decide(p, 6, cpu(10, 300.0), history, 300.0).desired == 4
    assert decide(p, 6, cpu(10, 316.0), history, 316.0).desired == 1


def test_up_window_keeps_the_lowest_recent_recommendation() -> None:
    p = policy(up_stabilization="1m")
    history = [PastRecommendation(0.0, 2), PastRecommendation(30.0, 8)]
    assert decide(p, 2, cpu(700, 45.0), history, 45.0).desired == 2
    assert decide(p, 2, cpu(700, 61.0), history, 61.0).desired == 8


def test_step_limits() -> None:
    assert decide(policy(max_step_up=2), 3, cpu(700), [], 0).desired == 5
    assert decide(policy(max_step_up="50%"), 4, cpu(700), [], 0).desired == 6
    assert decide(policy(max_step_up="10%"), 4, cpu(700), [], 0).desired == 5  # at least 1
    assert decide(policy(max_step_down=1), 10, cpu(1), [], 0).desired == 9
    got = decide(policy(max_step_down="25%"), 10, cpu(1), [], 0)
    assert got.desired == 7 and "max_step_down allows -3" in got.reason


def test_prune_history() -> None:
    p = policy(up_stabilization="30s", down_stabilization="1m")
    history = [PastRecommendation(t, 1) for t in (0.0, 40.0, 41.0, 100.0)]
    assert [r.at for r in prune_history(p, history, 100.0)] == [41.0, 100.0]


# --- properties --------------------------------------------------------------------

@st.composite
def policies(draw: st.DrawFn, algorithm: str | None = None) -> AutoscalePolicy:
    low = draw(st.integers(0, 10))
    high = draw(st.integers(max(low, 1), 40))
    steps = st.none() | st.integers(1, 5) | st.sampled_from(["10%", "50%", "100%", "200%"])
    return AutoscalePolicy.model_validate({
        "min": low, "max": high,
        "algorithm": algorithm or draw(st.sampled_from(["proportional", "weighted"])),
        "metrics": [{"cpu": "70%"}, {"requests_per_second": 100, "weight": 2}],
        "tolerance": draw(st.sampled_from([0.0, 0.1, 0.25])),
        "up_stabilization": draw(st.integers(0, 8)) * TICK,
        "down_stabilization": draw(st.integers(0, 20)) * TICK,
        "max_step_up": draw(steps),
        "max_step_down": draw(steps),
    })


values = st.floats(0, 2000, allow_nan=False)
maybe = st.none() | values
ticks = st.lists(st.tuples(maybe, maybe), min_size=1, max_size=40)


def samples_at(at: float, cpu_value: float | None, rps: float | None) -> list[MetricSample]:
    found = [] if cpu_value is None else [MetricSample("cpu", cpu_value, at)]
    return found + ([] if rps is None else [MetricSample("requests_per_second", rps, at)])


def run(p: AutoscalePolicy, start: int, series: list[tuple[float | None, float | None]],
        ) -> list[tuple[float, int, int]]:
    """Feed the decisions back as the engine does; (time, before, after) per tick."""
    current, history, out = start, [], []
    for index, (cpu_value, rps) in enumerate(series):
        now = index * TICK
        got = decide(p, current, samples_at(now, cpu_value, rps), history, now)
        if got.recommendation is not None:
            history.append(PastRecommendation(now, got.recommendation))
        out.append((now, current, got.desired))
        current = got.desired
    return out


@settings(max_examples=300, deadline=None)
@given(policies(), st.integers(0, 60), maybe, maybe, st.lists(st.integers(0, 60), max_size=5))
def test_never_outside_the_bounds(p: AutoscalePolicy, current: int, cpu_value: float | None,
                                  rps: float | None, past: list[int]) -> None:
    history = [PastRecommendation(-TICK * (i + 1), r) for i, r in enumerate(past)]
    got = decide(p, current, samples_at(0.0, cpu_value, rps), history, 0.0)
    assert p.min <= got.desired <= p.max
    assert got.recommendation is None or p.min <= got.recommendation <= p.max
    assert got.reason


@settings(max_examples=300, deadline=None)
@given(st.data(), policies(), ticks)
def test_no_flapping_inside_a_window(data: st.DataObject, p: AutoscalePolicy,
                                     series: list[tuple[float | None, float | None]]) -> None:
    start = data.draw(st.integers(p.min, p.max))
    moves = [(t, (after > before) - (after < before)) for t, before, after in run(p, start, series)]
    moves = [(t, d) for t, d in moves if d]
    for i, (t_first, first) in enumerate(moves):
        for t_next, nxt in moves[i + 1:]:
            if first > 0 and nxt < 0:  # down after up: only once the down window has passed
                assert t_next - t_first >= p.down_stabilization, moves
            if first < 0 and nxt > 0:
                assert t_next - t_first >= p.up_stabilization, moves


@settings(max_examples=300, deadline=None)
@given(st.data(), policies(), ticks)
def test_step_limits_hold(data: st.DataObject, p: AutoscalePolicy,
                          series: list[tuple[float | None, float | None]]) -> None:
    start = data.draw(st.integers(p.min, p.max))
    for _, before, after in run(p, start, series):
        if p.max_step_up is not None:
            assert after - before <= p.max_step_up.limit(before)
        if p.max_step_down is not None:
            assert before - after <= p.max_step_down.limit(before)


@settings(max_examples=300, deadline=None)
@given(st.data(), policies("proportional"), values, values, maybe,
       st.lists(st.integers(0, 40), max_size=5))
def test_proportional_is_monotonic(data: st.DataObject, p: AutoscalePolicy, a: float,
                                   b: float, rps: float | None, past: list[int]) -> None:
    current = data.draw(st.integers(max(p.min, 1), p.max))
    history = [PastRecommendation(-TICK * (i + 1), r) for i, r in enumerate(past)]
    low, high = sorted((a, b))
    first = decide(p, current, samples_at(0.0, low, rps), history, 0.0)
    second = decide(p, current, samples_at(0.0, high, rps), history, 0.0)
    assert first.desired <= second.desired


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 50), st.floats(0.01, 10_000), st.floats(-0.99, 0.99),
       st.sampled_from([0.05, 0.1, 0.3]))
def test_tolerance_band_holds(current: int, target: float, share: float,
                              tolerance: float) -> None:
    p = policy(max=50, metrics=[{"queue_length": target}], tolerance=tolerance)
    value = target * (1 + share * tolerance)
    assert decide(p, current, [MetricSample("queue_length", value, 0)], [], 0).desired == current


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 50), st.floats(0.01, 10_000), st.floats(0, 1e6))
def test_matches_the_hpa_formula(current: int, target: float, value: float) -> None:
    p = policy(max=1000, metrics=[{"queue_length": target}])
    got = decide(p, current, [MetricSample("queue_length", value, 0)], [], 0)
    exact = Fraction(current) * Fraction(value) / Fraction(target)
    assume(abs(exact - round(exact)) > 1e-6 or exact == round(exact))  # float noise aside
    expected = current if abs(value / target - 1) <= 0.1 else math.ceil(exact)
    assert got.desired == min(max(expected, 1), 1000)


def test_design_example_and_its_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    example = {"min": 1, "max": 10, "metrics": [{"cpu": "70%"}],
               "up_cooldown": "30s", "down_cooldown": "5m"}
    jsonschema.validate(example, AutoscalePolicy.model_json_schema(mode="validation"))
    parsed = AutoscalePolicy.model_validate(example)
    assert (parsed.up_stabilization, parsed.down_stabilization) == (30.0, 300.0)
