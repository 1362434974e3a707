"""Metrics for autoscaling and `shipyard top`: what each instance and service uses and
serves right now.

- CPU % (of one core) and resident memory of each instance's process, with psutil. The
  `psutil.Process` objects are kept between samples, so CPU % is the share of the time
  since the previous sample (the first sample of a process primes it and has none).
- Request rate, error rate, p50 / p99 latency and open connections of a service with
  `expose`, from its router's counters, over the time since the previous sample.
- `custom`: a number read over HTTP (the whole body, or the value at a JSON path);
  `prometheus`: an instant query against the engine's Prometheus URL. Both are totals for
  the service and are divided by the number of instances, like request rates.

Values come out in the unit of their targets (spec/autoscale.py): percent, seconds, or a
count per instance.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shipyard.plan.autoscale import MetricSample
from shipyard.plan.rollout import window_of
from shipyard.spec.autoscale import AutoscalePolicy, MetricKind
from shipyard.state.base import InstanceState

if TYPE_CHECKING:
    import httpx
    import psutil

    from shipyard.engine.engine import Engine, StackState

_PATH_RE = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\[['\"]([^'\"]+)['\"]\]")


def json_path(document: Any, path: str) -> Any:
    """The value at a simple JSON path: `$.a.b`, `$.queues[0].depth`, `$['odd key']`."""
    rest = path[1:]
    value = document
    while rest:
        match = _PATH_RE.match(rest)
        if match is None:
            raise ValueError(f"cannot read JSON path {path!r} at {rest!r}")
        key, index, quoted = match.groups()
        value = value[int(index)] if index is not None else value[key or quoted]
        rest = rest[match.end():]
    return value


def number_of(text: str, path: str | None) -> float:
    """A metric's value from a response body: the whole body as a number, or the number
    at `path` in it as JSON."""
    value: Any = json.loads(text) if path else text.strip()
    if path:
        value = json_path(value, path)
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


class FetchError(Exception):
    """A metric's HTTP endpoint did not answer with a value."""


@dataclass
class InstanceUse:
    instance: str
    pid: int | None
    state: str
    cpu: float | None = None  # % of one core since the previous sample
    rss: int | None = None  # bytes


@dataclass
class ServiceFigures:
    """One service's latest sample: per instance and from its router."""

    at: float
    instances: list[InstanceUse] = field(default_factory=list)
    router: dict[str, float] = field(default_factory=dict)  # rps, error_rate, p50, p99, ...
    external: dict[str, float] = field(default_factory=dict)  # custom / prometheus, totals
    errors: dict[str, str] = field(default_factory=dict)  # metric → why it has no value


class Sampler:
    def __init__(self, engine: Engine, prometheus_url: str | None = None) -> None:
        self.engine = engine
        self.prometheus_url = prometheus_url
        # keyed by (pid, start time): a reused pid is another process
        self._procs: dict[tuple[int, float | None], psutil.Process] = {}
        self._router_prev: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._http: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- instances -----------------------------------------------------------------------
    def instances(self, state: StackState, service: str) -> list[InstanceUse]:
        import psutil  # here: an engine that never samples (no autoscaling) never needs it

        out = []
        for sup in state.instances_of(service):
            rec = sup.record
            use = InstanceUse(rec.instance, rec.pid, rec.state.value)
            if rec.pid is not None and rec.state.alive:
                key = (rec.pid, rec.proc_start)
                proc = self._procs.get(key)
                try:
                    if proc is None:
                        proc = self._procs[key] = psutil.Process(rec.pid)
                        proc.cpu_percent(None)  # primes the counter
                    else:
                        use.cpu = proc.cpu_percent(None)
                    use.rss = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    self._procs.pop(key, None)
            out.append(use)
        return out

    def forget_gone(self, alive: set[int]) -> None:
        for key in [k for k in self._procs if k[0] not in alive]:
            del self._procs[key]

    # -- router --------------------------------------------------------------------------
    def router(self, stack: str, service: str, instances: int) -> dict[str, float]:
        router = self.engine.routers.router(stack, service)
        if router is None:
            return {}
        now = time.monotonic()
        total: dict[str, Any] = {"requests": 0, "codes": {}, "latency": {"buckets": {}}}
        for stats in router.revision_stats().values():
            snap = stats.snapshot()
            total["requests"] += snap["requests"]
            for code, n in snap["codes"].items():
                total["codes"][code] = total["codes"].get(code, 0) + n
            for le, n in snap["latency"]["buckets"].items():
                buckets = total["latency"]["buckets"]
                buckets[le] = buckets.get(le, 0) + n
        active = sum(s.active for s in router.backend_stats())
        key = (stack, service)
        previous = self._router_prev.get(key)
        self._router_prev[key] = (now, total)
        out: dict[str, float] = {"connections": active / max(instances, 1)}
        if previous is None or now - previous[0] <= 0:
            return out
        window = window_of(previous[1], total)
        elapsed = now - previous[0]
        out["requests_per_second"] = window.requests / elapsed / max(instances, 1)
        if window.requests:
            out["error_rate"] = window.error_rate
            for name, q in (("latency_p50", 0.5), ("latency_p99", 0.99)):
                value = window.quantile(q)
                if value is not None:
                    out[name] = value
        return out

    # -- HTTP ----------------------------------------------------------------------------
    async def _get(self, url: str, params: dict[str, str] | None = None) -> str:
        import httpx  # only services with custom or Prometheus metrics need it

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=5.0, trust_env=False)
        try:
            response = await self._http.get(url, params=params)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise FetchError(f"GET {url}: {exc}") from None
        return response.text

    async def external(self, policy: AutoscalePolicy,
                       figures: ServiceFigures) -> None:
        for metric in policy.metrics:
            try:
                if metric.kind is MetricKind.CUSTOM and metric.custom is not None:
                    text = await self._get(metric.custom.url)
                    figures.external[metric.name] = number_of(text, metric.custom.json_path)
                elif metric.kind is MetricKind.PROMETHEUS and metric.prometheus is not None:
                    if not self.prometheus_url:
                        figures.errors[metric.name] = ("no Prometheus URL configured "
                                                       "(SHIPYARD_PROMETHEUS_URL)")
                        continue
                    body = json.loads(await self._get(
                        f"{self.prometheus_url.rstrip('/')}/api/v1/query",
                        {"query": metric.prometheus.query}))
                    result = body["data"]["result"]
                    if not result:
                        figures.errors[metric.name] = "the query returned no series"
                        continue
                    figures.external[metric.name] = float(result[0]["value"][1])
            except (FetchError, ValueError, KeyError, IndexError, TypeError) as exc:
                figures.errors[metric.name] = f"{type(exc).__name__}: {exc}"

    # -- a whole service -----------------------------------------------------------------
    async def sample(self, state: StackState, service: str,
                     policy: AutoscalePolicy | None) -> ServiceFigures:
        now = time.monotonic()
        uses = self.instances(state, service)
        running = [u for u in uses if u.state in (InstanceState.READY.value,
                                                   InstanceState.RUNNING.value)]
        figures = ServiceFigures(at=now, instances=uses,
                                 router=self.router(state.stack.name, service, len(running)))
        if policy is not None:
            await self.external(policy, figures)
        return figures

    def samples(self, figures: ServiceFigures, policy: AutoscalePolicy,
                memory_limit: int) -> list[MetricSample]:
        """The figures as the decision reads them, in the units of the targets."""
        running = [u for u in figures.instances
                   if u.state in (InstanceState.READY.value, InstanceState.RUNNING.value)]
        count = max(len(running), 1)
        out: list[MetricSample] = []
        cpus = [u.cpu for u in running if u.cpu is not None]
        for metric in policy.metrics:
            kind, value = metric.kind, None
            if kind is MetricKind.CPU and cpus:
                value = sum(cpus) / len(cpus)
            elif kind is MetricKind.MEMORY:
                rss = [u.rss for u in running if u.rss is not None]
                if not memory_limit:
                    figures.errors["memory"] = "no resources.memory to take a percentage of"
                elif rss:
                    value = 100.0 * sum(rss) / len(rss) / memory_limit
            elif kind.value in figures.router:
                value = figures.router[kind.value]
            elif metric.name in figures.external:
                value = figures.external[metric.name] / count
            if value is not None:
                out.append(MetricSample(metric.name, value, figures.at))
        return out
