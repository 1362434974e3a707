"""The `autoscale:` block of a service: bounds, metric targets and how fast to move.

Targets are parsed into the unit the engine samples in, so the decision layer compares
plain numbers: CPU, memory and error rate in percent (`70%` → 70.0), latencies in seconds
(`200ms` → 0.2), rates, connections and queue lengths as counts. Each metric keeps the
stack file's shape (`- cpu: 70%`, `- custom: {...}`), so a bad value is reported at the
line and field the user wrote.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from shipyard.spec.base import MAX_REPLICAS, Model
from shipyard.spec.units import parse_duration

__all__ = [
    "Algorithm",
    "AutoscalePolicy",
    "CustomMetric",
    "MetricKind",
    "MetricTarget",
    "PrometheusMetric",
    "Step",
    "Target",
]

_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%?\s*$")


def _positive(value: float, text: object, example: str) -> float:
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ValueError(f"a target must be a positive number like {example}, got {text!r}")
    return value


def parse_percent(value: object) -> float:
    """A percentage target: `70%` → 70.0; a bare number is read as percent too."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _positive(float(value), value, "70%")
    if isinstance(value, str) and (match := _PERCENT_RE.match(value)):
        return _positive(float(match.group(1)), value, "70%")
    raise ValueError(f"expected a percentage like 70%, got {value!r}")


def parse_count(value: object) -> float:
    """A per-instance amount: `100`, `12.5`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _positive(float(value), value, "100")
    if isinstance(value, str):
        try:
            return _positive(float(value.strip()), value, "100")
        except ValueError as exc:
            if "positive" in str(exc):
                raise
    raise ValueError(f"expected a positive number like 100, got {value!r}")


def parse_latency(value: object) -> float:
    """A latency target in seconds: `200ms` → 0.2; must be above zero."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"a latency target must be above zero, got {value!r}")
    return seconds


# `json_schema_input_type`: an editor's schema accepts what a user writes (`70%`, `200ms`).
Percent = Annotated[float, BeforeValidator(parse_percent, json_schema_input_type=float | str)]
Count = Annotated[float, BeforeValidator(parse_count, json_schema_input_type=float | str)]
Latency = Annotated[float, BeforeValidator(parse_latency, json_schema_input_type=float | str)]
# models.Duration, with the same schema widening (spec/schema.py only walks models.py)
Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=float | str)]


class MetricKind(StrEnum):
    CPU = "cpu"  # average CPU % of one core per instance
    MEMORY = "memory"  # average resident memory, % of the instance's memory limit
    REQUESTS_PER_SECOND = "requests_per_second"  # per instance, from the router
    LATENCY_P99 = "latency_p99"  # seconds, from the router
    LATENCY_P50 = "latency_p50"  # seconds, from the router
    ERROR_RATE = "error_rate"  # % of requests, from the router
    CONNECTIONS = "connections"  # open connections per instance, from the router
    QUEUE_LENGTH = "queue_length"  # per instance
    CUSTOM = "custom"  # a number read over HTTP
    PROMETHEUS = "prometheus"  # a PromQL query


# How each built-in target is written, and how its values read in a decision's reason.
UNITS: dict[MetricKind, Literal["percent", "seconds", "count"]] = {
    MetricKind.CPU: "percent",
    MetricKind.MEMORY: "percent",
    MetricKind.ERROR_RATE: "percent",
    MetricKind.LATENCY_P99: "seconds",
    MetricKind.LATENCY_P50: "seconds",
}


class CustomMetric(Model):
    """A number read from an HTTP endpoint: the whole body, or the value at `json_path`
    (`$.pending`, `$.queues[0].depth`)."""

    name: str = Field(min_length=1)
    url: str
    json_path: str | None = None
    target: Count

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {value!r}")
        return value

    @field_validator("json_path")
    @classmethod
    def _json_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("$"):
            raise ValueError(f"json_path must start with '$', like $.pending, got {value!r}")
        return value


class PrometheusMetric(Model):
    """A PromQL query against the configured Prometheus; its value is compared per instance
    like any other metric."""

    query: str = Field(min_length=1)
    target: Count
    name: str = Field("prometheus", min_length=1)


class MetricTarget(Model):
    """One entry of `metrics:`: exactly one metric with its target, and an optional weight
    (used by the `weighted` algorithm)."""

    cpu: Percent | None = None
    memory: Percent | None = None
    requests_per_second: Count | None = None
    latency_p99: Latency | None = None
    latency_p50: Latency | None = None
    error_rate: Percent | None = None
    connections: Count | None = None
    queue_length: Count | None = None
    custom: CustomMetric | None = None
    prometheus: PrometheusMetric | None = None
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)

    # Derived once at validation: a decision reads them on every tick.
    _kind: MetricKind = PrivateAttr(MetricKind.CPU)
    _name: str = PrivateAttr("")
    _target: float = PrivateAttr(0.0)

    @model_validator(mode="after")
    def _exactly_one(self) -> MetricTarget:
        kinds = [k for k in MetricKind if getattr(self, k.value) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "a metric needs exactly one of " + ", ".join(k.value for k in MetricKind)
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        spec = getattr(self, kinds[0].value)
        named = isinstance(spec, CustomMetric | PrometheusMetric)
        self._kind = kinds[0]
        self._name = spec.name if named else kinds[0].value
        self._target = spec.target if named else spec
        return self

    @property
    def kind(self) -> MetricKind:
        return self._kind

    @property
    def name(self) -> str:
        """What samples of this metric are called: the kind, or a custom metric's name."""
        return self._name

    @property
    def target(self) -> float:
        return self._target

    @property
    def unit(self) -> Literal["percent", "seconds", "count"]:
        return UNITS.get(self._kind, "count")


@dataclass(frozen=True, slots=True)
class Target:
    """One metric as the decision reads it: plain attributes, derived once per policy."""

    name: str
    target: float
    weight: float
    unit: Literal["percent", "seconds", "count"]


class Step(Model):
    """The most instances one decision may add or remove: a count, or a percentage of the
    current count (rounded up, at least one)."""

    amount: float = Field(gt=0, allow_inf_nan=False)
    percent: bool = False

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `max_step_up: 2` or `max_step_up: 50%`
        if isinstance(value, bool):
            raise ValueError(f"expected a count like 2 or a percentage like 50%, got {value!r}")
        if isinstance(value, int | float):
            return {"amount": value}
        if isinstance(value, str):
            match = _PERCENT_RE.match(value)
            if not match:
                raise ValueError(
                    f"expected a count like 2 or a percentage like 50%, got {value!r}"
                )
            return {"amount": float(match.group(1)), "percent": value.strip().endswith("%")}
        return value

    def limit(self, current: int) -> int:
        if self.percent:
            return max(1, math.ceil(current * self.amount / 100.0 - 1e-9))
        return max(1, math.floor(self.amount))


StepLimit = Annotated[
    Step | None,
    WithJsonSchema(
        {"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                   {"type": "string", "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*%?\s*$"},
                   {"type": "null"}]},
        mode="validation",
    ),
]


def _alias_properties(schema: dict[str, Any]) -> None:
    """The schema lists the DESIGN spellings `up_cooldown` / `down_cooldown` too."""
    props = schema.get("properties", {})
    for name, alias in (("up_stabilization", "up_cooldown"),
                        ("down_stabilization", "down_cooldown")):
        if name in props:
            props[alias] = {**props[name], "title": alias.replace("_", " ").title()}


class Algorithm(StrEnum):
    PROPORTIONAL = "proportional"  # as Kubernetes' HPA
    WEIGHTED = "weighted"  # weighted average of value/target, fixed factors


class AutoscalePolicy(Model):
    """How a service's instance count follows its metrics. Stabilization windows as in
    Kubernetes' HPA: a scale-up takes the lowest recommendation of the last
    `up_stabilization`, a scale-down the highest of the last `down_stabilization`, so a
    spike or a dip shorter than the window moves nothing."""

    model_config = ConfigDict(**Model.model_config, json_schema_extra=_alias_properties)
    min: int = Field(1, ge=0, le=MAX_REPLICAS)
    max: int = Field(ge=1, le=MAX_REPLICAS)
    algorithm: Algorithm = Algorithm.PROPORTIONAL
    metrics: list[MetricTarget] = Field(min_length=1)
    tolerance: float = Field(0.1, ge=0, lt=1)
    scale_up_factor: float = Field(1.5, gt=1, allow_inf_nan=False)
    scale_down_factor: float = Field(0.75, gt=0, lt=1)
    scale_up_threshold: float = Field(1.2, gt=1, allow_inf_nan=False)
    scale_down_threshold: float = Field(0.8, gt=0, lt=1)
    up_stabilization: Duration = Field(
        0.0, validation_alias=AliasChoices("up_stabilization", "up_cooldown")
    )
    down_stabilization: Duration = Field(
        300.0, validation_alias=AliasChoices("down_stabilization", "down_cooldown")
    )
    max_step_up: StepLimit = None  # None: no limit
    max_step_down: StepLimit = None
    interval: Duration = 15.0
    _targets: tuple[Target, ...] = PrivateAttr(())

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, alias in (("up_stabilization", "up_cooldown"),
                                ("down_stabilization", "down_cooldown")):
                if name in data and alias in data:
                    raise ValueError(f"give {name} or its alias {alias}, not both")
        return data

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("interval must be above zero, like 15s")
        return value

    @field_validator("metrics")
    @classmethod
    def _distinct(cls, metrics: list[MetricTarget]) -> list[MetricTarget]:
        seen: set[str] = set()
        for metric in metrics:
            if metric.name in seen:
                raise ValueError(
                    f"metric {metric.name!r} appears twice; give custom and prometheus "
                    "metrics distinct names"
                )
            seen.add(metric.name)
        return metrics

    @field_validator("max")
    @classmethod
    def _bounds(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min")
        if low is not None and low > value:
            raise ValueError(f"max ({value}) must not be below min ({low})")
        return value

    @model_validator(mode="after")
    def _derive(self) -> AutoscalePolicy:
        self._targets = tuple(Target(m.name, m.target, m.weight, m.unit) for m in self.metrics)
        return self

    @property
    def targets(self) -> tuple[Target, ...]:
        """The metrics in the shape a decision reads on every tick."""
        return self._targets

    @property
    def history_window(self) -> float:
        """How far back past recommendations matter; older ones may be dropped."""
        return max(self.up_stabilization, self.down_stabilization)

    @property
    def stale_after(self) -> float:
        """A sample older than this (three intervals) counts as missing."""
        return 3.0 * self.interval

