"""How many instances a service should run, given its autoscale policy and fresh metrics.

Pure: the caller passes the current count, the latest samples, the recommendations it
recorded on earlier ticks and the time, so a decision can be replayed exactly and the
engine owns the only clock. The steps, in order (as Kubernetes' HPA):

1. a raw recommendation from the metrics (`proportional` or `weighted`), clamped to
   [min, max]; the caller records it as a `PastRecommendation`;
2. stabilization: a scale-up goes only as far as the lowest recommendation of the up
   window, a scale-down only as far as the highest of the down window;
3. step limits (`max_step_up`, `max_step_down`);
4. the [min, max] bounds, which always win.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shipyard.spec.autoscale import Algorithm, AutoscalePolicy, Target
from shipyard.spec.units import format_duration

__all__ = [
    "Decision",
    "MetricInput",
    "MetricSample",
    "PastRecommendation",
    "decide",
    "prune_history",
]


_HUGE = 2**31  # a proposal cap: bounds are far lower, and ceil() of it stays finite


@dataclass(frozen=True, slots=True)
class MetricSample:
    """The latest value of one metric for the whole service, in the unit of its target:
    percent for cpu / memory / error_rate, seconds for latencies, and per-instance counts
    for rates, connections, queue lengths and custom metrics. `at`: when it was taken."""

    name: str
    value: float
    at: float


@dataclass(frozen=True, slots=True)
class PastRecommendation:
    """A raw recommendation recorded on an earlier tick (`Decision.recommendation`)."""

    at: float
    recommendation: int


@dataclass(frozen=True, slots=True)
class MetricInput:
    """What one metric contributed: its value (None: no fresh sample), target, the ratio
    value/target, and for `proportional` the count it alone asks for."""

    name: str
    value: float | None
    target: float
    ratio: float | None
    proposal: int | None


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    reason: str
    inputs: tuple[MetricInput, ...]
    # Record as PastRecommendation(now, recommendation); None when there was no data.
    recommendation: int | None

    def change(self, current: int) -> int:
        """+1 scale up, -1 scale down, 0 hold."""
        return (self.desired > current) - (self.desired < current)


def decide(
    policy: AutoscalePolicy,
    current: int,
    samples: Iterable[MetricSample],
    history: Sequence[PastRecommendation],
    now: float,
) -> Decision:
    """The instance count for the next interval, and why."""
    low, high = policy.min, policy.max
    targets = policy.targets
    values = _fresh(samples, now - policy.stale_after)
    proportional = policy.algorithm is Algorithm.PROPORTIONAL
    inputs: list[MetricInput] = []
    missing: list[str] = []
    for metric in targets:
        value = values.get(metric.name)
        if value is None:
            missing.append(metric.name)
            inputs.append(MetricInput(metric.name, None, metric.target, None, None))
            continue
        ratio = value / metric.target
        proposal = None
        if proportional and current > 0:
            proposal = _proposal(current, value, metric.target, ratio, policy.tolerance)
        inputs.append(MetricInput(metric.name, value, metric.target, ratio, proposal))

    if current <= 0 or len(missing) == len(inputs):
        held = min(max(current, low), high)
        why = ("no running instances to measure" if current <= 0
               else f"no data for {', '.join(missing)}")
        reason = f"{why}: holding at {current}"
        if held != current:
            reason += f"; {'min' if held == low else 'max'} is {held} → {held}"
        return Decision(held, reason, tuple(inputs), None)

    if proportional:
        raw, text = _proportional(policy, current, inputs)
    else:
        raw, text = _weighted(policy, current, inputs)
    notes: list[str] = []
    wanted = raw
    if missing and raw < current:
        raw = current
        notes.append(f"not scaling down without data for {', '.join(missing)}")
    recommendation = min(max(raw, low), high)

    desired = _stabilize(policy, current, recommendation, history, now, notes)
    desired = _step_limit(policy, current, desired, notes)
    final = min(max(desired, low), high)
    if final != desired:
        notes.append(f"{'min' if final == low else 'max'} is {final}")
    if raw != recommendation:
        notes.insert(0, f"{'min' if recommendation == low else 'max'} is {recommendation}")
    reason = f"{text} → {wanted}"
    if notes:
        reason += "; " + "; ".join(notes)
    if final != wanted:
        reason += f" → {final}"
    return Decision(final, reason, tuple(inputs), recommendation)


def prune_history(
    policy: AutoscalePolicy, history: Iterable[PastRecommendation], now: float
) -> list[PastRecommendation]:
    """The records still inside a stabilization window; the rest can be forgotten."""
    cutoff = now - policy.history_window
    return [rec for rec in history if rec.at > cutoff]


def _fresh(samples: Iterable[MetricSample], oldest: float) -> dict[str, float]:
    """The newest usable value per metric; stale, NaN and infinite values are no data."""
    best: dict[str, MetricSample] = {}
    for sample in samples:
        if sample.at < oldest or not math.isfinite(sample.value) or sample.value < 0:
            continue
        seen = best.get(sample.name)
        if seen is None or sample.at >= seen.at:
            best[sample.name] = sample
    return {name: sample.value for name, sample in best.items()}


def _proposal(current: int, value: float, target: float, ratio: float,
              tolerance: float) -> int:
    """ceil(current * value / target), or `current` inside the tolerance band (as HPA)."""
    if abs(ratio - 1.0) <= tolerance:
        return current
    wanted = current * value / target
    if wanted >= _HUGE:  # far beyond any max; also keeps an infinite ratio out of ceil
        return _HUGE
    # rounded first: 3 * 0.4 / 0.2 is 6.000000000000001 in floats, and must be 6
    return math.ceil(round(wanted, 9))


def _proportional(
    policy: AutoscalePolicy, current: int, inputs: list[MetricInput]
) -> tuple[int, str]:
    """The largest proposal over the metrics with data, and the metric that made it."""
    best, proposal = -1, -1
    for index, item in enumerate(inputs):
        if item.proposal is not None and item.proposal > proposal:
            best, proposal = index, item.proposal
    value = inputs[best].value
    assert value is not None  # the caller made sure some metric has data
    text = f"{_versus(policy.targets[best], value)} over {_instances(current)}"
    if proposal == current:
        text += f" (within tolerance {_num(policy.tolerance * 100)}%)"
    return proposal, text


def _weighted(
    policy: AutoscalePolicy, current: int, inputs: list[MetricInput]
) -> tuple[int, str]:
    """The weighted mean of value/target: above `scale_up_threshold` multiply by
    `scale_up_factor` (at least +1), below `scale_down_threshold` by `scale_down_factor`
    (at least -1). The reason names the three metrics that pull hardest that way."""
    total = weights = 0.0
    pulls: list[tuple[float, int]] = []
    for index, (metric, item) in enumerate(zip(policy.targets, inputs, strict=True)):
        if item.ratio is None:
            continue
        total += metric.weight * item.ratio
        weights += metric.weight
        pulls.append((metric.weight * item.ratio, index))
    load = total / weights
    if load > policy.scale_up_threshold:
        proposal = max(current + 1, math.ceil(current * policy.scale_up_factor))
    elif load < policy.scale_down_threshold:
        proposal = max(0, min(current - 1, math.floor(current * policy.scale_down_factor)))
    else:
        proposal = current
    pulls.sort(reverse=proposal >= current)
    parts = [_versus(policy.targets[i], inputs[i].value or 0.0) for _, i in pulls[:3]]
    if len(pulls) > 3:
        parts.append(f"{len(pulls) - 3} more")
    text = f"weighted load {load:.2f} ({', '.join(parts)}) over {_instances(current)}"
    return proposal, text


def _stabilize(
    policy: AutoscalePolicy,
    current: int,
    recommendation: int,
    history: Sequence[PastRecommendation],
    now: float,
    notes: list[str],
) -> int:
    up_cutoff = now - policy.up_stabilization
    down_cutoff = now - policy.down_stabilization
    up = down = recommendation
    for rec in history:
        if rec.at > up_cutoff and rec.recommendation < up:
            up = rec.recommendation
        if rec.at > down_cutoff and rec.recommendation > down:
            down = rec.recommendation
    desired = current
    if desired < up:
        desired = up
    if desired > down:
        desired = down
    if recommendation > current and up < recommendation:
        window = format_duration(policy.up_stabilization)
        notes.append(f"up-stabilization ({window}) allows {max(up, current)}")
    elif recommendation < current and down > recommendation:
        window = format_duration(policy.down_stabilization)
        notes.append(f"down-stabilization ({window}) allows {min(down, current)}")
    return desired


def _step_limit(policy: AutoscalePolicy, current: int, desired: int, notes: list[str]) -> int:
    if desired > current and policy.max_step_up is not None:
        limit = policy.max_step_up.limit(current)
        if desired - current > limit:
            notes.append(f"max_step_up allows +{limit}")
            return current + limit
    if desired < current and policy.max_step_down is not None:
        limit = policy.max_step_down.limit(current)
        if current - desired > limit:
            notes.append(f"max_step_down allows -{limit}")
            return current - limit
    return desired


def _versus(metric: Target, value: float) -> str:
    return f"{metric.name} {_show(metric, value)} vs target {_show(metric, metric.target)}"


def _show(metric: Target, value: float) -> str:
    unit = metric.unit
    if unit == "percent":
        return f"{_num(value)}%"
    if unit == "seconds":
        return format_duration(value)
    return _num(value)


def _num(value: float) -> str:
    """Short and exact enough to read: 92, 12.5, 0.04, 0.001, 3e+09."""
    if 0.01 <= value < 1e9:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def _instances(count: int) -> str:
    return f"{count} instance" if count == 1 else f"{count} instances"
