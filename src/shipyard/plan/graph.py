"""The dependency graph of a stack: who waits for whom, in which phases, along which chain.

Built once per plan and immutable afterwards. Construction refuses a graph that cannot be
deployed (a dependency that does not exist, a cycle) with a `PlanError` that names the
services involved, so every later step can assume a valid DAG.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from shipyard.errors import PlanError
from shipyard.spec.models import Condition, Stack

__all__ = ["DependencyGraph"]


class DependencyGraph:
    """A DAG of services; an edge `api -> db` means api depends on db."""

    __slots__ = ("_dependents", "_deps", "_phase_of", "_phases", "_services")

    def __init__(self, edges: Mapping[str, Mapping[str, Condition | str]]) -> None:
        deps: dict[str, dict[str, Condition]] = {
            name: {dep: Condition(cond) for dep, cond in needs.items()}
            for name, needs in edges.items()
        }
        _refuse_missing(deps)
        dependents: dict[str, dict[str, Condition]] = {name: {} for name in deps}
        for name, needs in deps.items():
            for dep, cond in needs.items():
                dependents[dep][name] = cond
        phases = _levels(deps, dependents)
        placed = sum(len(level) for level in phases)
        if placed != len(deps):
            cycle = _find_cycle(deps, {n for level in phases for n in level})
            raise PlanError(
                "dependency cycle: " + " -> ".join(cycle),
                hint="remove one of these depends_on entries",
            )
        self._deps = deps
        self._dependents = dependents
        self._services = sorted(deps)
        self._phases = phases
        self._phase_of = {name: i for i, level in enumerate(phases) for name in level}

    @classmethod
    def from_stack(cls, stack: Stack) -> DependencyGraph:
        return cls({name: svc.conditions for name, svc in stack.services.items()})

    # -- structure -------------------------------------------------------------------------

    @property
    def services(self) -> list[str]:
        """Every service, sorted by name."""
        return list(self._services)

    def __contains__(self, name: object) -> bool:
        return name in self._deps

    def __len__(self) -> int:
        return len(self._deps)

    def dependencies(self, name: str) -> dict[str, Condition]:
        """What `name` waits for, and the condition of each wait."""
        return dict(self._node(name))

    def dependents(self, name: str) -> set[str]:
        """The services that depend on `name` directly."""
        self._node(name)
        return set(self._dependents[name])

    def dependent_edges(self, name: str) -> dict[str, Condition]:
        """The direct dependents of `name`, each with the condition it waits for."""
        self._node(name)
        return dict(self._dependents[name])

    def downstream(self, name: str) -> set[str]:
        """Every service that depends on `name`, directly or transitively (not `name`)."""
        self._node(name)
        return _reach(name, self._dependents)

    def upstream(self, name: str) -> set[str]:
        """Every service `name` depends on, directly or transitively (not `name`)."""
        self._node(name)
        return _reach(name, self._deps)

    # -- orderings -------------------------------------------------------------------------

    def phases(self) -> list[list[str]]:
        """Topological levels: level 0 has no dependencies, level k depends only on levels
        below k and on at least one service of level k-1. Names are sorted in a level."""
        return [list(level) for level in self._phases]

    def phase_of(self, name: str) -> int:
        self._node(name)
        return self._phase_of[name]

    def topo_order(self) -> list[str]:
        """Dependencies before dependents: the phases one after the other."""
        return [name for level in self._phases for name in level]

    def reverse_order(self) -> list[str]:
        """The order to stop in: dependents before their dependencies."""
        return [name for level in reversed(self._phases) for name in level]

    # -- chains ----------------------------------------------------------------------------

    def longest_chain(self, weights: Mapping[str, float] | None = None) -> tuple[float, list[str]]:
        """The critical path: the dependency chain with the largest sum of node weights
        (weight 1 for a service `weights` does not name), listed dependencies first.

        Sums are accumulated from the roots, in the order a deploy accumulates time, so the
        length equals a simulated makespan exactly rather than up to rounding."""
        weight = self._weights(weights)
        finish: dict[str, float] = {}
        for name in self.topo_order():
            finish[name] = max((finish[d] for d in self._deps[name]), default=0.0) + weight[name]
        if not finish:
            return 0.0, []
        end = min(finish, key=lambda n: (-finish[n], n))
        path = [end]
        while self._deps[path[-1]]:
            needs = self._deps[path[-1]]
            path.append(min(needs, key=lambda n: (-finish[n], n)))
        path.reverse()
        return finish[end], path

    def remaining_chain(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """For each service: its weight plus the longest chain of its transitive dependents.
        The deploy-time priority of a service: how much still waits behind it."""
        weight = self._weights(weights)
        remaining: dict[str, float] = {}
        for name in self.reverse_order():
            after = max((remaining[d] for d in self._dependents[name]), default=0.0)
            remaining[name] = weight[name] + after
        return remaining

    # -- helpers ---------------------------------------------------------------------------

    def _node(self, name: str) -> dict[str, Condition]:
        try:
            return self._deps[name]
        except KeyError:
            raise KeyError(f"no service {name!r} in the dependency graph") from None

    def _weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        given = weights or {}
        out = {name: float(given.get(name, 1.0)) for name in self._services}
        negative = sorted(name for name, w in out.items() if not w >= 0)
        if negative:
            raise ValueError(f"weights must be non-negative numbers: {', '.join(negative)}")
        return out

    def __repr__(self) -> str:
        edges = sum(len(d) for d in self._deps.values())
        return f"DependencyGraph({len(self._deps)} services, {edges} edges)"


def _refuse_missing(deps: Mapping[str, Mapping[str, Condition]]) -> None:
    problems = []
    names = sorted(deps)
    for name in names:
        for dep in sorted(deps[name]):
            if dep in deps:
                continue
            close = difflib.get_close_matches(dep, names, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"service {name!r} depends on {dep!r}, which is not in the stack{guess}"
            )
    if problems:
        raise PlanError("\n".join(problems))


def _levels(
    deps: Mapping[str, Mapping[str, Condition]], dependents: Mapping[str, Mapping[str, Condition]]
) -> list[list[str]]:
    """Kahn's algorithm by levels; services on or behind a cycle are left out."""
    waiting = {name: len(needs) for name, needs in deps.items()}
    level = sorted(name for name, count in waiting.items() if count == 0)
    levels: list[list[str]] = []
    while level:
        levels.append(level)
        following = []
        for name in level:
            for dependent in dependents[name]:
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    following.append(dependent)
        level = sorted(following)
    return levels


def _find_cycle(deps: Mapping[str, Mapping[str, Condition]], placed: set[str]) -> list[str]:
    """A cycle among the services Kahn's algorithm could not place, as a closed path.

    Each unplaced service waits on at least one other unplaced service, so walking such
    waits from any of them must come back to a service already on the walk."""
    unplaced = {name for name in deps if name not in placed}
    walk: list[str] = []
    seen: dict[str, int] = {}
    name = min(unplaced)
    while name not in seen:
        seen[name] = len(walk)
        walk.append(name)
        name = min(dep for dep in deps[name] if dep in unplaced)
    cycle = walk[seen[name]:]
    start = cycle.index(min(cycle))
    cycle = cycle[start:] + cycle[:start]
    return [*cycle, cycle[0]]


def _reach(start: str, edges: Mapping[str, Mapping[str, Condition]]) -> set[str]:
    seen: set[str] = set()
    stack = list(edges[start])
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(edges[name])
    return seen
