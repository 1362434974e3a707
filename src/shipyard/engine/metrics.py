"""The engine's Prometheus metrics, on a registry of its own (one per engine)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable

from shipyard.prometheus import (  # not prometheus_client's exposition (see there)
    Collector,
    CollectorRegistry,
    Counter,
    GaugeMetricFamily,
    Histogram,
)
from shipyard.state.base import InstanceState

PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
DEPLOY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _InstanceStates(Collector):
    """`shipyard_instances{stack,service,state}`, read from the supervisors at scrape time so
    it can never drift from what the engine knows."""

    def __init__(self, snapshot: Callable[[], Iterable[tuple[str, str, InstanceState]]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "shipyard_instances", "Instances by state", labels=["stack", "service", "state"]
        )
        for (stack, service, state), n in sorted(Tally(self._snapshot()).items()):
            family.add_metric([stack, service, state.value], n)
        yield family


class EngineMetrics:
    def __init__(
        self, snapshot: Callable[[], Iterable[tuple[str, str, InstanceState]]]
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_InstanceStates(snapshot))
        self.restarts = Counter(
            "shipyard_restarts", "Instance restarts", ["stack", "service"], registry=self.registry
        )
        self.exits = Counter(
            "shipyard_instance_exits", "Instance exits", ["stack", "service"],
            registry=self.registry,
        )
        self.deploy_duration = Histogram(
            "shipyard_deploy_duration_seconds", "Duration of deploys", ["stack", "outcome"],
            buckets=DEPLOY_BUCKETS, registry=self.registry,
        )
        self.probe_latency = Histogram(
            "shipyard_probe_duration_seconds", "Latency of health probes",
            ["stack", "service", "probe", "kind"], buckets=PROBE_BUCKETS, registry=self.registry,
        )
        self.probe_failures = Counter(
            "shipyard_probe_failures", "Failed health probes", ["stack", "service", "probe"],
            registry=self.registry,
        )
