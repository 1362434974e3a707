"""Checks made before a deploy starts anything: the graph, what changed, whether it fits
(resources with overcommit, fixed ports), and whether each command can run at all.
Every problem is collected and reported at once; nothing is started or recorded."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shipyard.engine.environment import instance_workdir
from shipyard.engine.results import PlanReport, ServiceChange
from shipyard.errors import PlanError, ResourceError
from shipyard.plan.diff import Change, diff_stack
from shipyard.plan.graph import DependencyGraph
from shipyard.plan.rollout import describe_update
from shipyard.resources.capacity import HostCapacity, check_fit, detect_host_capacity
from shipyard.resources.cpusets import share_for, stack_cpuset_problems
from shipyard.resources.ports import find_port_holder, port_is_free
from shipyard.spec.models import Stack

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine

_host_capacity: HostCapacity | None = None


@dataclass
class Checked:
    stack: Stack
    graph: DependencyGraph
    changes: list[Change]
    previous: Stack | None  # the stack as last applied, for rollback
    report: PlanReport


def host_capacity() -> HostCapacity:
    global _host_capacity
    if _host_capacity is None:
        _host_capacity = detect_host_capacity()
    return _host_capacity


async def preflight(engine: Engine, stack: Stack) -> Checked:
    stack = engine.autoscaler.override(stack)  # applying the file keeps autoscaled counts
    graph = DependencyGraph.from_stack(stack)  # PlanError: cycle, missing dependency
    problems: list[str] = []
    previous_rec = await engine.store.get_stack(stack.name)
    previous = Stack.model_validate(previous_rec.spec) if previous_rec else None
    recorded: dict[str, dict[str, Any]] = {}
    for svc_rec in await engine.store.list_services(stack.name):
        rev = await engine.store.get_revision(stack.name, svc_rec.name, svc_rec.revision)
        if rev is not None:
            recorded[svc_rec.name] = rev.spec
    changes = diff_stack(stack, recorded)
    problems += _command_problems(stack)
    problems += _fit_problems(engine, stack)
    problems += _port_problems(engine, stack)
    if problems:
        resource_only = all(p.startswith(("port", "not enough")) for p in problems)
        raise (ResourceError if resource_only else PlanError)("\n".join(problems))
    report = PlanReport(
        stack=stack.name, strategy=stack.deploy.strategy.value,
        max_parallel=stack.deploy.max_parallel, phases=graph.phases(),
        changes=[ServiceChange(c.service, c.action, list(c.fields),
                               describe_update(c.action, stack.services.get(c.service),
                                               c.fields)) for c in changes],
    )
    return Checked(stack, graph, changes, previous, report)


def _command_problems(stack: Stack) -> list[str]:
    out = []
    for name, svc in stack.services.items():
        if svc.command is None or svc.image is not None:  # a container's command runs in it
            continue
        workdir = Path(instance_workdir(stack, svc))
        if not workdir.is_dir():
            out.append(f"service {name}: workdir {workdir} does not exist")
            continue
        program = "/bin/sh" if svc.shell else svc.command[0]
        if "$" in program:
            continue  # resolved per instance; the runtime checks it at launch
        path = os.environ.get("PATH", os.defpath)
        if "/" in program:
            target = (workdir / program) if not os.path.isabs(program) else Path(program)
            if not target.exists():
                out.append(f"service {name}: command {program!r} not found")
            elif not os.access(target, os.X_OK) or target.is_dir():
                out.append(f"service {name}: command {program!r} is not executable")
        elif shutil.which(program, path=svc.env.get("PATH", path)) is None:
            out.append(f"service {name}: command {program!r} not found on PATH")
    return out


def _fit_problems(engine: Engine, stack: Stack) -> list[str]:
    others = [st.stack for name, st in engine.stacks_state.items() if name != stack.name]
    shortfalls = check_fit(stack, host_capacity(), others=others)
    problems = [f"not enough {s.describe()}" for s in shortfalls]
    pinned = [(n, s.resources.cpuset, s.resources.cpu, s.replicas)
              for n, s in stack.services.items() if s.resources.cpuset]
    if pinned:  # the host's topology is read only for stacks that pin
        problems += stack_cpuset_problems(pinned, engine.local.cpusets.topology,
                                          share_for(stack.capacity.overcommit.cpu))
    return problems


def _port_problems(engine: Engine, stack: Stack) -> list[str]:
    out = []
    state = engine.stacks_state.get(stack.name)
    own: dict[int, str] = {}  # fixed ports this stack's instances hold already
    if state is not None:
        for sup in state.supervisors.values():
            for port in sup.record.ports.values():
                own[port] = sup.record.service
    seen: dict[int, str] = {}
    for name, svc in stack.services.items():
        if svc.expose is not None:
            router = engine.routers.router(stack.name, name)
            if svc.expose in seen:
                out.append(f"port {svc.expose} is declared by both {seen[svc.expose]} and "
                           f"{name} (expose)")
            elif not (router is not None and router.port == svc.expose) and not port_is_free(
                    svc.expose):
                who = ("the router of another service" if engine.routers.owns(svc.expose)
                       else find_port_holder(svc.expose) or "another process")
                out.append(f"port {svc.expose} ({name}.expose) is already in use by {who}")
            seen[svc.expose] = f"{name} (expose)"
        for port_name, port in svc.ports.items():
            if port == "auto":
                continue
            assert isinstance(port, int)
            if port in seen:
                out.append(f"port {port} is declared by both {seen[port]} and {name}")
                continue
            seen[port] = name
            if own.get(port) == name or port_is_free(port):
                continue
            holder = own.get(port)
            who = (f"service {holder} of this stack" if holder
                   else find_port_holder(port) or "another process")
            out.append(f"port {port} ({name}.{port_name}) is already in use by {who}")
    return out
