"""Reliability: circuit breakers and retry policies, for the engine to keep failures small."""

from shipyard.reliability.breaker import (
    BreakerConfig,
    ChangeListener,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
)
from shipyard.reliability.registry import BreakerRegistry, CircuitStateCollector
from shipyard.reliability.retry import (
    Backoff,
    RetryExhaustedError,
    RetryPolicy,
    delays,
    retry_async,
    retry_sync,
)

__all__ = [
    "Backoff",
    "BreakerConfig",
    "BreakerRegistry",
    "ChangeListener",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "CircuitStateCollector",
    "RetryExhaustedError",
    "RetryPolicy",
    "delays",
    "retry_async",
    "retry_sync",
]
