"""Stable addresses: a service with `expose: PORT` is reached at 127.0.0.1:PORT through a
built-in router that balances over its ready instances. The backend set is derived from the
instances every time one changes (level-triggered), so it can never drift from them.

Rollouts steer it on top of that: instances `leaving` get no new connections (they drain
before they are stopped), a `pin` limits a service to a set of instances (blue-green: the
side that serves), and `weights` split new connections between revisions (canary)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shipyard.spec.models import Stack
from shipyard.state.base import InstanceState
from shipyard.traffic import Backend, Router, RouterCollector

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine, StackState


class ServiceRouters:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.routers: dict[tuple[str, str], Router] = {}
        self.leaving: set[tuple[str, str]] = set()  # (stack, instance)
        self.pins: dict[tuple[str, str], frozenset[str]] = {}
        self.weights: dict[tuple[str, str], dict[str, int]] = {}
        engine.registry.register(RouterCollector(lambda: list(self.routers.values())))

    def router(self, stack: str, service: str) -> Router | None:
        return self.routers.get((stack, service))

    def owns(self, port: int) -> bool:
        return any(r.port == port for r in self.routers.values())

    async def ensure(self, stack: Stack) -> None:
        """Start a router for each exposed service (before its dependents start, so their
        `<DEP>_URL` answers), and close the routers of services no longer exposed."""
        wanted = {name: svc.expose for name, svc in stack.services.items() if svc.expose}
        for (stack_name, service), router in list(self.routers.items()):
            if stack_name == stack.name and wanted.get(service) != router.port:
                await router.close()
                del self.routers[(stack_name, service)]
        for service, port in wanted.items():
            if (stack.name, service) not in self.routers:
                router = Router(port, service=f"{stack.name}/{service}")
                await router.start()
                self.routers[(stack.name, service)] = router
        self.sync()

    def sync(self) -> None:
        """Set every router's backends from its service's instances (cheap; called on every
        instance change)."""
        for (stack_name, service), router in self.routers.items():
            state: StackState | None = self.engine.stacks_state.get(stack_name)
            if state is None:
                continue
            backends = []
            pin = self.pins.get((stack_name, service))
            for sup in state.instances_of(service):
                rec = sup.record
                if not rec.ports or not rec.state.alive \
                        or (stack_name, rec.instance) in self.leaving \
                        or (pin is not None and rec.instance not in pin):
                    continue
                backends.append(Backend(rec.instance, "127.0.0.1",
                                        next(iter(rec.ports.values())),
                                        revision=str(rec.revision),
                                        ready=rec.state is InstanceState.READY))
            router.set_backends(backends)
            router.set_weights(self.weights.get((stack_name, service)))

    def steer(self, stack: str, service: str, *, pin: frozenset[str] | None = None,
              weights: dict[str, int] | None = None) -> None:
        """Set (or with None, lift) a service's pin and revision weights, at once."""
        key = (stack, service)
        for table, value in ((self.pins, pin), (self.weights, weights)):
            if value is None:
                table.pop(key, None)  # type: ignore[attr-defined]
            else:
                table[key] = value  # type: ignore[index]
        self.sync()

    async def drain(self, stack: str, service: str, instances: list[str],
                    timeout: float) -> None:
        """Take `instances` out of the service's router and wait (up to `timeout`) until
        their in-flight connections are done, so that stopping them fails no request."""
        for name in instances:
            self.leaving.add((stack, name))
        self.sync()
        router = self.routers.get((stack, service))
        if router is not None:
            await router.wait_drained(timeout)

    def forget(self, stack: str, instances: list[str]) -> None:
        """Instances that are gone: no need to remember they were leaving."""
        for name in instances:
            self.leaving.discard((stack, name))

    async def close(self, stack: str | None = None) -> None:
        for key, router in list(self.routers.items()):
            if stack is None or key[0] == stack:
                await router.close()
                del self.routers[key]
