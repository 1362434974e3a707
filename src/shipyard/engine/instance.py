"""One instance's supervisor: it owns the instance's lifecycle (see InstanceState), launches
it through the runtime, runs its probes, restarts it by its policy, and records every
transition in the store (record + event in one write, engine/transitions.py) before
telling the engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from shipyard.engine.environment import instance_argv, instance_environment, instance_workdir
from shipyard.engine.transitions import writer_for
from shipyard.errors import ResourceError, RuntimeLaunchError, TransientLaunchError
from shipyard.health.monitor import ProbeMonitor
from shipyard.health.probes import ProbeResult
from shipyard.plan.restart import decide_restart
from shipyard.reliability.breaker import BreakerConfig, CircuitBreaker, CircuitOpenError
from shipyard.reliability.retry import Backoff, RetryExhaustedError, RetryPolicy, retry_async
from shipyard.runtime.base import Handle, LaunchSpec
from shipyard.runtime.container_spec import ContainerSpec, MountSpec, container_spec
from shipyard.security.redact import redact
from shipyard.security.secret_values import InstanceSecrets
from shipyard.spec.interpolate import expand
from shipyard.spec.models import Probe, RestartMode, Service, Stack
from shipyard.spec.units import format_duration
from shipyard.state.base import Event, InstanceRecord, InstanceState

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine

log = logging.getLogger(__name__)
# A run of an instance with no readiness probe counts as a success for its circuit breaker
# once it has stayed up this long (with a probe, reaching ready is the success).
STABLE_WITHOUT_PROBE = 1.0
TERMINAL = (InstanceState.STOPPED, InstanceState.COMPLETED, InstanceState.FAILED)
# Starting a process again after a transient failure (out of processes, memory, fds):
# quickly, a few times, with full jitter so that many instances do not retry in step.
LAUNCH_RETRY = RetryPolicy(backoff=Backoff.EXPONENTIAL_JITTER, initial=0.1, max_delay=2.0,
                           max_attempts=6, deadline=10.0)




class InstanceSupervisor:
    def __init__(self, engine: Engine, stack: Stack, record: InstanceRecord) -> None:
        self.engine = engine
        self.stack = stack
        self.record = record
        self.service: Service = stack.services[record.service]
        self.handle: Handle | None = None
        self.task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()  # interrupts a backoff sleep
        self._liveness_failed = False
        self._late_stop: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._readiness: ProbeMonitor | None = None
        # Restarts since the last run that stayed up `restart.min_uptime`: what backoff and
        # max_restarts count (the record's `restarts` is the lifetime total shown in ps).
        self._streak = 0
        self.ever_started = record.pid is not None
        # secrets: resolved and delivered at each launch, removed when the instance ends
        self.secrets = InstanceSecrets(engine.config.home, stack, record.service,
                                       record.instance)

    # -- public -------------------------------------------------------------------------
    @property
    def state(self) -> InstanceState:
        return self.record.state

    @property
    def name(self) -> str:
        return self.record.instance

    def start(self, adopt: Handle | None = None, *, restarted: bool = False) -> None:
        """Run the supervision loop as a task: launch (or adopt `adopt`) and keep it alive."""
        self.task = asyncio.create_task(self._run(adopt, restarted), name=f"sup:{self.name}")
        self.task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        """A supervision loop must not die silently: if it fails (the store went away, a
        bug), say so and supervise again shortly, re-adopting the process if it lives."""
        if task.cancelled() or task.exception() is None or self._stopping:
            return
        exc = task.exception()
        log.error("supervisor of %s failed: %r", self.name, exc, exc_info=exc)
        self._recovery = asyncio.create_task(self._resupervise(repr(exc)))

    async def _resupervise(self, reason: str) -> None:
        await asyncio.sleep(1.0)
        if self._stopping or not self.engine.running:
            return
        handle = self.handle
        self.handle = None
        with contextlib.suppress(Exception):
            await self._emit("instance.supervisor-error",
                             f"supervision failed ({reason}); resuming")
        if handle is not None and self.engine.runtime.adopt(handle):
            self.start(adopt=handle)
        else:
            self.start(restarted=self.record.state not in TERMINAL)

    async def stop(self) -> None:
        """Stop the instance for good (signal, then SIGKILL after the stop timeout)."""
        self._stopping = True
        self._wake.set()
        handle = self.handle
        if handle is not None:
            await self._stop_handle(handle)
        if self.task is not None:
            await asyncio.shield(self.task)
        elif self.record.state not in TERMINAL:
            await self._set(InstanceState.STOPPED, "stopped", "instance.stopped")

    @property
    def paused(self) -> bool:
        return self.record.state is InstanceState.PAUSED

    async def pause(self, reason: str) -> None:
        """Freeze the instance's processes (SIGSTOP); its probes are ignored meanwhile."""
        handle = self.handle
        if handle is None or self.paused or self.record.state in TERMINAL:
            return
        await self.engine.runtime.send_signal(handle, "SIGSTOP")
        await self._set(InstanceState.PAUSED, f"paused: {reason}", "instance.paused",
                        ready=False)

    async def resume(self, reason: str) -> None:
        """Thaw a paused instance; it is ready again as soon as its probe says so."""
        handle = self.handle
        if handle is None or not self.paused:
            return
        await self.engine.runtime.send_signal(handle, "SIGCONT")
        probe = self._readiness
        if self.service.health.readiness is None or (probe is not None and probe.passing):
            await self._set(InstanceState.READY, f"resumed: {reason}", "instance.resumed",
                            ready=True, health="passing")
        else:
            await self._set(InstanceState.RUNNING, f"resumed: {reason}", "instance.resumed",
                            ready=False)

    async def detach(self) -> None:
        """Stop supervising but leave the process running (control plane shutdown)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    # -- the loop -------------------------------------------------------------------------
    async def _run(self, adopt: Handle | None, restarted: bool) -> None:
        handle = adopt
        if adopt is not None:
            await self._emit("instance.adopted", f"re-adopted pid {adopt.pid}")
        elif restarted and not await self._after_exit(
                None, "exited while the control plane was down"):
            return  # it died while no control plane watched it: counted as a crash
        while True:
            if handle is None:
                handle = await self._launch()
                if handle is None:
                    return
                if self._stopping:  # stop() came while we were launching
                    self._late_stop = asyncio.create_task(self._stop_handle(handle))
            self.handle = handle
            code, reason = await self._supervise(handle)
            self.handle = handle = None
            if self._stopping:
                await self._set(InstanceState.STOPPED, "stopped", "instance.stopped",
                                exit_code=code)
                return
            if not await self._after_exit(code, reason):
                return

    async def _after_exit(self, code: int | None, reason: str | None) -> bool:
        """Record an exit and decide about a restart; True if the loop should launch again.

        Each crash is a failure for the service's circuit breaker. An open circuit stops
        the restarts (the instance is `failed`, with the reason) until its recovery timeout
        lets one trial run start; giving up after `max_restarts` likewise tries again every
        `restart.max` unless `restart.keep_trying` is false."""
        eng, rec, policy = self.engine, self.record, self.service.restart
        eng.metrics.exits.labels(rec.stack, rec.service).inc()
        what = reason or (f"exited {code}" if code is not None else "exited (code unknown)")
        uptime = time.time() - rec.started_at if rec.started_at is not None else 0.0
        stable = uptime >= policy.min_uptime  # a long healthy run, then an exit: not a loop
        if stable:
            self._streak = 0
        decision = decide_restart(policy, code, self._streak, random=random.random())
        if decision.final_state == "completed":
            await self._set(InstanceState.COMPLETED, what, "instance.completed", exit_code=code,
                            ready=False, health="unknown")
            return False
        breaker = eng.breaker_for(self.stack, rec.service)
        if breaker is not None and not stable:
            breaker.record_failure(what)
        if not decision.restart:
            message = f"{what}; {decision.reason}"
            if policy.policy is RestartMode.NO or not policy.keep_trying:
                await self._set(InstanceState.FAILED, message, "instance.failed",
                                exit_code=code, ready=False, health="unknown")
                return False
            await self._set(InstanceState.FAILED, f"{message}; trying again every "
                            f"{format_duration(policy.max)}", "instance.failed",
                            exit_code=code, ready=False, health="unknown")
            if not await self._sleep(policy.max):
                return False
            # an open circuit holds these retries too, until its trial (half-open)
            if breaker is not None and not breaker.allow() \
                    and not await self._wait_for_trial(breaker):
                return False
        elif breaker is not None and not breaker.allow():
            await self._set(InstanceState.FAILED, f"{what}; {breaker.open_error().message}",
                            "instance.failed", exit_code=code, ready=False, health="unknown")
            if not await self._wait_for_trial(breaker):
                return False
        else:
            await self._set(InstanceState.BACKOFF,
                            f"{what}; restarting in {decision.delay:.1f}s", "instance.exited",
                            exit_code=code, ready=False, health="unknown")
            if not await self._sleep(decision.delay):
                return False
        rec.restarts += 1
        self._streak += 1
        eng.metrics.restarts.labels(rec.stack, rec.service).inc()
        await self._emit("instance.restarting", f"restart #{rec.restarts} after {what}")
        return True

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped meanwhile; False (and the instance `stopped`) if stopped."""
        self._wake.clear()
        woken = asyncio.ensure_future(self._wake.wait())
        try:  # asyncio.wait: a cancellation (detach) is never swallowed, see Engine.changed
            await asyncio.wait([woken], timeout=max(seconds, 0.0))
        finally:
            woken.cancel()
        if self._stopping:
            await self._set(InstanceState.STOPPED, "stopped", "instance.stopped")
            return False
        return True

    async def _wait_for_trial(self, breaker: CircuitBreaker) -> bool:
        """Wait until the open circuit admits this instance's trial run."""
        while True:
            wait = (breaker.retry_at or 0.0) - time.monotonic()
            if not await self._sleep(wait if wait > 0 else 1.0):
                return False
            if breaker.allow():
                return True

    async def _launch(self) -> Handle | None:
        eng, rec, svc = self.engine, self.record, self.service
        # exit_code stays: `ps` shows the last one of an instance that was restarted
        await self._set(InstanceState.STARTING, "starting", None, pid=None)
        try:
            env = self._environment()
            assigned = eng.local.assign(self.stack, svc, rec.instance)  # CPU set, GPUs
            env = {**env, **assigned.env}
            argv = instance_argv(rec.service, svc, env) if svc.command else []
            # -- secrets: added after expansion, so never part of an argv -----------------
            if self.secrets.uses:
                env = {**env, **await asyncio.to_thread(self.secrets.deliver)}
            # -- end secrets ----------------------------------------------------------------
            spec = LaunchSpec(
                stack=rec.stack, service=rec.service, instance=rec.instance,
                argv=argv, env=env,
                workdir=instance_workdir(self.stack, svc),
                log_path=str(eng.config.log_path(rec.stack, rec.instance)),
                log_max_bytes=eng.config.log_max_bytes, log_backups=eng.config.log_backups,
                stop_signal=svc.stop.signal, stop_timeout=svc.stop.timeout,
                cpu_limit=svc.resources.cpu, memory_limit=svc.resources.memory,
                swap_limit=svc.resources.swap, cpuset=assigned.cpuset, mems=assigned.mems,
                container=self._container(assigned.gpus)
                if svc.image else None,
                user=getattr(svc, "user", None),
            )
            handle = await retry_async(
                LAUNCH_RETRY, eng.runtime.start, spec, retry_on=TransientLaunchError,
                on_retry=self._launch_retry,
                breaker=eng.breakers.get(f"runtime:{rec.stack}/{rec.service}"))
        except (RuntimeLaunchError, RetryExhaustedError, CircuitOpenError,
                ResourceError) as exc:
            await self._set(InstanceState.FAILED, exc.message, "instance.failed", ready=False)
            return None
        self.ever_started = True
        await self._set(InstanceState.RUNNING, f"pid {handle.pid}", "instance.started",
                        pid=handle.pid, pgid=handle.pgid, proc_start=handle.proc_start,
                        cgroup=handle.cgroup, runtime={**handle.extra, **assigned.record()},
                        started_at=time.time(), ready=False, health="unknown")
        return handle

    def _container(self, gpus: tuple[str, ...]) -> ContainerSpec | None:
        """The container part of a launch: its GPUs, and its file secrets bind-mounted
        read-only where the service's uses say."""
        spec = container_spec(self.stack, self.record.service)
        if spec is None:
            return None
        mounts = [MountSpec("bind", host, target, read_only=True)
                  for host, target in self.secrets.bind_mounts()]
        if gpus or mounts:
            spec = dataclasses.replace(spec, gpus=list(gpus) or spec.gpus,
                                       mounts=[*spec.mounts, *mounts])
        return spec

    def _launch_retry(self, attempt: int, error: BaseException, wait: float) -> None:
        log.warning("%s: start attempt %d failed (%s); retrying in %.2fs", self.name, attempt,
                    error, wait)
        self.engine.emit_soon(Event("instance.launch-retry",
                                    redact(f"start attempt {attempt} failed: {error}; "
                                           f"retrying in {wait:.2f}s"), stack=self.record.stack,
                                    service=self.record.service, instance=self.name))

    async def _supervise(self, handle: Handle) -> tuple[int | None, str | None]:
        """Probe the instance until it exits; its exit code and a reason if we know one."""
        self._liveness_failed = False
        if self.secrets.uses and not self.secrets.variables:  # re-adopted: for exec probes
            try:
                await asyncio.to_thread(self.secrets.recall)
            except RuntimeLaunchError as exc:
                log.warning("%s: exec probes run without its secrets: %s", self.name, exc)
        readiness, liveness = self.service.health.readiness, self.service.health.liveness
        monitors: list[ProbeMonitor] = []
        stable: asyncio.Task[None] | None = None
        if readiness is None:
            if self.record.state is not InstanceState.READY:
                await self._set(InstanceState.READY, "running (no readiness probe)",
                                "instance.ready", ready=True, health="passing")
            # Without a probe, only staying up is evidence that a run went well.
            stable = asyncio.create_task(self._succeed_after(STABLE_WITHOUT_PROBE))
        else:
            self._readiness = self._monitor(readiness, "readiness", self._on_readiness,
                                            handle)
            monitors.append(self._readiness)
        if liveness is not None:
            monitors.append(self._monitor(liveness, "liveness", self._on_liveness(handle),
                                          handle))
        for monitor in monitors:
            monitor.start()
        try:
            code = await self.engine.runtime.wait(handle)
        finally:
            if stable is not None:
                stable.cancel()
            for monitor in monitors:
                await monitor.stop()
        reason = self.engine.runtime.exit_reason(handle)
        if self._liveness_failed and not self._stopping:
            reason = "killed after failing its liveness probe"
        elif reason and code is not None:
            reason = f"{reason} (exit {code})"
        return code, reason

    def _monitor(self, probe: Probe, which: str,
                 on_change: Callable[[bool, ProbeResult], Awaitable[None]],
                 handle: Handle) -> ProbeMonitor:
        rec, metrics = self.record, self.engine.metrics
        env = self._environment()
        if probe.exec is not None:  # ${PORT} and friends, as in the command
            probe = probe.model_copy(update={"exec": [expand(a, env) for a in probe.exec]})
        env = {**env, **self.secrets.variables}  # an exec probe sees what the instance sees
        latency = metrics.probe_latency.labels(rec.stack, rec.service, which, probe.kind)
        failures = metrics.probe_failures.labels(rec.stack, rec.service, which)

        def on_result(result: ProbeResult) -> None:
            latency.observe(result.latency)
            if not result.ok:
                failures.inc()

        runner = None
        if handle.extra.get("runtime") == "container":  # exec probes run inside it
            from shipyard.runtime.container_exec import exec_probe

            container = getattr(self.engine.runtime, "container", self.engine.runtime)
            own = {k: v for k, v in env.items() if k not in os.environ or k in self.service.env}

            async def runner(p: Probe) -> ProbeResult:
                return await exec_probe(container, handle, p, own)

        # a probe that hangs until its timeout three times in a row is not sent again for
        # a while (see ProbeMonitor.breaker)
        breaker = self.engine.breakers.get(
            f"probe:{rec.stack}/{rec.instance}/{which}",
            BreakerConfig(window=0, consecutive_failures=3,
                          recovery_timeout=max(10.0, probe.interval * 3)))
        return ProbeMonitor(probe, rec.ports, on_change, on_result=on_result, env=env,
                            cwd=instance_workdir(self.stack, self.service),
                            exec_runner=runner, breaker=breaker)

    async def _succeed_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._succeeded()

    def _succeeded(self) -> None:
        """A run that reached ready is a success for the service's circuit (and closes it
        when this was its trial)."""
        breaker = self.engine.breaker_for(self.stack, self.record.service)
        if breaker is not None:
            breaker.record_success()

    def _environment(self) -> dict[str, str]:
        rec = self.record
        return instance_environment(self.stack, rec.service, rec.instance, rec.ports,
                                    self.engine.dependency_ports(self.stack, rec.service))

    async def _on_readiness(self, passing: bool, result: ProbeResult) -> None:
        if self._stopping or self.handle is None or self.paused:
            return
        if passing:
            await self._set(InstanceState.READY, "ready", "instance.ready", ready=True,
                            health="passing")
            self._succeeded()
        elif self.record.state is InstanceState.READY or self.record.health != "failing":
            await self._set(InstanceState.RUNNING, f"not ready: {result.message}",
                            "instance.unready", ready=False, health="failing")

    def _on_liveness(self, handle: Handle) -> Callable[[bool, ProbeResult], Awaitable[None]]:
        async def on_change(passing: bool, result: ProbeResult) -> None:
            if passing or self._stopping or self.handle is not handle or self.paused:
                return
            self._liveness_failed = True
            await self._emit("instance.unhealthy", f"liveness failed: {result.message}")
            await self._stop_handle(handle)

        return on_change

    async def _stop_handle(self, handle: Handle) -> None:
        if self.record.state not in (InstanceState.STOPPING, *TERMINAL):
            await self._set(InstanceState.STOPPING, f"sending {self.service.stop.signal}", None,
                            ready=False)
        await self.engine.runtime.stop(handle, self.service.stop.signal, self.service.stop.timeout)

    # -- recording ----------------------------------------------------------------------
    async def _set(self, state: InstanceState, message: str, event: str | None,
                   **fields: object) -> None:
        rec = self.record
        message = redact(message)  # a secret's value never reaches the store or events
        rec.state = state
        rec.message = message
        for key, value in fields.items():
            setattr(rec, key, value)
        rec.updated_at = time.time()
        # the record and its event in one write, batched with the other instances'
        # changes of this moment (engine/transitions.py: a `down` of many instances)
        await writer_for(self.engine.store).write(rec, None if event is None else Event(
            kind=event, message=message, stack=rec.stack, service=rec.service,
            instance=rec.instance,
            data={"state": state.value, "pid": rec.pid, "exit_code": rec.exit_code}))
        if state in TERMINAL and self.secrets.uses:  # its secret files go with it
            await asyncio.to_thread(self.secrets.remove)
        self.engine.notify()

    async def _emit(self, kind: str, message: str) -> None:
        rec = self.record
        await self.engine.record_event(Event(kind=kind, message=redact(message),
                                             stack=rec.stack, service=rec.service,
                                             instance=rec.instance))
        self.engine.notify()
