"""What each kind of operation does. The queue runs these; each is written to be resumed:
run again after a control-plane crash, it converges to the same end state (apply, down) or
continues from its checkpoint (restart) instead of repeating work."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from shipyard.engine.deploy import Deployer
from shipyard.engine.instance import InstanceSupervisor
from shipyard.engine.preflight import preflight
from shipyard.errors import NotFoundError, ShipyardError
from shipyard.spec.models import Stack
from shipyard.state.base import (
    Event,
    InstanceRecord,
    InstanceState,
    OperationRecord,
    StackRecord,
)

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine


async def apply(engine: Engine, op: OperationRecord) -> dict[str, Any]:
    from shipyard.engine.engine import StackState

    stack = Stack.model_validate(op.payload["stack"])
    checked = await preflight(engine, stack)  # the world may have changed while queued
    previous = op.payload.get("previous")
    # The stack as it was before this operation, not as recorded now: a resumed deploy
    # has already recorded the new stack, and must still roll back to the old one.
    checked.previous = Stack.model_validate(previous) if previous else None
    state = engine.stacks_state.get(stack.name)
    if state is None:
        state = engine.stacks_state[stack.name] = StackState(stack, checked.graph)
    result = await Deployer(engine, state, checked).run()
    return result.as_dict()


async def recover(engine: Engine, op: OperationRecord) -> dict[str, Any]:
    """Partial recovery: redeploy only the services that failed (an instance `failed`, or
    fewer instances than replicas) and every service downstream of them, in dependency
    order; the healthy rest of the stack is left alone."""
    state = engine.stacks_state.get(op.stack)
    if state is None:
        raise NotFoundError(f"no stack named {op.stack}")
    stack = state.stack
    failed = sorted(
        name for name, svc in stack.services.items()
        if len(state.instances_of(name)) != svc.replicas
        or any(s.state is InstanceState.FAILED for s in state.instances_of(name)))
    downstream = set().union(*(state.graph.downstream(name) for name in failed)) - set(failed)
    if not failed:
        return {"ok": True, "recovered": [], "restarted": []}
    await engine.record_event(Event(
        "stack.recovering", f"recovering {', '.join(failed)}"
        + (f" and their dependents {', '.join(sorted(downstream))}" if downstream else ""),
        stack=stack.name))
    checked = await preflight(engine, stack)
    result = await Deployer(engine, state, checked, rollback=False,
                            force=set(failed) | downstream).run()
    return result.as_dict() | {"recovered": failed, "restarted": sorted(downstream)}


async def down(engine: Engine, op: OperationRecord) -> dict[str, Any]:
    if op.stack not in engine.stacks_state:
        if op.attempts > 1:  # resumed after the stack was already forgotten: done
            return {"ok": True}
        raise NotFoundError(f"no stack named {op.stack}")
    await stop_stack(engine, op.stack)
    return {"ok": True}


async def stop_stack(engine: Engine, name: str) -> None:
    """Stop every instance of the stack, dependents first, and forget it."""
    state = engine.stacks_state[name]
    async with state.lock:
        await engine.record_event(Event("stack.stopping", f"stopping stack {name}",
                                        stack=name))
        await engine.stop_services(state, list(state.graph.services))
        await engine.routers.close(name)
        await engine.store.delete_stack(name)
        await engine.record_event(Event("stack.down", f"stack {name} is down", stack=name))
        engine.stacks_state.pop(name, None)
        engine.notify()


async def restart(engine: Engine, op: OperationRecord) -> dict[str, Any]:
    """Replace each instance of the service with a fresh process. Rolling: one at a time,
    the next only once the new one is ready, so that at most one replica is down (never
    fewer ready than replicas - 1, the default max_unavailable). The checkpoint lists the
    instances already done, so a resumed restart does not restart them twice."""
    state = engine.stacks_state.get(op.stack)
    if state is None or op.service not in state.stack.services:
        raise NotFoundError(f"stack {op.stack} has no service {op.service}")
    assert op.service is not None
    rolling = bool(op.payload.get("rolling"))
    done: list[str] = list(op.checkpoint.get("done", []))
    todo = [s for s in state.instances_of(op.service) if s.name not in done]
    timeout = state.stack.deploy.timeout
    async with state.lock:
        if rolling:
            for sup in todo:
                fresh = await replace_instance(engine, state, sup)
                await _wait_ready(engine, fresh, timeout)
                done.append(fresh.name)
                op.checkpoint = {"done": done}
                await engine.store.put_operation(op)
        else:
            fresh_ones = [await replace_instance(engine, state, sup) for sup in todo]
            for fresh in fresh_ones:
                await _wait_ready(engine, fresh, timeout)
            done += [f.name for f in fresh_ones]
    await engine.record_event(Event(
        "service.restarted", f"restarted {len(done)} instance(s)"
        + (" one at a time" if rolling else ""), stack=op.stack, service=op.service))
    return {"ok": True, "restarted": done, "rolling": rolling}


async def replace_instance(engine: Engine, state: Any,
                           sup: InstanceSupervisor) -> InstanceSupervisor:
    """Stop the instance (if it runs) and supervise a fresh process under its name."""
    await sup.stop()
    old = sup.record
    record = InstanceRecord(stack=old.stack, service=old.service, instance=old.instance,
                            index=old.index, revision=old.revision, ports=dict(old.ports))
    fresh = InstanceSupervisor(engine, state.stack, record)
    state.supervisors[record.instance] = fresh
    await engine.store.put_instance(record)
    fresh.start()
    return fresh


async def _wait_ready(engine: Engine, sup: InstanceSupervisor, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sup.state not in (InstanceState.READY, InstanceState.COMPLETED):
        if sup.state is InstanceState.FAILED:
            raise ShipyardError(f"{sup.name} failed after the restart: {sup.record.message}")
        if time.monotonic() > deadline:
            raise ShipyardError(f"{sup.name} not ready within {timeout:g}s after the restart")
        await engine.changed(min(deadline - time.monotonic(), 1.0))


async def scale(engine: Engine, op: OperationRecord) -> dict[str, Any]:
    """Set a service's instance count: start the missing instances (they join the router
    once ready) or drain and stop the extra ones; the others keep running. A manual scale
    suspends the service's autoscaling. Resumed after a crash, it converges the same way."""
    from shipyard.engine.deploy import stack_document
    from shipyard.engine.rollout import scale_in_place

    state = engine.stacks_state.get(op.stack)
    if state is None or op.service not in state.stack.services:
        raise NotFoundError(f"stack {op.stack} has no service {op.service}")
    assert op.service is not None
    replicas = int(op.payload["replicas"])
    manual = bool(op.payload.get("manual"))
    async with state.lock:
        svc = state.stack.services[op.service]
        if manual and svc.autoscale is not None:
            engine.autoscaler.suspended.add((op.stack, op.service))
        services = dict(state.stack.services)
        services[op.service] = svc.model_copy(update={"replicas": replicas})
        stack = state.stack.model_copy(update={"services": services})
        revision = next((r.revision for r in await engine.store.list_services(op.stack)
                         if r.name == op.service), 1)
        before = len(state.instances_of(op.service))
        added, removed = await scale_in_place(engine, state, stack, op.service, revision)
        state.stack = stack
        record = await engine.store.get_stack(op.stack)
        await engine.store.put_stack(StackRecord(op.stack, stack_document(stack),
                                                 status=record.status if record else "applied"))
        why = op.payload.get("reason") or ("manual; autoscaling suspended until "
                                           f"`shipyard autoscale {op.service} --resume`"
                                           if manual and svc.autoscale else "manual")
        await engine.record_event(Event(
            "service.scaled", f"scaled from {before} to {replicas} instance(s) "
            f"(+{added} -{removed}): {why}", stack=op.stack, service=op.service,
            data={"from": before, "to": replicas, "manual": manual}))
    fresh = [s for s in state.instances_of(op.service) if s.state not in
             (InstanceState.READY, InstanceState.COMPLETED)]
    for sup in fresh:
        await _wait_ready(engine, sup, state.stack.deploy.timeout)
    return {"ok": True, "replicas": replicas, "added": added, "removed": removed}


async def resume_autoscale(engine: Engine, op: OperationRecord) -> dict[str, Any]:
    state = engine.stacks_state.get(op.stack)
    if state is None or op.service not in state.stack.services:
        raise NotFoundError(f"stack {op.stack} has no service {op.service}")
    if state.stack.services[op.service].autoscale is None:
        raise ShipyardError(f"service {op.service} has no autoscale policy to resume")
    engine.autoscaler.suspended.discard((op.stack, op.service))
    engine.autoscaler.last_run.pop((op.stack, op.service), None)  # decide at the next tick
    await engine.record_event(Event("autoscale.resumed", "autoscaling resumed",
                                    stack=op.stack, service=op.service))
    return {"ok": True}


__all__ = ["apply", "down", "recover", "restart", "resume_autoscale", "scale", "stop_stack"]
