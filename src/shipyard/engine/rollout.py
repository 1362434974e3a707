"""Rollouts: replace the running instances of one service with a new revision, by the
service's `update` strategy, without failing a request that goes through its router.

Which instance is "new" is decided by template hash (the spec without replicas, update and
autoscale), not by revision number: rolling back to an
earlier spec makes the instances still running that spec current again, so a blue-green
rollback within `keep_previous` is a swap and nothing more.

Every strategy stops an instance the same way: out of the router, drained, then stopped
(`_retire`). The decisions (how many to start or stop, canary weights, whether a window
of traffic passes) are the plan layer's (plan/rollout.py); this module carries them out.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from shipyard.engine.instance import InstanceSupervisor
from shipyard.plan.diff import template_hash
from shipyard.plan.rollout import RollingCounts, rolling_step
from shipyard.spec.models import Stack
from shipyard.spec.update import UpdateStrategy
from shipyard.state.base import Event, InstanceRecord, InstanceState

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine, StackState

READY = (InstanceState.READY, InstanceState.COMPLETED)


class RolloutFailed(Exception):
    """The rollout stopped; the message says why (shown in events and the deploy result)."""


class RolloutControl:
    """What an operator can tell a rollout in progress: promote (manual promotion, or skip
    the rest of the canary steps) or abort."""

    def __init__(self) -> None:
        self.promoted = asyncio.Event()
        self.aborted = asyncio.Event()
        self.phase = "starting"


def new_instance(engine: Engine, state: StackState, stack: Stack, service: str, index: int,
                 revision: int, keep_ports: dict[str, int] | None = None) -> InstanceSupervisor:
    """A supervisor (not yet started) for instance `index` of `service` at `revision`:
    fixed ports claimed, `auto` ports taken from `keep_ports` when still free for it,
    else allocated."""
    svc = stack.services[service]
    instance = f"{service}-{index}"
    owner = f"{stack.name}/{instance}"
    ports = engine.ports_for(stack)
    previous = keep_ports or {}
    assigned: dict[str, int] = {}
    for port_name, port in svc.ports.items():
        if port != "auto":
            assert isinstance(port, int)
            assigned[port_name] = port
            ports.reserve(port, owner)
        elif port_name in previous and ports.owner_of(previous[port_name]) in (None, owner):
            assigned[port_name] = previous[port_name]
            ports.reserve(previous[port_name], owner)
        else:
            assigned[port_name] = ports.allocate(owner)
    record = InstanceRecord(stack=stack.name, service=service, instance=instance,
                            index=index, revision=revision, ports=assigned, restarts=0)
    sup = InstanceSupervisor(engine, stack, record)
    state.supervisors[instance] = sup
    return sup


async def scale_in_place(engine: Engine, state: StackState, stack: Stack, service: str,
                         revision: int) -> tuple[int, int]:
    """Only the count (or how updates and autoscaling go) changed: keep the instances,
    relabel them to `revision`, add the missing ones and remove the extra ones (highest
    index first, drained first). Returns (added, removed)."""
    svc = stack.services[service]
    sups = state.instances_of(service)
    for sup in sups:
        sup.stack, sup.service = stack, svc
        if sup.record.revision != revision:
            sup.record.revision = revision
            await engine.store.put_instance(sup.record)
    extra = sorted(sups, key=lambda s: -s.record.index)[:max(0, len(sups) - svc.replicas)]
    if extra:
        names = [s.name for s in extra]
        await engine.routers.drain(stack.name, service, names,
                                   max(s.service.stop.timeout for s in extra))
        await asyncio.gather(*(s.stop() for s in extra))
        for sup in extra:
            engine.release_instance(state, sup)
            await engine.store.delete_instance(stack.name, sup.name)
        engine.routers.forget(stack.name, names)
    used = {s.record.index for s in state.instances_of(service)}
    added = 0
    index = 1
    while len(used) < svc.replicas:
        if index not in used:
            sup = new_instance(engine, state, stack, service, index, revision)
            await engine.store.put_instance(sup.record)
            sup.start()
            used.add(index)
            added += 1
        index += 1
    engine.routers.sync()
    engine.notify()
    return added, len(extra)


async def template_hashes(engine: Engine, stack: str, service: str) -> dict[int, str]:
    """Each recorded revision of `service`: its template hash."""
    return {r.revision: template_hash(r.spec)
            for r in await engine.store.list_revisions(stack, service)}


class Rollout:
    """One service's rollout to the stack's current spec at `revision`."""

    def __init__(self, engine: Engine, state: StackState, stack: Stack, service: str,
                 revision: int, control: RolloutControl) -> None:
        self.engine = engine
        self.state = state
        self.stack = stack
        self.service = service
        self.spec = stack.services[service]
        self.policy = self.spec.update
        self.revision = revision
        self.target_hash = template_hash(self.spec)
        self.control = control
        self.hashes: dict[int, str] = {}
        self.deadline = 0.0
        self._ready_since: dict[str, float] = {}
        self._puts: list[InstanceSupervisor] = []
        # old instances on their way out (drain and stop run in the background, so that
        # their replacements start meanwhile, as terminating pods do in Kubernetes)
        self._leaving: set[str] = set()
        self._retiring: list[asyncio.Task[None]] = []

    # -- entry ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Carry the rollout out; raises RolloutFailed (after rolling back, if asked)."""
        self.hashes = await template_hashes(self.engine, self.stack.name, self.service)
        self.deadline = time.monotonic() + self.policy.progress_deadline
        strategy = self.policy.strategy
        await self._event("rollout.started",
                          f"rolling out revision {self.revision} ({strategy.value}): "
                          f"{len(self._old())} old, {len(self._new())} new instance(s)")
        # relabel instances that already run the target spec (a rollback to a spec still
        # running) so `ps` shows the current revision
        for sup in self._new():
            if sup.record.revision != self.revision:
                sup.record.revision = self.revision
                await self.engine.store.put_instance(sup.record)
        if strategy is UpdateStrategy.ROLLING:
            try:
                await self._rolling()
            finally:
                await asyncio.gather(*self._retiring, return_exceptions=True)
        else:  # blue-green and canary: rollout_traffic.py (which imports this module)
            from shipyard.engine.rollout_traffic import blue_green, canary

            await (blue_green(self) if strategy is UpdateStrategy.BLUE_GREEN else canary(self))
        await self._event("rollout.finished", f"revision {self.revision} rolled out")

    # -- rolling -------------------------------------------------------------------------
    @property
    def in_place(self) -> bool:
        """Replace instances under their own names and ports: a service without a router
        has no stable address but its instances', and a fixed port holds one at a time."""
        return self.spec.expose is None or any(p != "auto" for p in self.spec.ports.values())

    async def _rolling(self) -> None:
        replicas = self.spec.replicas
        surge, unavailable = self.policy.surge_and_unavailable(replicas,
                                                               fixed_ports=self.in_place)
        freed: list[tuple[int, dict[str, int]]] = []  # slots emptied, for in-place starts
        while True:
            self._check()
            old, new = self._old(), self._new()
            old_ready = sum(s.state in READY for s in old)
            step = rolling_step(RollingCounts(replicas, len(old), old_ready, len(new),
                                              len(self.available(new))), surge, unavailable)
            if step.done:
                return
            if step.stop_unready or step.stop_ready:
                unready = [s for s in old if s.state not in READY][:step.stop_unready]
                ready = sorted((s for s in old if s.state in READY),
                               key=lambda s: -s.record.index)[:step.stop_ready]
                victims = unready + ready
                if self.in_place:  # the slot is reused: its instance must be gone first
                    await self.retire(victims, keep_slots=True)
                    freed += [(s.record.index, dict(s.record.ports)) for s in victims]
                else:
                    self._leaving.update(s.name for s in victims)
                    self._retiring.append(asyncio.create_task(
                        self.retire(victims, keep_slots=False)))
                await self._progress()
                continue
            if step.start:
                for _ in range(step.start):
                    if self.in_place and freed:
                        index, ports = freed.pop(0)
                    else:
                        index, ports = self.free_index(), {}
                    self.launch(index, ports)
                await self._progress()
                continue
            await self.wait()

    # -- shared by every strategy --------------------------------------------------------
    def _instances(self) -> list[InstanceSupervisor]:
        return self.state.instances_of(self.service)

    def is_new(self, sup: InstanceSupervisor) -> bool:
        return self.hashes.get(sup.record.revision) == self.target_hash \
            or sup.record.revision == self.revision

    def _new(self) -> list[InstanceSupervisor]:
        return [s for s in self._instances() if self.is_new(s)]

    def _old(self) -> list[InstanceSupervisor]:
        return [s for s in self._instances()
                if not self.is_new(s) and s.name not in self._leaving]

    def available(self, sups: list[InstanceSupervisor]) -> list[InstanceSupervisor]:
        """Those ready, and ready for `min_ready` without a break."""
        now = time.monotonic()
        out = []
        for sup in sups:
            if sup.state not in READY:
                self._ready_since.pop(sup.name, None)
                continue
            since = self._ready_since.setdefault(sup.name, now)
            if now - since >= self.policy.min_ready:
                out.append(sup)
        return out

    def free_index(self) -> int:
        used = {s.record.index for s in self._instances()}
        index = 1
        while index in used:
            index += 1
        return index

    def launch(self, index: int, ports: dict[str, int]) -> InstanceSupervisor:
        self.engine.routers.forget(self.stack.name, [f"{self.service}-{index}"])
        sup = new_instance(self.engine, self.state, self.stack, self.service, index,
                           self.revision, ports)
        self._puts.append(sup)
        return sup

    async def flush(self) -> None:
        """Record and start the instances `launch` prepared."""
        puts, self._puts = self._puts, []
        for sup in puts:
            await self.engine.store.put_instance(sup.record)
            sup.start()
        if puts:
            self.engine.notify()

    async def retire(self, victims: list[InstanceSupervisor], *, keep_slots: bool) -> None:
        """Out of the router, drained, stopped; forgotten unless the slot is reused."""
        if not victims:
            return
        names = [s.name for s in victims]
        longest = max(s.service.stop.timeout for s in victims)
        await self.engine.routers.drain(self.stack.name, self.service, names, longest)
        await asyncio.gather(*(s.stop() for s in victims))
        for sup in victims:
            self.engine.release_instance(self.state, sup)
            if not keep_slots:
                await self.engine.store.delete_instance(self.stack.name, sup.name)
        self.engine.routers.forget(self.stack.name, names)
        self.engine.routers.sync()
        self.engine.notify()

    def _check(self) -> None:
        """Raise if the rollout cannot go on: aborted, a new instance failed, too slow."""
        if self.control.aborted.is_set():
            raise RolloutFailed("aborted by the operator")
        for sup in self._new():
            if sup.state is InstanceState.FAILED:
                raise RolloutFailed(f"new instance {sup.name} failed: {sup.record.message}")
        if time.monotonic() > self.deadline:
            raise RolloutFailed(f"no complete rollout within the progress deadline "
                                f"({self.policy.progress_deadline:g}s)")

    async def wait(self, seconds: float = 1.0) -> None:
        """Until something changes (or `seconds`), after starting what was prepared."""
        await self.flush()
        now = time.monotonic()
        timeout = min(seconds, max(0.0, self.deadline - now) + 0.01)
        # wake when the next ready instance has been ready for `min_ready`
        for since in self._ready_since.values():
            due = since + self.policy.min_ready - now
            if due > 0:
                timeout = min(timeout, due + 0.01)
        await self.engine.changed(max(0.01, timeout))

    async def _progress(self) -> None:
        await self.flush()
        old, new = self._old(), self._new()
        await self._event("rollout.progress",
                          f"{len(self.available(new))}/{self.spec.replicas} new available, "
                          f"{len(new)} new, {len(old)} old")

    async def _event(self, kind: str, message: str) -> None:
        await self.engine.record_event(Event(kind, message, stack=self.stack.name,
                                             service=self.service,
                                             data={"revision": self.revision}))
