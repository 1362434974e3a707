"""Counters the router keeps per backend and per revision, and their Prometheus view.

Counters are plain attributes bumped on the data path (no locks: one event loop), kept
after a backend is removed so that exported totals never go backwards. Canary analysis
reads error rates and latency quantiles from `stats()` snapshots.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from shipyard.prometheus import (
    Collector,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

if TYPE_CHECKING:
    from shipyard.traffic.router import Router

BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class LatencyHistogram:
    """Cumulative-on-read latency histogram with Prometheus bucket bounds."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs the way Prometheus exposes them."""
        out, total = [], 0
        for bound, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out

    def quantile(self, q: float) -> float | None:
        """Estimate of the q-quantile, interpolated inside its bucket like PromQL does."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if seen + n >= rank and n:
                low = BUCKETS[i - 1] if i else 0.0
                if i == len(BUCKETS):
                    return BUCKETS[-1]
                return low + (BUCKETS[i] - low) * (rank - seen) / n
            seen += n
        return BUCKETS[-1]

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": self.sum,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
            "buckets": dict(self.cumulative()),
        }


class RequestStats:
    """HTTP exchanges: counts by status class and a latency histogram."""

    __slots__ = ("codes", "latency")

    def __init__(self) -> None:
        self.codes = dict.fromkeys(CODE_CLASSES, 0)
        self.latency = LatencyHistogram()

    def record(self, status: int, seconds: float) -> None:
        self.codes[CODE_CLASSES[min(status // 100, 5) - 1]] += 1
        self.latency.observe(seconds)

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "codes": dict(self.codes),
            "latency": self.latency.snapshot(),
        }


class BackendStats:
    """Everything counted for one backend (one instance of one revision)."""

    __slots__ = (
        "active",
        "backend",
        "bytes_in",
        "bytes_out",
        "connect_failures",
        "http",
        "revision",
        "total",
    )

    def __init__(self, backend: str, revision: str) -> None:
        self.backend = backend
        self.revision = revision
        self.active = 0  # upstream connections open now
        self.total = 0  # upstream connections ever opened
        self.bytes_in = 0  # client -> backend
        self.bytes_out = 0  # backend -> client
        self.connect_failures = 0
        self.http = RequestStats()

    def snapshot(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "revision": self.revision,
            "active": self.active,
            "total": self.total,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "connect_failures": self.connect_failures,
            "http": self.http.snapshot(),
        }


class RouterCollector(Collector):
    """Exports the counters of every router `routers()` returns, labelled by service."""

    def __init__(self, routers: Callable[[], Iterable[Router]]) -> None:
        self._routers = routers

    def describe(self) -> list[Any]:
        return []  # collected lazily: routers come and go with services

    def collect(self) -> Iterator[Any]:
        conns = CounterMetricFamily(
            "shipyard_router_connections",
            "Upstream connections opened by the router.",
            labels=["service", "backend", "revision"],
        )
        active = GaugeMetricFamily(
            "shipyard_router_active_connections",
            "Upstream connections open now.",
            labels=["service", "backend", "revision"],
        )
        sent = CounterMetricFamily(
            "shipyard_router_bytes",
            "Bytes proxied; direction in is client to backend.",
            labels=["service", "backend", "revision", "direction"],
        )
        failures = CounterMetricFamily(
            "shipyard_router_connect_failures",
            "Backend connects that failed and were retried elsewhere.",
            labels=["service", "backend", "revision"],
        )
        unrouted = CounterMetricFamily(
            "shipyard_router_unrouted_connections",
            "Client connections closed because no backend accepted them.",
            labels=["service"],
        )
        requests = CounterMetricFamily(
            "shipyard_router_requests",
            "HTTP requests completed, by revision and status class.",
            labels=["service", "revision", "code"],
        )
        duration = HistogramMetricFamily(
            "shipyard_router_request_duration_seconds",
            "HTTP request duration seen at the router, by revision.",
            labels=["service", "revision"],
        )
        for router in self._routers():
            svc = router.service
            unrouted.add_metric([svc], router.unrouted)
            for b in router.backend_stats():
                labels = [svc, b.backend, b.revision]
                conns.add_metric(labels, b.total)
                active.add_metric(labels, b.active)
                failures.add_metric(labels, b.connect_failures)
                sent.add_metric([*labels, "in"], b.bytes_in)
                sent.add_metric([*labels, "out"], b.bytes_out)
            for rev, r in router.revision_stats().items():
                for code, n in r.codes.items():
                    if n:
                        requests.add_metric([svc, rev, code], n)
                duration.add_metric(
                    [svc, rev], buckets=r.latency.cumulative(), sum_value=r.latency.sum
                )
        yield from (conns, active, sent, failures, unrouted, requests, duration)
