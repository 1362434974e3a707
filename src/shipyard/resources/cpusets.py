"""CPU pinning: which CPUs an instance with `resources.cpuset` runs on.

`cpuset: auto` gets whole physical cores (every SMT sibling of each core it is given), from
one NUMA node whenever one node has enough free cores, and the memory nodes that go with
them. How many cores: `resources.cpu` counted in CPUs and rounded up to whole cores
(`cores_for`), at least one.

Sharing. A core given to an `auto` instance is its own: no other `auto` instance gets it,
unless the stack's `capacity.overcommit.cpu` is 2 or more, in which case up to
floor(overcommit.cpu) instances may be pinned to the same core (the allocator's
`max_share`). The default overcommit, 1.5, keeps cores exclusive: overcommit is about
reservations that are not all used at once, and a pinned instance is meant to have its
cores. Among the cores it may use, the allocator always prefers the least shared.

An explicit list ("0-3,6") is what the user asked for: it is checked against the CPUs the
host has online (`check_explicit`), then recorded (`reserve`) so that `auto` instances
avoid those cores when they can; it is never refused for overlapping another instance.

Pinning says where an instance may run, not that nothing else runs there: instances
without a cpuset (and the rest of the host) may still use pinned cores.

The allocator is pure bookkeeping over a `Topology` (no I/O) and not thread-safe; it
belongs to the engine's event loop, like `PortAllocator`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from shipyard.errors import ResourceError
from shipyard.resources.topology import Core, Topology, format_cpulist, parse_cpulist

AUTO = "auto"


@dataclass(frozen=True)
class CpuAssignment:
    """Where one instance runs: `cpus` as a set and in the kernel's notation, and the
    memory nodes (`mems`) to allocate from; `nodes` are the NUMA nodes of the cpus."""

    cpus: frozenset[int]
    cpuset: str
    mems: str
    nodes: tuple[int, ...]
    cores: tuple[int, ...]  # the ids of the cores given (empty for an explicit list)


def share_for(overcommit_cpu: float) -> int:
    """How many pinned instances may share a core: floor(overcommit.cpu), at least 1."""
    return max(1, math.floor(overcommit_cpu + 1e-9))


def cores_for(cpu: float, topology: Topology) -> int:
    """Whole cores for a request of `cpu` CPUs: ceil(cpu) CPUs divided by the CPUs per
    core, rounded up; at least 1. On parts whose cores differ (hybrid CPUs) the smallest
    core counts, so an instance never gets fewer CPUs than it asked for."""
    wanted = max(1, math.ceil(cpu - 1e-9))
    return max(1, math.ceil(wanted / max(1, topology.threads_per_core)))


def check_explicit(cpuset: str, topology: Topology) -> frozenset[int]:
    """The CPUs of an explicit list, or ResourceError naming those that are not online
    (or that this control plane may not use)."""
    try:
        cpus = parse_cpulist(cpuset)
    except ValueError as exc:
        raise ResourceError(str(exc)) from None
    if not cpus:
        raise ResourceError(f"cpuset {cpuset!r} names no CPU")
    missing = cpus - topology.online
    if missing:
        raise ResourceError(
            f"cpuset {cpuset} names CPU(s) {format_cpulist(missing)} that are not online "
            f"here (online: {format_cpulist(topology.online) or 'none'})",
            hint="use CPUs from the online list, or `cpuset: auto`")
    return cpus


class CpusetAllocator:
    """Hands out whole cores of `topology` to owners (an owner is an instance,
    "demo/api-1"); see the module docstring for the rules."""

    def __init__(self, topology: Topology, *, max_share: int = 1) -> None:
        if max_share < 1:
            raise ValueError("max_share must be at least 1")
        self.topology = topology
        self.max_share = max_share
        self._holders: dict[int, set[str]] = {c.id: set() for c in topology.cores}
        self._core_of = {cpu: c.id for c in topology.cores for cpu in c.cpus}
        self._held: dict[str, CpuAssignment] = {}

    @classmethod
    def for_overcommit(cls, topology: Topology, overcommit_cpu: float) -> CpusetAllocator:
        """An allocator whose cores may be shared by floor(overcommit.cpu) instances."""
        return cls(topology, max_share=share_for(overcommit_cpu))

    # -- queries ----------------------------------------------------------------------
    def assignment(self, owner: str) -> CpuAssignment | None:
        return self._held.get(owner)

    def holders(self, core: int) -> frozenset[str]:
        return frozenset(self._holders.get(core, ()))

    @property
    def owners(self) -> list[str]:
        return list(self._held)

    def free_cores(self) -> list[Core]:
        """The cores nobody is pinned to."""
        return [c for c in self.topology.cores if not self._holders[c.id]]

    # -- changes ----------------------------------------------------------------------
    def allocate(self, owner: str, cores: int, *, max_share: int | None = None
                 ) -> CpuAssignment:
        """`cores` whole cores for `owner` (replacing what it held), or ResourceError
        saying what is free and who holds the rest. A failed allocation changes nothing.
        `max_share` overrides the allocator's for this request (stacks sharing a host
        may have different overcommits: `share_for(overcommit.cpu)`)."""
        if cores < 1:
            raise ValueError(f"{owner}: a cpuset needs at least one core, not {cores}")
        previous = self._held.get(owner)
        if previous is not None:
            self._forget(owner, previous)
        try:
            chosen = self._choose(owner, cores, max_share or self.max_share)
        except ResourceError:
            if previous is not None:
                self._record(owner, previous)
            raise
        cpus = frozenset(cpu for core in chosen for cpu in core.cpus)
        nodes = tuple(sorted({core.node for core in chosen}))
        result = CpuAssignment(cpus, format_cpulist(cpus), self.topology.mems_for(cpus),
                               nodes, tuple(core.id for core in chosen))
        self._record(owner, result)
        return result

    def allocate_cpu(self, owner: str, cpu: float, *, max_share: int | None = None
                     ) -> CpuAssignment:
        """`allocate` sized from a `resources.cpu` request (see `cores_for`)."""
        return self.allocate(owner, cores_for(cpu, self.topology), max_share=max_share)

    def reserve(self, owner: str, cpuset: str) -> CpuAssignment:
        """Record an explicit list for `owner` (or an assignment re-read for an adopted
        instance). Checked against the online CPUs, never refused for overlap."""
        cpus = check_explicit(cpuset, self.topology)
        previous = self._held.get(owner)
        if previous is not None:
            self._forget(owner, previous)
        nodes = tuple(sorted({n for c in cpus if (n := self.topology.node_of(c)) is not None}))
        touched = tuple(sorted({self._core_of[c] for c in cpus if c in self._core_of}))
        result = CpuAssignment(cpus, format_cpulist(cpus), self.topology.mems_for(cpus),
                               nodes, touched)
        self._record(owner, result)
        return result

    def release(self, owner: str) -> CpuAssignment | None:
        """Give back what `owner` holds; what that was, or None."""
        held = self._held.pop(owner, None)
        if held is not None:
            for core in held.cores:
                self._holders.get(core, set()).discard(owner)
        return held

    # -- internals --------------------------------------------------------------------
    def _record(self, owner: str, assignment: CpuAssignment) -> None:
        self._held[owner] = assignment
        for core in assignment.cores:
            self._holders.setdefault(core, set()).add(owner)

    def _forget(self, owner: str, assignment: CpuAssignment) -> None:
        del self._held[owner]
        for core in assignment.cores:
            self._holders.get(core, set()).discard(owner)

    def _usable(self, max_share: int) -> list[Core]:
        """Cores that may take one more holder, least shared first, then by id."""
        return sorted((c for c in self.topology.cores
                       if len(self._holders[c.id]) < max_share),
                      key=lambda c: (len(self._holders[c.id]), c.id))

    def _choose(self, owner: str, count: int, max_share: int) -> list[Core]:
        usable = self._usable(max_share)
        by_node: dict[int, list[Core]] = {}
        for core in usable:
            by_node.setdefault(core.node, []).append(core)
        load = {c.id: len(self._holders[c.id]) for c in usable}
        # One node when possible: the least shared set of cores, then the node with the
        # fewest usable cores left (best fit: big free nodes stay whole), then the lowest.
        fitting = [(sum(load[c.id] for c in cores[:count]), len(cores), node)
                   for node, cores in by_node.items() if len(cores) >= count]
        if fitting:
            _, _, node = min(fitting)
            return sorted(by_node[node][:count], key=lambda c: c.id)
        if len(usable) < count:
            raise self._shortage(owner, count, len(usable), max_share)
        # Spread over as few nodes as possible: the nodes with most usable cores first.
        chosen: list[Core] = []
        for node in sorted(by_node, key=lambda n: (-len(by_node[n]), n)):
            chosen += by_node[node][:count - len(chosen)]
            if len(chosen) == count:
                break
        return sorted(chosen, key=lambda c: c.id)

    def _shortage(self, owner: str, count: int, usable: int,
                  max_share: int) -> ResourceError:
        total = len(self.topology.cores)
        held: dict[str, list[int]] = {}
        for core in self.topology.cores:
            for holder in sorted(self._holders[core.id]):
                held.setdefault(holder, []).append(core.id)
        who = ", ".join(f"{h} (core {_ids(ids)})" for h, ids in sorted(held.items()))
        share = ("" if max_share == 1
                 else f" (each core may be shared by {max_share} instances)")
        if count > total:
            message = (f"{owner} needs {count} whole cores for its cpuset but this host has "
                       f"{total} usable")
        else:
            message = (f"{owner} needs {count} whole core{'s' * (count > 1)} for its cpuset"
                       f" but only {usable} of {total} {'is' if usable == 1 else 'are'} "
                       f"free{share}" + (f"; pinned: {who}" if who else ""))
        return ResourceError(message, hint="lower `resources.cpu` of pinned services, "
                                           "or raise `capacity.overcommit.cpu` to 2 to "
                                           "let two instances share a core")


def _ids(ids: Iterable[int]) -> str:
    return format_cpulist(ids)


def stack_cpuset_problems(services: Iterable[tuple[str, str | None, float, int]],
                          topology: Topology, max_share: int = 1) -> list[str]:
    """Preflight: for (service, cpuset, cpu, replicas) tuples, explicit lists naming CPUs
    that are not online, and `auto` demand beyond the host's cores x `max_share`
    (instances already pinned by other stacks are not counted here: the allocator
    refuses those at launch, with their names)."""
    problems: list[str] = []
    needed = 0
    asking: list[str] = []
    for name, cpuset, cpu, replicas in services:
        if cpuset is None or replicas <= 0:
            continue
        if cpuset == AUTO:
            cores = cores_for(cpu, topology) * replicas
            needed += cores
            asking.append(f"{name} {cores}")
            continue
        try:
            check_explicit(cpuset, topology)
        except ResourceError as exc:
            problems.append(f"cpuset of service {name}: {exc.message}")
    available = len(topology.cores) * max_share
    if needed > available:
        problems.append(
            f"not enough cores for cpusets: the stack pins {needed} whole cores "
            f"({', '.join(asking)}) but this host has {len(topology.cores)}"
            + (f" x {max_share} shares" if max_share > 1 else ""))
    return problems
