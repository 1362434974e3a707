"""The `update:` block of a service: how a changed spec replaces the running instances.

- `rolling` (default): new instances replace old ones a few at a time, bounded by
  `max_surge` (extra instances above `replicas`) and `max_unavailable` (ready instances
  below `replicas`), numbers or percentages of `replicas` as in Kubernetes (surge rounds
  up, unavailable rounds down). A new instance counts once it has stayed ready for
  `min_ready`; the whole rollout must finish within `progress_deadline`.
- `blue-green`: the full new set starts beside the old, is verified, and the router swaps
  to it at once; the old set is kept `keep_previous` for an instant rollback.
- `canary`: new instances take a growing share of the router's traffic, `steps` of weight,
  each held for an analysis window that compares them against thresholds and the stable
  revision.
- `recreate`: stop the old instances, then start the new ones (downtime; for services that
  must never run twice).
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from shipyard.spec.base import Duration, Model
from shipyard.spec.units import parse_duration

__all__ = ["Analysis", "CanaryStep", "UpdatePolicy", "UpdateStrategy", "Verify", "resolve_count"]

_COUNT_RE = re.compile(r"^\s*(\d+)\s*(%?)\s*$")


def _count_or_percent(value: Any) -> Any:
    """`1` or `"25%"`: kept as an int or a normalised `"25%"` string."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number or a percentage like 25%, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    if isinstance(value, str) and (match := _COUNT_RE.match(value)):
        number = int(match.group(1))
        if not match.group(2):
            return number
        if number > 100:
            raise ValueError(f"a percentage must be at most 100%, got {value!r}")
        return f"{number}%"
    raise ValueError(f"expected a number or a percentage like 25%, got {value!r}")


CountOrPercent = Annotated[
    int | str, BeforeValidator(_count_or_percent, json_schema_input_type=int | str)
]


def _percent(value: Any) -> Any:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1])
        except ValueError:
            pass
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"expected a percentage like 5%, got {value!r}")


Percent = Annotated[float, BeforeValidator(_percent, json_schema_input_type=float | str)]
# Duration with the editor's schema widened to strings (spec/schema.py widens only the
# fields of models it walks; these nested models carry their own)
Seconds = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=float | str)]


def resolve_count(value: int | str, replicas: int, *, round_up: bool) -> int:
    """A `max_surge` / `max_unavailable` value as a number of instances for `replicas`."""
    if isinstance(value, int):
        return value
    fraction = int(value.rstrip("%")) * replicas / 100
    return math.ceil(fraction) if round_up else math.floor(fraction)


class UpdateStrategy(StrEnum):
    ROLLING = "rolling"
    BLUE_GREEN = "blue-green"
    CANARY = "canary"
    RECREATE = "recreate"


class Verify(Model):
    """Checks a new set must pass before it takes traffic: GET each `http` path on every
    new instance (2xx expected), and/or run `exec` once (exit 0 expected; never a shell)."""

    http: list[str] = Field(default_factory=list)
    port: str | int | None = None  # port name or number (default: the first port)
    exec: list[str] | None = None
    timeout: Seconds = 10.0

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("http"), str):
            return {**data, "http": [data["http"]]}
        return data

    @field_validator("http")
    @classmethod
    def _paths(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f"an HTTP check is a path starting with /, got {path!r}")
        return paths

    @model_validator(mode="after")
    def _something(self) -> Verify:
        if not self.http and not self.exec:
            raise ValueError("verify needs http paths, an exec command, or both")
        if self.exec is not None and not self.exec:
            raise ValueError("verify.exec must not be empty")
        return self


class Analysis(Model):
    """What the router's figures for the new revision must satisfy over a window.

    Absolute thresholds (`max_error_rate`, `max_latency_p99`) and, when the stable revision
    serves traffic at the same time (canary), a relative one: the new revision's error
    rate and p99 may exceed the stable's by at most `max_relative` times (plus one
    percentage point / 10 ms of slack, so a stable revision with no errors at all does not
    make a single error fatal). A window with fewer than `min_requests` requests to the new
    revision is inconclusive and is extended once, then passes on readiness alone."""

    window: Seconds = 30.0
    interval: Seconds = 5.0
    max_error_rate: Percent = 5.0
    max_latency_p99: Seconds | None = None
    max_relative: float | None = Field(2.0, gt=1, allow_inf_nan=False)
    min_requests: int = Field(20, ge=0)

    @field_validator("window", "interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be above zero, like 30s")
        return value


class CanaryStep(Model):
    """One canary step: send `weight`% of the traffic to the new revision, then hold for
    `pause` (default: the analysis window) while the analysis runs."""

    weight: int = Field(ge=1, le=100)
    pause: Seconds | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, int | str) and not isinstance(data, bool):
            text = str(data).strip().rstrip("%")
            return {"weight": int(text)} if text.isdigit() else data
        return data


class UpdatePolicy(Model):
    strategy: UpdateStrategy = UpdateStrategy.ROLLING
    max_surge: CountOrPercent = 1
    max_unavailable: CountOrPercent = 0
    min_ready: Duration = 0.0
    progress_deadline: Duration = 600.0
    auto_rollback: bool = True
    # blue-green and canary: `manual` waits for `shipyard promote` before the swap / the
    # last step
    promotion: Literal["auto", "manual"] = "auto"
    verify: Verify | None = None
    analysis: Analysis | None = None
    keep_previous: Duration = 300.0
    steps: list[CanaryStep] = Field(
        default_factory=lambda: [CanaryStep(weight=10), CanaryStep(weight=50)]
    )

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[CanaryStep]) -> list[CanaryStep]:
        if not steps:
            raise ValueError("a canary needs at least one step, like [10, 50]")
        weights = [step.weight for step in steps]
        if any(b <= a for a, b in pairwise(weights)):
            raise ValueError(f"step weights must increase, got {weights}")
        return steps

    @model_validator(mode="after")
    def _progress_possible(self) -> UpdatePolicy:
        if self.strategy == UpdateStrategy.ROLLING and self.max_surge in (0, "0%") \
                and self.max_unavailable in (0, "0%"):
            raise ValueError("max_surge and max_unavailable cannot both be 0: "
                             "the rollout could never replace an instance")
        if self.progress_deadline <= 0:
            raise ValueError("progress_deadline must be above zero, like 10m")
        return self

    def surge_and_unavailable(self, replicas: int, *, fixed_ports: bool) -> tuple[int, int]:
        """(extra instances allowed, ready instances that may be missing) for `replicas`.

        As in Kubernetes, a percentage of surge rounds up and of unavailable rounds down,
        and if both come out 0 one instance may be unavailable. A service with a fixed port
        cannot run two instances on it at once: no surge, at least one unavailable."""
        surge = resolve_count(self.max_surge, replicas, round_up=True)
        unavailable = resolve_count(self.max_unavailable, replicas, round_up=False)
        if fixed_ports:
            surge, unavailable = 0, max(unavailable, 1)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        return surge, min(unavailable, max(replicas, 1))
