"""A control plane's start: resume every stack from the store, re-adopting the instances
that still run (matched by pid and process start time) and restarting those that died
while no control plane watched them. Then the heap it starts with is frozen out of the
garbage collector's full passes (`freeze_heap`).

Re-adopted instances keep the cgroup recorded in their `Handle.cgroup`: the directories
made for them (on cgroup v1 only the hierarchies they needed, runtime/cgroups.py), which
is all `kill_cgroup` and the runtime's stop need to find and empty them."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

from shipyard.engine.instance import TERMINAL, InstanceSupervisor
from shipyard.engine.rollout_traffic import schedule_retirement
from shipyard.plan.graph import DependencyGraph
from shipyard.runtime.base import Handle
from shipyard.spec.models import Stack
from shipyard.state.base import InstanceRecord, InstanceState

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine


async def recover(engine: Engine) -> None:
    """Resume from the store: re-adopt what still runs, restart what died meanwhile."""
    from shipyard.engine.engine import StackState

    for rec in await engine.store.list_stacks():
        if rec.status == "placed":  # run by node agents (agent/scheduler.py), not here
            continue
        stack = Stack.model_validate(rec.spec)
        state = StackState(stack, DependencyGraph.from_stack(stack))
        engine.stacks_state[stack.name] = state
        ports = engine.ports_for(stack)
        await engine.routers.ensure(stack)
        for inst in await engine.store.list_instances(stack=stack.name):
            sup = InstanceSupervisor(engine, stack, inst)
            if inst.service not in stack.services:
                await kill_recorded(engine, inst)
                await engine.store.delete_instance(stack.name, inst.instance)
                continue
            for port in inst.ports.values():
                ports.reserve(port, f"{stack.name}/{inst.instance}")
            state.supervisors[inst.instance] = sup
            if inst.state in TERMINAL:
                continue
            handle = handle_of(inst)
            if handle is not None and engine.runtime.adopt(handle):
                engine.local.adopt(stack, stack.services[inst.service], inst.instance,
                                   inst.runtime)
                sup.start(adopt=handle)
            else:
                await kill_recorded(engine, inst)
                sup.start(restarted=inst.state.alive or inst.state is InstanceState.BACKOFF)
        if rec.status != "deploying":
            # a previous blue-green set kept when the control plane went down: which
            # side served is not known any more, so the current spec serves now
            for service, svc in stack.services.items():
                if svc.update.strategy.value in ("blue-green", "canary") \
                        and len(state.instances_of(service)) > svc.replicas:
                    schedule_retirement(engine, state, service, 0.0)
    freeze_heap()


_frozen = False


def freeze_heap() -> None:
    """Once per process: collect, then move every object alive now (the modules and
    classes imported, the pydantic schemas, the recovered stacks) to the collector's
    permanent generation. A full collection then walks only what was made since, not
    the ~40,000 objects of the imports: one stopped the loop for 6-9 ms on a quiet
    machine (30 ms on a busy one; one landed in the middle of a 100-instance `down`),
    now well under 1 ms. Only once, so that a process making many engines (tests) never
    freezes the garbage of the previous ones."""
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.collect()
    gc.freeze()


async def kill_recorded(engine: Engine, inst: InstanceRecord) -> None:
    """Empty the cgroup of a recorded instance whose process is gone (grandchildren may
    still hold it)."""
    if inst.cgroup:
        await engine.runtime.kill_cgroup(inst.cgroup)


def handle_of(inst: InstanceRecord) -> Handle | None:
    """The runtime handle a recorded instance had (None: it never ran)."""
    if inst.pid is None or inst.proc_start is None:
        return None
    return Handle(instance=inst.instance, pid=inst.pid, pgid=inst.pgid or inst.pid,
                  proc_start=inst.proc_start, cgroup=inst.cgroup, extra=dict(inst.runtime))
