"""Checks across fields and services that no single field validator can make.

They run on every service that validated on its own, even when other parts of the file
are broken, so one `shipyard validate` reports everything at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shipyard.spec.issues import did_you_mean
from shipyard.spec.models import Condition, Probe, RestartMode, Service
from shipyard.spec.yamldoc import Path

Found = tuple[Path, str]  # where (document path) and what


def cross_check(services: Mapping[str, Service], raw_services: Mapping[str, Any]) -> list[Found]:
    """Problems between fields of `services` (validated), located in `raw_services`."""
    names = [str(name) for name in raw_services]
    found: list[Found] = []
    for name, service in services.items():
        found += _dependencies(name, service, services, names, raw_services.get(name))
        found += _probes(name, service)
        found += _update(name, service)
    found += _fixed_ports(services)
    found += _cycles(services, raw_services)
    return found


def _update(name: str, service: Service) -> list[Found]:
    """Blue-green and canary run two revisions side by side behind the router."""
    strategy = service.update.strategy.value
    if strategy not in ("blue-green", "canary"):
        return []
    where = ("services", name, "update", "strategy")
    if service.expose is None:
        return [(where, f"{strategy} needs `expose: PORT`: it shifts traffic between "
                        "revisions on the service's router")]
    fixed = [port for port, value in service.ports.items() if value != "auto"]
    if fixed:
        return [(where, f"{strategy} runs two revisions at once, which a fixed port "
                        f"({', '.join(fixed)}) cannot; use `auto` ports behind `expose`")]
    if not service.ports:
        return [(where, f"{strategy} needs a port for the router to reach the instances")]
    return []


def dependency_path(service: str, dep: str, raw: Any) -> Path:
    """Where `dep` is written in the service's depends_on (mapping key or list item)."""
    deps = raw.get("depends_on") if isinstance(raw, dict) else None
    if isinstance(deps, list) and dep in deps:
        return ("services", service, "depends_on", deps.index(dep))
    return ("services", service, "depends_on", dep)


def _dependencies(
    name: str, service: Service, services: Mapping[str, Service], names: list[str], raw: Any
) -> list[Found]:
    found: list[Found] = []
    for dep, condition in service.conditions.items():
        where = dependency_path(name, dep, raw)
        if dep == name:
            found.append((where, f"service '{name}' cannot depend on itself"))
        elif dep not in names:
            others = [n for n in names if n != name]
            found.append(
                (where, f"'{dep}' is not a service in this stack" + did_you_mean(dep, others))
            )
        elif (
            condition == Condition.COMPLETED
            and dep in services
            and services[dep].restart.policy == RestartMode.ALWAYS
        ):
            found.append(
                (
                    where,
                    f"waits for '{dep}' to complete, but '{dep}' has restart: always and "
                    "never completes (use healthy or started, or change its restart policy)",
                )
            )
    return found


def _probes(name: str, service: Service) -> list[Found]:
    found: list[Found] = []
    declared = list(service.ports)
    for kind in ("readiness", "liveness"):
        probe: Probe | None = getattr(service.health, kind)
        if probe is None:
            continue
        base: Path = ("services", name, "health", kind)
        for field in ("tcp", "port"):
            ref = getattr(probe, field)
            if isinstance(ref, str) and ref not in declared:
                if declared:
                    message = (
                        f"port '{ref}' is not one of the service's ports "
                        f"({', '.join(declared)})" + did_you_mean(ref, declared)
                    )
                else:
                    message = (
                        f"port '{ref}' is not declared: the service has no ports "
                        "(add one under ports, e.g. {http: auto}, or give a number)"
                    )
                found.append(((*base, field), message))
        if probe.http is not None and probe.port is None and not declared:
            found.append(
                (
                    base,
                    "an http probe needs a port: declare one under the service's ports "
                    "or set port to a number",
                )
            )
    return found


def _fixed_ports(services: Mapping[str, Service]) -> list[Found]:
    found: list[Found] = []
    owner: dict[int, str] = {}
    for name, service in services.items():
        for port_name, port in service.ports.items():
            if port == "auto":
                continue
            where: Path = ("services", name, "ports", port_name)
            dotted = f"services.{name}.ports.{port_name}"
            if port in owner:
                found.append((where, f"port {port} is already used by {owner[port]}"))
            else:
                owner[port] = dotted
            if service.replicas > 1:
                found.append(
                    (
                        where,
                        f"{service.replicas} replicas cannot all listen on fixed port {port}; "
                        "use auto",
                    )
                )
    return found


def _cycles(services: Mapping[str, Service], raw_services: Mapping[str, Any]) -> list[Found]:
    """One problem per dependency cycle, at the edge that closes it."""
    found: list[Found] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in services:
        if root in state:
            continue
        state[root] = 1
        trail = [root]
        pending = [iter(services[root].depends_on)]  # iterative: chains may be long
        while pending:
            name = trail[-1]
            dep = next(pending[-1], None)
            if dep is None:
                state[trail.pop()] = 2
                pending.pop()
            elif dep == name or dep not in services:
                continue  # reported by _dependencies
            elif state.get(dep) == 1:
                cycle = [*trail[trail.index(dep) :], dep]
                where = dependency_path(name, dep, raw_services.get(name))
                found.append((where, "dependency cycle: " + " → ".join(cycle)))
            elif dep not in state:
                state[dep] = 1
                trail.append(dep)
                pending.append(iter(services[dep].depends_on))
    return found
