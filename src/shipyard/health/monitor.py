"""Running one probe on a schedule and turning its results into a passing/failing state.

Kubernetes semantics: the state starts unknown; it becomes passing after
`success_threshold` consecutive successes and failing after `failure_threshold`
consecutive failures, and each change is reported once. Probes run at a fixed rate (every
`interval` from the start of the previous one, never overlapping), so a slow probe does
not make the schedule drift.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from shipyard.health.probes import ProbeResult, run_probe
from shipyard.reliability.breaker import CircuitBreaker
from shipyard.spec.models import Probe

log = logging.getLogger(__name__)


class ThresholdTracker:
    """Consecutive successes and failures against thresholds; pure, no I/O."""

    def __init__(self, success_threshold: int = 1, failure_threshold: int = 3) -> None:
        if success_threshold < 1 or failure_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        self.success_threshold = success_threshold
        self.failure_threshold = failure_threshold
        self.state: bool | None = None  # None: unknown, nothing decided yet
        self.successes = 0  # consecutive, up to now
        self.failures = 0

    def feed(self, ok: bool) -> bool | None:
        """Record one result; the new state if it changed, else None."""
        if ok:
            self.successes += 1
            self.failures = 0
            if self.state is not True and self.successes >= self.success_threshold:
                self.state = True
                return True
        else:
            self.failures += 1
            self.successes = 0
            if self.state is not False and self.failures >= self.failure_threshold:
                self.state = False
                return False
        return None


class ProbeMonitor:
    """Runs `probe` against an instance as an asyncio task until stopped.

    `on_change(passing, result)` is awaited on every transition, with the result that
    caused it; `on_result(result)` is called for every result (metrics). Exceptions from
    either are logged and do not stop the monitor. `stop()` does not interrupt an
    `on_change` in progress: it lets it finish (so a callback may itself call `stop()`,
    which then returns at once) and ends the loop."""

    def __init__(
        self,
        probe: Probe,
        ports: Mapping[str, int],
        on_change: Callable[[bool, ProbeResult], Awaitable[None]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_result: Callable[[ProbeResult], None] | None = None,
        exec_runner: Callable[[Probe], Awaitable[ProbeResult]] | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.probe = probe
        # where an exec probe runs instead of on the host (inside a container)
        self.exec_runner = exec_runner
        # Opens on probes that hang until their timeout (a refused connection is cheap and
        # is no failure for it): while open, the probe fails at once instead of holding a
        # connection and a timeout on an endpoint known to hang.
        self.breaker = breaker
        self.ports = dict(ports)
        self.env = env
        self.cwd = cwd
        self._on_change = on_change
        self._on_result = on_result
        self._tracker = ThresholdTracker(probe.success_threshold, probe.failure_threshold)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._in_callback = False
        self.last: ProbeResult | None = None
        self.runs = 0

    @property
    def passing(self) -> bool | None:
        """True passing, False failing, None not decided yet."""
        return self._tracker.state

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Begin probing (after the probe's initial delay); starting twice is a no-op."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"probe-{self.probe.kind}")

    async def stop(self) -> None:
        """Stop probing and wait until the task has ended."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None or task.done():
            return
        if task is asyncio.current_task():
            return  # called from our own on_change: the loop ends after it returns
        if not self._in_callback:
            task.cancel()
        await asyncio.wait([task])  # our own cancellation still propagates
        if not task.cancelled() and task.exception() is not None:
            log.error("probe monitor failed", exc_info=task.exception())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        probe = self.probe
        if probe.initial_delay > 0:
            await asyncio.sleep(probe.initial_delay)
        next_at = loop.time()
        while not self._stopping:
            breaker = self.breaker
            try:
                if breaker is not None and not breaker.allow():
                    result = ProbeResult(False, 0.0, breaker.open_error().message)
                else:
                    if probe.exec is not None and self.exec_runner is not None:
                        result = await self.exec_runner(probe)
                    else:
                        result = await run_probe(probe, self.ports, env=self.env,
                                                 cwd=self.cwd)
                    if breaker is not None:
                        if result.ok:
                            breaker.record_success()
                        elif result.latency >= probe.timeout * 0.95:  # it hung
                            breaker.record_failure(result.message)
                        else:
                            breaker.release()  # a quick no is no verdict on the endpoint
            except Exception as exc:  # a bug, not the instance's fault: count it as a failure
                log.exception("probe raised")
                result = ProbeResult(False, 0.0, f"probe error: {exc!r}")
            if self._stopping:
                break
            self.last = result
            self.runs += 1
            if self._on_result is not None:
                try:
                    self._on_result(result)
                except Exception:
                    log.exception("probe on_result callback failed")
            change = self._tracker.feed(result.ok)
            if change is not None:
                self._in_callback = True
                try:
                    await self._on_change(change, result)
                except Exception:
                    log.exception("probe on_change callback failed")
                finally:
                    self._in_callback = False
                if self._stopping:
                    break
            next_at += probe.interval
            now = loop.time()
            if next_at < now:  # the probe (or a callback) overran: no catching up in a burst
                next_at = now
            await asyncio.sleep(next_at - now)
