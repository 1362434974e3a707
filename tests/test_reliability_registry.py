"""The breaker registry: one breaker per name, configured by kind, scraped as metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from shipyard.reliability import BreakerConfig, BreakerRegistry, CircuitBreaker, CircuitState
from shipyard.reliability.registry import split_name


def test_one_breaker_per_name_configured_by_kind() -> None:
    probes = BreakerConfig(window=0, consecutive_failures=3)
    registry = BreakerRegistry(kinds={"probe": probes})
    api = registry.get("service:api")
    assert registry.get("service:api") is api
    assert api.config == BreakerConfig()
    assert registry.get("probe:api-1").config is probes
    custom = BreakerConfig(recovery_timeout=1)
    assert registry.get("runtime:start", custom).config is custom
    assert "service:api" in registry and len(registry) == 3
    assert [b.name for b in registry] == ["service:api", "probe:api-1", "runtime:start"]
    assert registry.remove("service:api") is api
    assert registry.remove("service:api") is None
    assert registry.get("service:api") is not api


def test_breakers_share_the_clock_and_listener() -> None:
    now = [0.0]
    changes: list[tuple[str, CircuitState]] = []

    def listener(b: CircuitBreaker, old: CircuitState, new: CircuitState, why: str) -> None:
        changes.append((b.name, new))

    registry = BreakerRegistry(
        BreakerConfig(window=0, consecutive_failures=1, recovery_timeout=5),
        clock=lambda: now[0],
        on_change=listener,
    )
    breaker = registry.get("service:db")
    breaker.record_failure()
    now[0] = 5.0
    assert breaker.allow()
    assert changes == [("service:db", CircuitState.OPEN), ("service:db", CircuitState.HALF_OPEN)]


def test_split_name() -> None:
    assert split_name("service:api") == ("service", "api")
    assert split_name("probe:api-1:ready") == ("probe", "api-1:ready")
    assert split_name("plain") == ("", "plain")


def test_collector_reports_state_and_opens() -> None:
    registry = BreakerRegistry(BreakerConfig(window=0, consecutive_failures=1))
    metrics = CollectorRegistry()
    metrics.register(registry.collector())
    registry.get("service:api").record_failure()
    registry.get("probe:web-1")
    text = generate_latest(metrics).decode()
    assert 'shipyard_circuit_state{kind="service",service="api"} 2.0' in text
    assert 'shipyard_circuit_state{kind="probe",service="web-1"} 0.0' in text
    assert 'shipyard_circuit_opens_total{kind="service",service="api"} 1.0' in text
    registry.remove("service:api")
    assert 'service="api"' not in generate_latest(metrics).decode()
