"""The engine: the object the control plane runs and Python users embed.

Data flows one way: spec → plan → reconcile → runtime. The engine checks a stack up front
(graph, capacity, ports, commands) so that nothing starts when something is wrong, records
intent in the store, deploys through `Deployer`, and keeps every instance supervised. On
start it resumes from the store, re-adopting instances that still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from shipyard.engine import handlers, output, recovery, revisions
from shipyard.engine.autoscaler import Autoscaler
from shipyard.engine.config import EngineConfig
from shipyard.engine.dependencies import DependencyWatcher
from shipyard.engine.deploy import stack_document
from shipyard.engine.instance import InstanceSupervisor
from shipyard.engine.local_resources import LocalResources
from shipyard.engine.metrics import EngineMetrics
from shipyard.engine.operations import OperationQueue, parse_priority
from shipyard.engine.preflight import preflight
from shipyard.engine.results import DeployResult, PlanReport
from shipyard.engine.rollout import RolloutControl
from shipyard.engine.routing import ServiceRouters
from shipyard.errors import NotFoundError, ShipyardError
from shipyard.plan.graph import DependencyGraph
from shipyard.reliability.breaker import BreakerConfig, CircuitBreaker, CircuitState
from shipyard.reliability.registry import BreakerRegistry
from shipyard.resources.ports import PortAllocator
from shipyard.runtime.base import Runtime
from shipyard.runtime.dispatch import DispatchRuntime
from shipyard.runtime.logpipe import LogPipes
from shipyard.runtime.process import ProcessRuntime
from shipyard.security.redact import redact_event
from shipyard.spec.models import Stack
from shipyard.state.base import (
    Event,
    InstanceRecord,
    InstanceState,
    OperationRecord,
    OpState,
    StackRecord,
    StateStore,
)
from shipyard.state.factory import open_store

__all__ = ["Engine", "EngineConfig", "stack_document"]


class OperationFailed(ShipyardError):
    """An operation ran and did not succeed."""


@dataclass
class StackState:
    """What the engine holds in memory for one stack; derived from the store, rebuildable."""

    stack: Stack
    graph: DependencyGraph
    supervisors: dict[str, InstanceSupervisor] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def instances_of(self, service: str) -> list[InstanceSupervisor]:
        return sorted((s for s in self.supervisors.values() if s.record.service == service),
                      key=lambda s: s.record.index)


class Engine:
    def __init__(self, config: EngineConfig | None = None, *,
                 runtime: Runtime | None = None, standby: bool = False) -> None:
        self.config = config or EngineConfig()
        # HA (engine/leadership.py): a standby only reads the store until activate()
        self.standby = standby
        # One cgroup subtree per Shipyard home, so two homes never touch each other's.
        digest = hashlib.sha1(str(self.config.home).encode()).hexdigest()[:8]
        # processes, and containers for services with an image (the container engine is
        # contacted on first use only)
        pipes = (LogPipes(self.config.home, on_notice=partial(output.on_log_notice, self))
                 if self.config.log_relay else None)
        self.runtime: Runtime = runtime or DispatchRuntime(
            ProcessRuntime(cgroup_name=f"shipyard-{digest}", pipes=pipes),
            self._container_runtime)
        self.store: StateStore = open_store(self.config.store_url)
        self.metrics = EngineMetrics(self._instance_states)
        self.registry = self.metrics.registry
        self.stacks_state: dict[str, StackState] = {}
        self._ports: dict[tuple[int, int], PortAllocator] = {}
        self._waiters: set[asyncio.Future[None]] = set()
        self._background: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.breakers = BreakerRegistry(on_change=self._on_circuit)
        self.registry.register(self.breakers.collector())
        self._circuit_events: set[asyncio.Task[Event]] = set()
        self.routers = ServiceRouters(self)
        self.local = LocalResources(self)  # CPU sets, GPUs, disk quotas
        self.ops = OperationQueue(self.store, emit=self.record_event, finished=self.notify,
                                  max_concurrent=self.config.max_concurrent_deployments)
        self.ops.register("apply", partial(handlers.apply, self), resumable=True)
        self.ops.register("down", partial(handlers.down, self), resumable=True)
        self.ops.register("restart", partial(handlers.restart, self), resumable=True)
        self.ops.register("recover", partial(handlers.recover, self), resumable=True)
        self.ops.register("rollback", partial(handlers.apply, self), resumable=True)
        self.ops.register("scale", partial(handlers.scale, self), resumable=True)
        self.ops.register("autoscale-resume", partial(handlers.resume_autoscale, self),
                          resumable=True)
        self.autoscaler = Autoscaler(self, prometheus_url=self.config.prometheus_url)
        self._autoscaling: asyncio.Task[None] | None = None
        self._started = False
        self._rollouts: dict[tuple[str, str], RolloutControl] = {}
        # blue-green: previous sets kept for `keep_previous`, retired by these tasks
        self.retirements: dict[tuple[str, str], asyncio.Task[None]] = {}

    # -- lifecycle --------------------------------------------------------------------
    def _container_runtime(self) -> Runtime:
        """The container runtime, made on first use: it imports the Docker SDK (and its
        HTTP stack), which a stack of processes never needs in memory."""
        from shipyard.runtime.container import ContainerRuntime

        return ContainerRuntime(self.config.home, on_notice=partial(output.on_log_notice, self))

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self.config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.config.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.store.open()
        self._started = True
        if not self.standby:
            await self.activate()

    async def activate(self) -> None:
        """Start acting: recover from the store (re-adopting what still runs), run the
        operations, the autoscaler and the reconcile loop. A standby does this once it
        leads (engine/leadership.py)."""
        self.standby = False
        warning = getattr(self.runtime, "warning", None)
        if warning:  # said once per control plane start, never silently
            await self.record_event(Event("runtime.warning", warning))
        await self._recover()
        await self.autoscaler.load()
        await self.ops.start()
        self._autoscaling = asyncio.create_task(self.autoscaler.run(), name="autoscaler")
        self.local.disk.start()
        self._background = asyncio.create_task(output.rotate_logs(self), name="reconcile")
        self._watcher = asyncio.create_task(DependencyWatcher(self).run(), name="dependencies")

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        for task in (self._background, self._watcher, self._autoscaling,
                     *self.retirements.values()):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.ops.close()
        if self.config.stop_on_exit:
            for name in list(self.stacks_state):
                await handlers.stop_stack(self, name)
        else:
            for state in self.stacks_state.values():
                await asyncio.gather(*(s.detach() for s in state.supervisors.values()))
        await self.routers.close()
        await self.local.disk.close()
        await self.autoscaler.close()
        await self.runtime.close()
        await self.store.close()

    @property
    def running(self) -> bool:
        return self._started

    # -- the public API ---------------------------------------------------------------
    async def plan(self, stack: Stack) -> PlanReport:
        return (await preflight(self, stack)).report

    async def apply(self, stack: Stack, *, priority: str | int = "normal") -> DeployResult:
        """Check the stack, then deploy it and wait until the deploy is over."""
        report = await self.submit(stack, priority=priority)
        assert report.operation is not None
        return await self._deploy_result(report.operation)

    async def submit(self, stack: Stack, *, priority: str | int = "normal") -> PlanReport:
        """Check the stack (raising before anything is queued or started), then queue its
        deploy as an operation; returns the plan, with the operation's id, at once."""
        checked = await preflight(self, stack)
        op = await self.ops.submit(OperationRecord(
            "apply", stack.name, priority=parse_priority(priority),
            timeout=stack.deploy.timeout * 3 + 60,  # a failed deploy may roll back too
            payload={"stack": stack_document(stack),
                     "previous": stack_document(checked.previous) if checked.previous
                     else None}))
        checked.report.operation = op.id
        return checked.report

    async def wait_deploy(self, stack: str) -> DeployResult:
        """The result of the stack's newest deploy, waiting for it if it runs."""
        ops = await self.store.list_operations(stack=stack)
        applies = [op for op in ops if op.kind in ("apply", "rollback") and op.id is not None]
        if not applies:
            self._state(stack)  # NotFoundError naming the known stacks
            raise NotFoundError(f"stack {stack} has no deploy to wait for")
        assert applies[-1].id is not None
        return await self._deploy_result(applies[-1].id)

    async def _deploy_result(self, op_id: int) -> DeployResult:
        op = await self.ops.wait(op_id)
        if op.result:
            return DeployResult(**op.result)
        return DeployResult(stack=op.stack, ok=False, duration=0.0,
                            failed={"*": op.error or op.state.value})

    async def down(self, stack: str, *, priority: str | int = "high") -> None:
        """Stop every instance, dependents first, and forget the stack (events stay). A
        deploy of the stack that is queued or running is cancelled: `down` supersedes it."""
        self._state(stack)
        await self.ops.cancel(stack=stack, kinds=("apply", "restart"))
        await self._run_op(OperationRecord("down", stack, priority=parse_priority(priority)))

    async def restart(self, stack: str, service: str, *, rolling: bool = False,
                      priority: str | int = "normal") -> dict[str, Any]:
        """Restart a service's instances: all at once, or one at a time (`rolling`), each
        next one only once the previous is ready again."""
        self._service(stack, service)
        op = await self._run_op(OperationRecord(
            "restart", stack, service=service, priority=parse_priority(priority),
            payload={"rolling": rolling}))
        return op.result

    async def history(self, stack: str, service: str) -> list[dict[str, Any]]:
        """The service's revisions, oldest first (when, what changed, outcome, current)."""
        self._service(stack, service)
        return await revisions.history(self, stack, service)

    async def rollback(self, stack: str, service: str, *, to: int | None = None,
                       priority: str | int = "high") -> DeployResult:
        """Deploy an earlier revision of one service again (default: the previous deployed
        one); the rest of the stack is left as it is."""
        target_stack, target = await revisions.rollback_stack(self, stack, service, to)
        checked = await preflight(self, target_stack)
        op = await self.ops.submit(OperationRecord(
            "rollback", stack, priority=parse_priority(priority),
            timeout=target_stack.deploy.timeout * 3 + 60,
            payload={"stack": stack_document(target_stack), "service": service,
                     "to": target, "previous": stack_document(checked.previous)
                     if checked.previous else None}))
        assert op.id is not None
        return await self._deploy_result(op.id)

    async def scale(self, stack: str, service: str, replicas: int, *,
                    priority: str | int = "high") -> dict[str, Any]:
        """Run `replicas` instances of a service (a manual count: autoscaling of the service
        is suspended until `resume_autoscale`)."""
        self._service(stack, service)
        if replicas < 0:
            raise ShipyardError(f"a count of instances cannot be negative, got {replicas}")
        op = await self._run_op(OperationRecord(
            "scale", stack, service=service, priority=parse_priority(priority),
            payload={"replicas": replicas, "manual": True}))
        return op.result

    async def resume_autoscale(self, stack: str, service: str) -> dict[str, Any]:
        self._service(stack, service)
        op = await self._run_op(OperationRecord("autoscale-resume", stack, service=service,
                                                priority=1))
        return op.result

    async def top(self, stack: str) -> dict[str, Any]:
        """Live figures per service and instance (CPU, memory, router traffic) and the
        autoscaler's latest decisions."""
        self._state(stack)
        await self.autoscaler.sample_all(stack)
        return self.autoscaler.view(stack)

    async def recover(self, stack: str, *, priority: str | int = "high") -> dict[str, Any]:
        """Partial recovery: restart only the failed services and their dependents."""
        self._state(stack)
        op = await self._run_op(OperationRecord("recover", stack,
                                                priority=parse_priority(priority)))
        return op.result

    async def _run_op(self, op: OperationRecord) -> OperationRecord:
        await self.ops.submit(op)
        assert op.id is not None
        done = await self.ops.wait(op.id)
        if done.state is not OpState.SUCCEEDED:
            raise OperationFailed(f"{self.ops.describe(done)} {done.state.value}: {done.error}")
        return done

    async def stacks(self) -> list[StackRecord]:
        return await self.store.list_stacks()

    async def instances(self, stack: str | None = None,
                        service: str | None = None) -> list[InstanceRecord]:
        if self.standby:  # HA: what the leader recorded
            from shipyard.engine.leadership import stored_instances  # etcd: HA only

            return await stored_instances(self.store, stack, service)
        if stack is not None and stack not in self.stacks_state:
            raise NotFoundError(f"no stack named {stack}",
                                hint=f"known: {', '.join(sorted(self.stacks_state)) or 'none'}")
        if service is not None and stack is not None:
            self._service(stack, service)
        out = [sup.record for name, st in sorted(self.stacks_state.items())
               if stack in (None, name) for sup in st.supervisors.values()
               if service in (None, sup.record.service)]
        return sorted(out, key=lambda r: (r.stack, r.service, r.index))

    def log_files(self, stack: str, service: str | None = None) -> list[tuple[str, Path]]:
        state = self._state(stack)
        if service is not None:
            self._service(stack, service)
        return [(sup.name, self.config.log_path(stack, sup.name))
                for sup in sorted(state.supervisors.values(),
                                  key=lambda s: (s.record.service, s.record.index))
                if service in (None, sup.record.service)]

    # -- helpers used by supervisors and deployers ----------------------------------------
    async def record_event(self, event: Event) -> Event:
        # no secret value reaches the event log, whichever layer wrote the message
        return await self.store.append_event(redact_event(event))

    def notify(self) -> None:
        """Wake whoever waits for a change of any instance (deployers), and bring the
        routers' backend sets up to date."""
        self.routers.sync()
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def changed(self, timeout: float) -> None:
        """Wait until `notify()` or `timeout` seconds, whichever comes first."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the future completes, and a task cancelled
            # at close would then never end.
            await asyncio.wait([fut], timeout=max(timeout, 0))
        finally:
            self._waiters.discard(fut)

    # -- rollouts -----------------------------------------------------------------------
    def rollout_control(self, stack: str, service: str, *, create: bool = False,
                        drop: bool = False) -> RolloutControl:
        """The control of the rollout of `service` in progress (made with `create`,
        forgotten with `drop`)."""
        key = (stack, service)
        if drop:
            return self._rollouts.pop(key, RolloutControl())
        if create:
            self._rollouts[key] = RolloutControl()
        control = self._rollouts.get(key)
        if control is None:
            self._service(stack, service)
            raise NotFoundError(f"service {service} of stack {stack} has no rollout in "
                                f"progress", hint=f"see `shipyard history {service}`")
        return control

    def promote(self, stack: str, service: str) -> str:
        """Promote the rollout in progress: a blue-green swap or a canary waiting for
        `shipyard promote` goes on; a canary skips its remaining steps."""
        control = self.rollout_control(stack, service)
        control.promoted.set()
        self.notify()
        return control.phase

    def abort(self, stack: str, service: str) -> str:
        """Abort the rollout in progress: the new revision's instances are removed and the
        service goes back to the old one."""
        control = self.rollout_control(stack, service)
        control.aborted.set()
        self.notify()
        return control.phase

    def ports_for(self, stack: Stack) -> PortAllocator:
        key = stack.ports.range
        if key not in self._ports:
            self._ports[key] = PortAllocator(*key)
        return self._ports[key]

    def dependency_ports(self, stack: Stack, service: str) -> dict[str, int | None]:
        """Each dependency's address for `<DEP>_PORT`: its router's port when it is exposed,
        else its first instance's first port."""
        state = self.stacks_state.get(stack.name)
        out: dict[str, int | None] = {}
        for dep in stack.services[service].depends_on:
            port = stack.services[dep].expose
            if port is not None:
                out[dep] = port
                continue
            if state is not None:
                for sup in state.instances_of(dep):
                    if sup.record.ports:
                        port = next(iter(sup.record.ports.values()))
                        break
            out[dep] = port
        return out

    def breaker_for(self, stack: Stack, service: str) -> CircuitBreaker | None:
        """The service's restart circuit breaker, configured from its stack file (None when
        the file disables it); a changed configuration starts a fresh breaker."""
        spec = stack.services[service].circuit_breaker
        name = f"service:{stack.name}/{service}"
        if not spec.enabled:
            self.breakers.remove(name)
            return None
        config = BreakerConfig(
            failure_rate_threshold=spec.failure_rate, window=spec.window,
            minimum_calls=spec.minimum_calls, consecutive_failures=spec.consecutive_failures,
            recovery_timeout=spec.recovery_timeout,
            half_open_max_calls=spec.half_open_max_calls)
        breaker = self.breakers.get(name, config)
        if breaker.config != config:
            self.breakers.remove(name)
            breaker = self.breakers.get(name, config)
        return breaker

    def _on_circuit(self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState,
                    reason: str) -> None:
        """Every state change of a circuit is an event (the gauge is read at scrape)."""
        subject = breaker.name.partition(":")[2]
        stack, _, service = subject.partition("/")
        event = Event(f"circuit.{new.value}", f"circuit {old.value} → {new.value}: {reason}",
                      stack=stack or None, service=service or None,
                      data={"breaker": breaker.name, "from": old.value, "to": new.value})
        self.emit_soon(event)

    def emit_soon(self, event: Event) -> None:
        """Record `event` from synchronous code (a callback): in a task of its own."""
        task = asyncio.get_running_loop().create_task(self.record_event(event))
        self._circuit_events.add(task)
        task.add_done_callback(self._circuit_events.discard)

    async def stop_services(self, state: StackState, services: Iterable[str]) -> None:
        """Stop the instances of `services`, dependents before their dependencies."""
        wanted = set(services)
        for phase in reversed(state.graph.phases()):
            sups = [s for s in state.supervisors.values()
                    if s.record.service in wanted and s.record.service in phase]
            await asyncio.gather(*(s.stop() for s in sups))
            for sup in sups:
                self.release_instance(state, sup)
        # instances of services no longer in the graph (removed from the stack file)
        rest = [s for s in state.supervisors.values() if s.record.service in wanted]
        await asyncio.gather(*(s.stop() for s in rest))
        for sup in rest:
            self.release_instance(state, sup)

    def release_instance(self, state: StackState, sup: InstanceSupervisor) -> None:
        self.ports_for(state.stack).release(f"{state.stack.name}/{sup.name}")
        self.local.release(state.stack.name, sup.name)
        state.supervisors.pop(sup.name, None)

    # -- internals --------------------------------------------------------------------
    def _state(self, stack: str) -> StackState:
        state = self.stacks_state.get(stack)
        if state is None:
            raise NotFoundError(f"no stack named {stack}",
                                hint=f"known: {', '.join(sorted(self.stacks_state)) or 'none'}")
        return state

    def _service(self, stack: str, service: str) -> None:
        services = self._state(stack).stack.services
        if service not in services:
            raise NotFoundError(f"stack {stack} has no service {service}",
                                hint=f"services: {', '.join(sorted(services))}")

    def _instance_states(self) -> Iterable[tuple[str, str, InstanceState]]:
        for name, state in list(self.stacks_state.items()):
            for sup in list(state.supervisors.values()):
                yield name, sup.record.service, sup.record.state

    async def _recover(self) -> None:
        """Resume from the store (engine/recovery.py)."""
        await recovery.recover(self)
