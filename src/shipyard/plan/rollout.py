"""Rollout decisions, as pure functions: what the engine does next when replacing a
service's instances with a new revision, and whether a new revision's traffic figures pass.

- `rolling_step`: how many new instances to start and old ones to stop now, bounded by
  surge and unavailability (Kubernetes' Deployment controller rules).
- `canary_replicas` / `canary_weights`: instance counts and router weights for a step.
- `window_of` / `analyse`: a traffic window between two snapshots of a revision's router
  counters, judged against absolute thresholds and against the stable revision.

The engine (engine/rollout.py) and the Kubernetes target share these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from shipyard.spec.models import Service

__all__ = [
    "RollingCounts",
    "RollingStep",
    "Verdict",
    "Window",
    "analyse",
    "canary_replicas",
    "canary_weights",
    "describe_update",
    "rolling_step",
    "window_of",
]


@dataclass(frozen=True)
class RollingCounts:
    """Where a rolling update stands. `new_available`: new instances ready for at least
    `min_ready`; `new_total` includes those still starting."""

    replicas: int
    old_total: int
    old_ready: int
    new_total: int
    new_available: int


@dataclass(frozen=True)
class RollingStep:
    start: int  # new instances to start now
    stop_unready: int  # old instances that are not ready, to stop now (they serve nobody)
    stop_ready: int  # old ready instances to stop now
    done: bool = False

    @property
    def idle(self) -> bool:
        return not (self.start or self.stop_unready or self.stop_ready or self.done)


def rolling_step(c: RollingCounts, surge: int, unavailable: int) -> RollingStep:
    """The next move of a rolling update.

    Invariants kept (given the old instances were all ready when it began): at most
    `replicas + surge` instances exist, and at least `replicas - unavailable` are
    available (old ready + new available), counting down only what this step stops."""
    if c.old_total == 0 and c.new_available >= c.replicas:
        return RollingStep(0, 0, 0, done=True)
    total = c.old_total + c.new_total
    start = max(0, min(c.replicas - c.new_total, c.replicas + surge - total))
    # old instances that are not ready count for nothing: always safe to stop (first)
    stop_unready = c.old_total - c.old_ready
    # ready old ones as far as availability allows (with no surge, this is what makes
    # room for the first new instance)
    available = c.old_ready + c.new_available
    stop_ready = max(0, min(c.old_ready, available - (c.replicas - unavailable)))
    return RollingStep(start, stop_unready, stop_ready)


def describe_update(action: str, service: Service | None, fields: tuple[str, ...] | list[str],
                    *, running: bool = True) -> str:
    """How `shipyard up` will carry a change out, in words for `shipyard plan`."""
    from shipyard.plan.diff import SCALE_FIELDS

    if action == "add" or service is None:
        return "start" if action == "add" else ("stop" if action == "remove" else "")
    if action == "unchanged":
        return ""
    if not running:
        return "start"
    if fields and all(f.split(".")[0] in SCALE_FIELDS for f in fields):
        return f"scale in place to {service.replicas}, no restart"
    update = service.update
    strategy = update.strategy.value
    if strategy == "rolling":
        fixed = service.expose is None or any(p != "auto" for p in service.ports.values())
        surge, unavailable = update.surge_and_unavailable(service.replicas, fixed_ports=fixed)
        where = "in place, " if fixed else ""
        return f"rolling ({where}max surge {surge}, max unavailable {unavailable})"
    if strategy == "canary":
        steps = " → ".join(f"{s.weight}%" for s in update.steps)
        manual = ", manual promotion" if update.promotion == "manual" else ""
        return f"canary ({steps} → 100%{manual})"
    if strategy == "blue-green":
        manual = "manual promotion" if update.promotion == "manual" else "automatic swap"
        return f"blue-green ({manual}, previous kept {update.keep_previous:g}s)"
    return "recreate (stop all, then start)"


def canary_replicas(replicas: int, weight: int) -> int:
    """How many canary instances carry `weight`% of the traffic of `replicas` (at least
    one, at most all)."""
    return max(1, min(replicas, math.ceil(replicas * weight / 100)))


def canary_weights(stable: str, canary: str, weight: int) -> dict[str, int]:
    """Router weights per revision for a canary step."""
    return {stable: 100 - weight, canary: weight}


# -- analysis ------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A revision's HTTP traffic over an analysis window."""

    requests: int
    errors: int  # 5xx answers
    buckets: tuple[tuple[float, int], ...] = ()  # (upper bound, cumulative count)

    @property
    def error_rate(self) -> float:
        """Percent of requests answered 5xx (0 without requests)."""
        return 100.0 * self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """The q-quantile of latency, interpolated within its bucket (as PromQL does)."""
        if not self.requests or not self.buckets:
            return None
        total = self.buckets[-1][1]
        if total == 0:
            return None
        rank = q * total
        low_bound, low_count = 0.0, 0
        for bound, count in self.buckets:
            if count >= rank:
                if math.isinf(bound):
                    return low_bound
                span = count - low_count
                share = (rank - low_count) / span if span else 1.0
                return low_bound + (bound - low_bound) * share
            low_bound, low_count = bound, count
        return low_bound


def window_of(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> Window:
    """The traffic between two `RequestStats.snapshot()`s of one revision (either may be
    None: a revision that had no traffic yet)."""
    empty: Mapping[str, Any] = {"requests": 0, "codes": {}, "latency": {"buckets": {}}}
    b, a = before or empty, after or empty
    requests = a["requests"] - b["requests"]
    errors = a["codes"].get("5xx", 0) - b["codes"].get("5xx", 0)
    bounds_after = a["latency"]["buckets"]
    bounds_before = b["latency"]["buckets"]
    buckets = tuple(
        (float("inf") if le == "+Inf" else float(le), count - bounds_before.get(le, 0))
        for le, count in bounds_after.items()
    )
    return Window(requests, errors, buckets)


@dataclass(frozen=True)
class Verdict:
    outcome: Literal["pass", "fail", "inconclusive"]
    reason: str


def analyse(new: Window, stable: Window | None, *, max_error_rate: float,
            max_latency_p99: float | None, max_relative: float | None,
            min_requests: int) -> Verdict:
    """Judge the new revision's window: fail on an error rate or p99 above the absolute
    thresholds, or above `max_relative` times the stable revision's (plus one percentage
    point / 10 ms of slack); inconclusive with fewer than `min_requests` requests."""
    if new.requests < min_requests:
        return Verdict("inconclusive",
                       f"{new.requests} request(s) to the new revision, fewer than "
                       f"{min_requests}")
    rate = new.error_rate
    p99 = new.quantile(0.99)
    figures = f"error rate {rate:.1f}%" + (f", p99 {p99 * 1000:.0f}ms" if p99 else "") + \
        f" over {new.requests} requests"
    if rate > max_error_rate:
        return Verdict("fail", f"{figures}: error rate above {max_error_rate:g}%")
    if max_latency_p99 is not None and p99 is not None and p99 > max_latency_p99:
        return Verdict("fail", f"{figures}: p99 above {max_latency_p99 * 1000:.0f}ms")
    if max_relative is not None and stable is not None and stable.requests >= min_requests:
        limit = stable.error_rate * max_relative + 1.0
        if rate > limit:
            return Verdict("fail", f"{figures}: error rate above {max_relative:g}x the "
                                   f"stable revision's {stable.error_rate:.1f}%")
        stable_p99 = stable.quantile(0.99)
        if p99 is not None and stable_p99 is not None \
                and p99 > stable_p99 * max_relative + 0.010:
            return Verdict("fail", f"{figures}: p99 above {max_relative:g}x the stable "
                                   f"revision's {stable_p99 * 1000:.0f}ms")
    return Verdict("pass", figures)
