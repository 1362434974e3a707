"""The engine's circuit breakers, by name, and their Prometheus view.

Names are `kind:subject` (`service:api`, `probe:api-1`, `runtime:start`): the kind picks
the configuration and becomes a metric label, so one registry serves every layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from shipyard.prometheus import Collector, CounterMetricFamily, GaugeMetricFamily
from shipyard.reliability.breaker import (
    BreakerConfig,
    ChangeListener,
    CircuitBreaker,
    CircuitState,
)

__all__ = ["STATE_VALUES", "BreakerRegistry", "CircuitStateCollector", "split_name"]

# The value of `shipyard_circuit_state`: ordered by how bad it is, so max() over a service
# says the worst.
STATE_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


def split_name(name: str) -> tuple[str, str]:
    """`service:api` → (`service`, `api`); a name without a kind has the kind ``""``."""
    kind, sep, subject = name.partition(":")
    return (kind, subject) if sep else ("", name)


class BreakerRegistry:
    """Creates each breaker on first use, from the config for its kind (or the default),
    with the registry's clock and listener, and keeps it until removed."""

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        kinds: Mapping[str, BreakerConfig] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: ChangeListener | None = None,
    ) -> None:
        self.config = config or BreakerConfig()
        self.kinds = dict(kinds or {})
        self.on_change = on_change
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str, config: BreakerConfig | None = None) -> CircuitBreaker:
        """The breaker called `name`, created if needed. `config` only applies when it is
        created: to change the config of a live breaker, `remove()` it first."""
        breaker = self._breakers.get(name)
        if breaker is None:
            if config is None:
                config = self.kinds.get(split_name(name)[0], self.config)
            breaker = CircuitBreaker(name, config, clock=self._clock, on_change=self.on_change)
            self._breakers[name] = breaker
        return breaker

    def remove(self, name: str) -> CircuitBreaker | None:
        """Forget a breaker (its service left the stack); its gauge disappears with it."""
        return self._breakers.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def collector(self) -> CircuitStateCollector:
        """A Collector to register on the engine's CollectorRegistry."""
        return CircuitStateCollector(lambda: self)


class CircuitStateCollector(Collector):
    """`shipyard_circuit_state{service,kind}` (0 closed, 1 half-open, 2 open) and
    `shipyard_circuit_opens_total{service,kind}`, read from the breakers at scrape time so
    they can never drift from them."""

    def __init__(self, breakers: Callable[[], Iterable[CircuitBreaker]]) -> None:
        self._breakers = breakers

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily(
            "shipyard_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            labels=["service", "kind"],
        )
        opens = CounterMetricFamily(
            "shipyard_circuit_opens", "Times a circuit breaker opened", labels=["service", "kind"]
        )
        for breaker in sorted(self._breakers(), key=lambda b: b.name):
            kind, subject = split_name(breaker.name)
            state.add_metric([subject, kind], STATE_VALUES[breaker.state])
            opens.add_metric([subject, kind], breaker.opens)
        yield state
        yield opens

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        # Names only, so registering does not scrape (and clashes are still detected).
        yield GaugeMetricFamily("shipyard_circuit_state", "", labels=["service", "kind"])
        yield CounterMetricFamily("shipyard_circuit_opens", "", labels=["service", "kind"])
