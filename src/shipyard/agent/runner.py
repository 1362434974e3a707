"""What an agent runs for one assignment: a small supervisor of one instance.

It is smaller than the engine's InstanceSupervisor (engine/instance.py), which is tied to
the engine (its port allocator, local resources, routers, breakers, metrics): an agent has
none of those. This one launches the instance through the process runtime, gates it on its
readiness probe when it has one, restarts it by its restart policy (plan/restart.py, the
same decisions as the engine), and records every transition in the store as the engine
does: the instance record (`instances/<stack>/<instance>`, with `runtime.node`) and an
event, in one transaction that commits only while the assignment it runs for is still
there unchanged, so an agent whose instance was moved elsewhere cannot overwrite the
record of its new node.

Not supported on nodes yet (the instance fails with the reason): container images and
secrets. Dependencies get no `<DEP>_HOST/_PORT` variables (the services of a stack may
be on other nodes; that needs the routers of part 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shipyard.agent.records import Assignment
from shipyard.engine.environment import instance_argv, instance_environment, instance_workdir
from shipyard.errors import NotFoundError, RuntimeLaunchError, ShipyardError, StoreError
from shipyard.health.monitor import ProbeMonitor
from shipyard.health.probes import ProbeResult
from shipyard.plan.restart import decide_restart
from shipyard.runtime.base import Handle, LaunchSpec, Runtime
from shipyard.spec.models import Service, Stack
from shipyard.state.base import Event, InstanceRecord, InstanceState
from shipyard.state.etcd import EtcdStore

log = logging.getLogger("shipyard.agent")
TERMINAL = (InstanceState.STOPPED, InstanceState.COMPLETED, InstanceState.FAILED)
STABLE = 10.0  # fallback for min_uptime when the policy says 0


class NodeInstance:
    """Runs `assignment` on this node until `stop()`; `mod_revision` is the assignment
    key's, which every record write is conditioned on (`update_revision` follows it)."""

    def __init__(self, store: EtcdStore, runtime: Runtime, node: str, home: Path,
                 assignment: Assignment, key: bytes, mod_revision: int, *,
                 on_handle: Callable[[str, Handle | None, Service], None]) -> None:
        self.store = store
        self.runtime = runtime
        self.node = node
        self.home = home
        self.assignment = assignment
        self.key = key
        self.mod_revision = mod_revision
        self.on_handle = on_handle  # tells the reaper what runs (None: nothing now)
        self.service = Service.model_validate(assignment.spec)
        self.stack = Stack.model_construct(name=assignment.stack,
                                           services={assignment.service: self.service},
                                           base_dir=assignment.base_dir, source=None)
        self.record = InstanceRecord(
            stack=assignment.stack, service=assignment.service, instance=assignment.instance,
            index=assignment.index, revision=assignment.revision,
            ports=dict(assignment.ports), runtime={"node": node})
        self.handle: Handle | None = None
        self.task: asyncio.Task[None] | None = None
        self._stopping = False
        self._record_stop = True
        self._wake = asyncio.Event()
        self._streak = 0

    @property
    def name(self) -> str:
        return f"{self.assignment.stack}/{self.assignment.instance}"

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"node-instance:{self.name}")

    def update_revision(self, mod_revision: int) -> None:
        self.mod_revision = mod_revision

    async def stop(self, *, record: bool = True) -> None:
        """Stop the instance for good (its stop signal, SIGKILL after its timeout).
        `record=False`: the assignment is gone, so no record is written either."""
        self._stopping = True
        self._record_stop = record
        self._wake.set()
        handle = self.handle
        if handle is not None:
            await self.runtime.stop(handle, self.service.stop.signal,
                                    self.service.stop.timeout)
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.task)

    # -- the loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        policy = self.service.restart
        while not self._stopping:
            handle = await self._launch()
            if handle is None:
                return
            self.handle = handle
            if self._stopping:  # stop() came while it was being launched
                await self.runtime.stop(handle, self.service.stop.signal,
                                        self.service.stop.timeout)
            self.on_handle(self.name, handle, self.service)
            code = await self._supervise(handle)
            self.handle = None
            self.on_handle(self.name, None, self.service)
            if self._stopping:
                if self._record_stop:
                    await self._set(InstanceState.STOPPED, "stopped", "instance.stopped",
                                    exit_code=code, ready=False)
                return
            what = f"exited {code}" if code is not None else "exited (code unknown)"
            started = self.record.started_at or time.time()
            if time.time() - started >= (policy.min_uptime or STABLE):
                self._streak = 0
            decision = decide_restart(policy, code, self._streak, random=random.random())
            if decision.final_state == "completed":
                await self._set(InstanceState.COMPLETED, what, "instance.completed",
                                exit_code=code, ready=False)
                return
            if not decision.restart:
                await self._set(InstanceState.FAILED, f"{what}; {decision.reason}",
                                "instance.failed", exit_code=code, ready=False)
                return
            await self._set(InstanceState.BACKOFF,
                            f"{what}; restarting in {decision.delay:.1f}s", "instance.exited",
                            exit_code=code, ready=False, health="unknown")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(decision.delay):
                    await self._wake.wait()
            self._streak += 1
            self.record.restarts += 1
        if self._record_stop:  # stopped during a backoff
            await self._set(InstanceState.STOPPED, "stopped", "instance.stopped", ready=False)

    async def _launch(self) -> Handle | None:
        svc, a = self.service, self.assignment
        await self._set(InstanceState.STARTING, f"starting on node {self.node}", None,
                        pid=None, exit_code=None)
        try:
            if svc.image is not None:
                raise RuntimeLaunchError(f"service {a.service}: containers are not run on "
                                         "nodes yet (docs/nodes.md)")
            if svc.secrets:
                raise RuntimeLaunchError(f"service {a.service}: secrets are not delivered "
                                         "on nodes yet (docs/nodes.md)")
            env = self._environment()
            spec = LaunchSpec(
                stack=a.stack, service=a.service, instance=a.instance,
                argv=instance_argv(a.service, svc, env), env=env,
                workdir=instance_workdir(self.stack, svc),
                log_path=str(self.home / "logs" / a.stack / f"{a.instance}.log"),
                stop_signal=svc.stop.signal, stop_timeout=svc.stop.timeout,
                cpu_limit=svc.resources.cpu, memory_limit=svc.resources.memory,
                swap_limit=svc.resources.swap, user=getattr(svc, "user", None))
            handle = await self.runtime.start(spec)
        except ShipyardError as exc:  # not found, not executable, bad user or signal...
            await self._set(InstanceState.FAILED, exc.message, "instance.failed", ready=False)
            return None
        await self._set(InstanceState.RUNNING, f"pid {handle.pid} on node {self.node}",
                        "instance.started", pid=handle.pid, pgid=handle.pgid,
                        proc_start=handle.proc_start, cgroup=handle.cgroup,
                        runtime={**handle.extra, "node": self.node},
                        started_at=time.time(), ready=False, health="unknown")
        return handle

    def _environment(self) -> dict[str, str]:
        a = self.assignment
        env = instance_environment(self.stack, a.service, a.instance, a.ports, {})
        env["SHIPYARD_NODE"] = self.node
        return env

    async def _supervise(self, handle: Handle) -> int | None:
        probe = self.service.health.readiness
        monitor: ProbeMonitor | None = None
        if probe is None:
            await self._set(InstanceState.READY, "running (no readiness probe)",
                            "instance.ready", ready=True, health="passing")
        else:
            monitor = ProbeMonitor(probe, self.record.ports, self._on_readiness,
                                   env=self._environment(),
                                   cwd=instance_workdir(self.stack, self.service))
            monitor.start()
        try:
            return await self.runtime.wait(handle)
        finally:
            if monitor is not None:
                await monitor.stop()

    async def _on_readiness(self, passing: bool, result: ProbeResult) -> None:
        if self._stopping or self.handle is None:
            return
        if passing:
            await self._set(InstanceState.READY, "ready", "instance.ready", ready=True,
                            health="passing")
        else:
            await self._set(InstanceState.RUNNING, f"not ready: {result.message}",
                            "instance.unready", ready=False, health="failing")

    # -- recording ------------------------------------------------------------------------
    async def _set(self, state: InstanceState, message: str, event: str | None,
                   **fields: Any) -> None:
        """Record the transition (record + event), only while the assignment holds."""
        rec = self.record
        rec.state, rec.message, rec.updated_at = state, message, time.time()
        for key, value in fields.items():
            setattr(rec, key, value)
        try:
            async with self.store.transaction():
                self.store.check_raw(self.key, self.mod_revision)
                await self.store.put_instance(rec)
                if event is not None:
                    await self.store.append_event(Event(
                        kind=event, message=message, stack=rec.stack, service=rec.service,
                        instance=rec.instance,
                        data={"state": state.value, "pid": rec.pid, "node": self.node,
                              "exit_code": rec.exit_code}))
        except (StoreError, NotFoundError) as exc:  # moved, removed or changed meanwhile;
            # the stack was deleted; or etcd is away
            log.warning("%s: not recorded (%s): %s", self.name, state.value, exc.message)
