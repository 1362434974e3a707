"""Dependencies stay true after the first start: when a service that others depend on
stops being healthy, each dependent reacts as its `depends_on` edge says (`on_lost`):
`ignore`, `pause` (frozen until the dependency is back), `stop` (stopped until it is back,
then started again) or `restart` (restarted once it is back, to reconnect)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shipyard.engine.deploy import service_milestones
from shipyard.plan.schedule import Milestone
from shipyard.state.base import Event, OperationRecord

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine, StackState

log = logging.getLogger(__name__)


class DependencyWatcher:
    """Watches each service's health and carries out the `on_lost` reactions. Skips a
    stack while an operation runs on it (a deploy or a restart is in charge then)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.healthy: dict[tuple[str, str], bool] = {}
        self.held: dict[tuple[str, str], str] = {}  # (stack, dependent) -> "pause" | "stop"

    async def run(self) -> None:
        while True:
            # woken by every instance change; the timeout is only a safety net
            await self.engine.changed(5.0)
            for state in list(self.engine.stacks_state.values()):
                if self.engine.ops.running(state.stack.name):
                    continue
                try:
                    await self.check(state)
                except Exception:  # a reaction that fails must not end the watcher
                    log.exception("dependency reactions for %s failed", state.stack.name)

    async def check(self, state: StackState) -> None:
        stack = state.stack
        for name, svc in stack.services.items():
            reached = service_milestones(state.instances_of(name), svc.replicas)
            healthy = Milestone.HEALTHY in reached
            key = (stack.name, name)
            before = self.healthy.get(key)
            self.healthy[key] = healthy
            if before is None or before == healthy:
                continue
            for dependent, dep_svc in stack.services.items():
                edge = dep_svc.depends_on.get(name)
                if edge is None or edge.on_lost == "ignore":
                    continue
                if not healthy:
                    await self._lost(state, dependent, name, edge.on_lost)
                else:
                    await self._restored(state, dependent, name, edge.on_lost)

    async def _lost(self, state: StackState, dependent: str, dep: str, action: str) -> None:
        stack = state.stack.name
        await self._event(stack, dependent, "dependency.lost",
                          f"{dep} is no longer healthy: {action} {dependent}")
        if action == "pause":
            for sup in state.instances_of(dependent):
                await sup.pause(f"{dep} is not healthy")
            self.held[(stack, dependent)] = "pause"
        elif action == "stop":
            for sup in state.instances_of(dependent):
                await sup.stop()
            self.held[(stack, dependent)] = "stop"

    async def _restored(self, state: StackState, dependent: str, dep: str,
                        action: str) -> None:
        stack = state.stack
        if any(not self.healthy.get((stack.name, other), True)
               for other, edge in stack.services[dependent].depends_on.items()
               if edge.on_lost == action):
            return  # another dependency it reacts to is still lost
        await self._event(stack.name, dependent, "dependency.restored",
                          f"{dep} is healthy again: {action} {dependent} ends")
        held = self.held.pop((stack.name, dependent), None)
        if action == "pause" and held == "pause":
            for sup in state.instances_of(dependent):
                await sup.resume(f"{dep} is healthy again")
        elif action == "stop" and held == "stop":
            from shipyard.engine.handlers import replace_instance

            for sup in state.instances_of(dependent):
                await replace_instance(self.engine, state, sup)
        elif action == "restart":
            await self.engine.ops.submit(OperationRecord(
                "restart", stack.name, service=dependent, priority=1,
                payload={"rolling": False, "reason": f"{dep} came back"}))

    async def _event(self, stack: str, service: str, kind: str, message: str) -> None:
        await self.engine.record_event(Event(kind, message, stack=stack, service=service))


__all__ = ["DependencyWatcher"]
