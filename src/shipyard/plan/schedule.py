"""The deploy scheduler: which services may be launched now, given what has happened.

A pure state machine the engine drives. The engine asks `next_to_start()`, launches those
services and calls `mark_launched`, then reports what each reaches (`mark`, `mark_failed`)
until `done`. Nothing here reads a clock or touches a process, so `simulate` can replay a
whole deploy in microseconds and tests can explore every interleaving.

Milestones a service reaches: STARTED (its processes run), HEALTHY (readiness passes, or it
runs and has no probe), COMPLETED (it ran to completion with success) or FAILED. HEALTHY
implies STARTED; COMPLETED implies both; HEALTHY does not satisfy a `completed` wait.

A launched service is *in flight* until it *settles*: it reaches its settle milestone
(`settles_on`, HEALTHY by default), COMPLETED, or FAILED. In-flight services hold the
parallelism slots.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Set
from enum import StrEnum

from shipyard.plan.graph import DependencyGraph
from shipyard.spec.models import Condition, Strategy

__all__ = ["DeployScheduler", "Milestone", "simulate"]


class Milestone(StrEnum):
    STARTED = "started"
    HEALTHY = "healthy"
    COMPLETED = "completed"
    FAILED = "failed"


_IMPLIES: dict[Milestone, frozenset[Milestone]] = {
    Milestone.STARTED: frozenset({Milestone.STARTED}),
    Milestone.HEALTHY: frozenset({Milestone.STARTED, Milestone.HEALTHY}),
    Milestone.COMPLETED: frozenset({Milestone.STARTED, Milestone.HEALTHY, Milestone.COMPLETED}),
}
_RANK = {Milestone.STARTED: 0, Milestone.HEALTHY: 1, Milestone.COMPLETED: 2}
_NEEDS = {cond: Milestone(cond.value) for cond in Condition}


class DeployScheduler:
    """Decides launch order for one deploy of `graph` under `strategy`.

    - sequential: one service at a time, in `graph.topo_order()`.
    - parallel: phase by phase; a phase opens once every service of the previous phases
      has settled; up to `max_parallel` in flight, by name.
    - hybrid: a service may launch as soon as each of its own dependencies has reached the
      milestone its edge waits for; when more are eligible than slots, the one with the
      longest remaining chain (`graph.remaining_chain(weights)`) goes first, ties by name.

    `only` is the set of services this deploy launches; the others count as already
    satisfied (unchanged and running). `settles_on` says when a launched service stops
    holding a slot; a service some dependent waits on with a stronger condition settles on
    that condition instead (a `completed` wait makes its dependency settle on COMPLETED),
    so a scheduler can never wait forever on a milestone nobody will report.
    """

    def __init__(
        self,
        graph: DependencyGraph,
        strategy: Strategy | str,
        max_parallel: int,
        weights: Mapping[str, float] | None = None,
        only: Set[str] | None = None,
        settles_on: Mapping[str, Milestone] | None = None,
    ) -> None:
        if max_parallel < 1:
            raise ValueError(f"max_parallel must be at least 1, got {max_parallel}")
        self.graph = graph
        self.strategy = Strategy(strategy)
        self.max_parallel = max_parallel
        wanted = set(graph.services) if only is None else set(only)
        unknown = sorted(wanted.difference(graph.services))
        if unknown:
            raise ValueError(f"not in the dependency graph: {', '.join(unknown)}")
        self._only = wanted
        # For each service of this deploy: the dependents it unblocks, and what they need.
        self._unblocks: dict[str, list[tuple[str, Milestone]]] = {}
        self._settle: dict[str, Milestone] = {}
        for name in wanted:
            edges = graph.dependent_edges(name)
            self._settle[name] = _settle_milestone(name, edges, settles_on)
            self._unblocks[name] = [(d, _NEEDS[c]) for d, c in edges.items() if d in wanted]

        self._reached: dict[str, set[Milestone]] = {name: set() for name in graph.services}
        self._launched: set[str] = set()
        self._in_flight: set[str] = set()
        self._settled: set[str] = set()
        self._failed: set[str] = set()
        self._skipped: set[str] = set()
        # A service is closed once it settled or was skipped: it will launch no more.
        self._closed: set[str] = set()
        self._waiting = {
            name: sum(1 for dep in graph.dependencies(name) if dep in wanted) for name in wanted
        }

        self._phase_of = {name: graph.phase_of(name) for name in wanted}
        self._phase_open = [0] * len(graph.phases())
        for name in wanted:
            self._phase_open[self._phase_of[name]] += 1
        self._phase = 0
        self._advance_phase()

        if self.strategy is Strategy.HYBRID:
            given = weights or {}
            chain = graph.remaining_chain(
                {n: (float(given.get(n, 1.0)) if n in wanted else 0.0) for n in graph.services}
            )
            self._priority = {name: -chain[name] for name in wanted}
        else:
            order = graph.topo_order()
            self._priority = {name: float(i) for i, name in enumerate(order) if name in wanted}
        self._ready: list[tuple[float, str]] = [
            (self._priority[name], name) for name, count in self._waiting.items() if count == 0
        ]
        heapq.heapify(self._ready)

    # -- what to do next -------------------------------------------------------------------

    def next_to_start(self) -> list[str]:
        """The services to launch now, best first. Asking twice without marking anything
        gives the same answer; the engine calls `mark_launched` for each one it launches."""
        limit = 1 if self.strategy is Strategy.SEQUENTIAL else self.max_parallel
        slots = limit - len(self._in_flight)
        chosen: list[tuple[float, str]] = []
        while self._ready and len(chosen) < slots:
            entry = self._ready[0]
            name = entry[1]
            if not self._startable(name):
                heapq.heappop(self._ready)  # launched, skipped or failed since it was queued
                continue
            if self.strategy is Strategy.PARALLEL and self._phase_of[name] != self._phase:
                break
            chosen.append(heapq.heappop(self._ready))
        for entry in chosen:
            heapq.heappush(self._ready, entry)
        return [name for _, name in chosen]

    @property
    def done(self) -> bool:
        """Nothing is in flight and nothing is left that could start."""
        return not self._in_flight and not self.next_to_start()

    # -- what happened ---------------------------------------------------------------------

    def mark_launched(self, name: str) -> None:
        """The engine launched `name`; it holds a slot until it settles."""
        if name not in self._only:
            raise ValueError(f"{name!r} is not one of the services this deploy launches")
        if name in self._launched or name in self._closed:
            raise ValueError(f"{name!r} was already launched, skipped or failed")
        if self._waiting[name]:
            raise ValueError(f"{name!r} cannot launch yet: its dependencies are not ready")
        self._launched.add(name)
        self._in_flight.add(name)

    def mark(self, name: str, milestone: Milestone | str) -> None:
        """`name` reached `milestone` (and every milestone it implies). Idempotent; marks
        after a failure are ignored. Marking a service not yet launched counts as its
        launch (the engine found it running)."""
        if not isinstance(milestone, Milestone):
            milestone = Milestone(milestone)
        if milestone is Milestone.FAILED:
            self.mark_failed(name)
            return
        reached = self._node(name)
        if name in self._failed:
            return
        if name in self._skipped:
            raise ValueError(f"{name!r} was skipped; it cannot reach {milestone}")
        if name in self._only and name not in self._launched:
            self._launched.add(name)
            self._in_flight.add(name)
        new = _IMPLIES[milestone] - reached
        if not new:
            return
        reached |= new
        if name not in self._only:
            return
        for dependent, need in self._unblocks[name]:
            if need in new:
                self._waiting[dependent] -= 1
                if self._waiting[dependent] == 0 and self._startable(dependent):
                    heapq.heappush(self._ready, (self._priority[dependent], dependent))
        if name in self._in_flight and (
            self._settle[name] in reached or Milestone.COMPLETED in reached
        ):
            self._in_flight.discard(name)
            self._settled.add(name)
            self._close(name)

    def mark_failed(self, name: str) -> set[str]:
        """`name` failed. Returns the services that now can never start: its transitive
        dependents this deploy launches that were not launched yet. They become skipped."""
        self._node(name)
        if name in self._failed:
            return set()
        if name in self._skipped:
            raise ValueError(f"{name!r} was skipped; it cannot fail")
        self._failed.add(name)
        self._in_flight.discard(name)
        if name in self._only:
            self._settled.add(name)
            self._close(name)
        doomed = {
            d for d in self.graph.downstream(name)
            if d in self._only and d not in self._launched and d not in self._closed
        }
        self._skipped |= doomed
        for dependent in doomed:
            self._close(dependent)
        return doomed

    # -- read-only views -------------------------------------------------------------------

    @property
    def launched(self) -> Set[str]:
        return self._launched

    @property
    def in_flight(self) -> Set[str]:
        return self._in_flight

    @property
    def settled(self) -> Set[str]:
        """Launched services that settled (failed ones included)."""
        return self._settled

    @property
    def failed(self) -> Set[str]:
        return self._failed

    @property
    def skipped(self) -> Set[str]:
        """Services never launched because something they depend on failed."""
        return self._skipped

    @property
    def pending(self) -> set[str]:
        """Services of this deploy neither launched nor skipped yet."""
        return self._only - self._launched - self._closed

    def reached(self, name: str) -> frozenset[Milestone]:
        return frozenset(self._node(name))

    def settles_on(self, name: str) -> Milestone:
        """The milestone at which `name` stops holding a slot."""
        if name not in self._settle:
            raise KeyError(f"{name!r} is not one of the services this deploy launches")
        return self._settle[name]

    # -- helpers ---------------------------------------------------------------------------

    def _startable(self, name: str) -> bool:
        return name not in self._launched and name not in self._closed

    def _close(self, name: str) -> None:
        if name in self._closed:
            return
        self._closed.add(name)
        self._phase_open[self._phase_of[name]] -= 1
        self._advance_phase()

    def _advance_phase(self) -> None:
        while self._phase < len(self._phase_open) and self._phase_open[self._phase] == 0:
            self._phase += 1

    def _node(self, name: str) -> set[Milestone]:
        try:
            return self._reached[name]
        except KeyError:
            raise KeyError(f"no service {name!r} in the dependency graph") from None


def _settle_milestone(
    name: str, dependents: Mapping[str, Condition], settles_on: Mapping[str, Milestone] | None,
) -> Milestone:
    settle = Milestone((settles_on or {}).get(name, Milestone.HEALTHY))
    if settle is Milestone.FAILED:
        raise ValueError(f"{name!r} cannot settle on {settle}")
    for cond in dependents.values():
        if _RANK[_NEEDS[cond]] > _RANK[settle]:
            settle = _NEEDS[cond]
    return settle


def simulate(
    graph: DependencyGraph,
    strategy: Strategy | str,
    max_parallel: int,
    durations: Mapping[str, float],
    *,
    settles_on: Mapping[str, Milestone] | None = None,
) -> float:
    """The makespan of a deploy where each service reaches STARTED when launched and
    settles `durations[s]` later (1 for a service not named). With hybrid, enough slots and
    no `started` waits, this is exactly `graph.longest_chain(durations)[0]`."""
    sched = DeployScheduler(graph, strategy, max_parallel, weights=durations,
                            settles_on=settles_on)
    now = 0.0
    finishing: list[tuple[float, str]] = []
    while True:
        batch = sched.next_to_start()
        while batch:
            for name in batch:
                sched.mark_launched(name)
                sched.mark(name, Milestone.STARTED)
                heapq.heappush(finishing, (now + float(durations.get(name, 1.0)), name))
            batch = sched.next_to_start()
        if not finishing:
            break
        now = finishing[0][0]
        while finishing and finishing[0][0] == now:
            _, name = heapq.heappop(finishing)
            sched.mark(name, sched.settles_on(name))
    if sched.pending:
        raise RuntimeError(f"simulation stalled with {sorted(sched.pending)} never started")
    return now
