"""Traffic: a stable address per service, balanced over its ready instances."""

from shipyard.traffic.balance import Backend, Balance, Selector, SmoothWeighted
from shipyard.traffic.router import Router
from shipyard.traffic.stats import RouterCollector

__all__ = ["Backend", "Balance", "Router", "RouterCollector", "Selector", "SmoothWeighted"]
