"""The host's CPU topology, read from sysfs: which CPUs are online, how they group into
physical cores (SMT siblings) and into NUMA nodes, and which nodes have memory.

Everything takes a `root` ("/" on a real host) so that tests can build a fake sysfs tree
in a temporary directory. Reading is plain file I/O, done once per allocator; a host
whose CPUs go on- or offline needs a fresh `read_topology()`.

Sources (all in Linux's "cpulist" format, "0-3,8-11"):
- /sys/devices/system/cpu/online
- /sys/devices/system/cpu/cpuN/topology/core_cpus_list (5.7+), else
  thread_siblings_list: the CPUs sharing cpuN's physical core
- /sys/devices/system/node/nodeN/cpulist, and .../has_memory (the nodes with memory);
  a kernel without NUMA support has no node directory: one node 0 holds every CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_NODE_DIR = re.compile(r"^node(\d+)$")
_RANGE = re.compile(r"^\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?$")
MAX_CPU = 65535  # Linux's NR_CPUS tops out at 8192; a bigger number is a typo


def parse_cpulist(text: str) -> frozenset[int]:
    """"0-3,6" → {0, 1, 2, 3, 6}; "" → {}. Raises ValueError on anything else."""
    if not text.strip():
        return frozenset()
    out: set[int] = set()
    for part in text.strip().split(","):
        match = _RANGE.match(part)
        if match is None:
            raise ValueError(f"invalid CPU list {text.strip()!r}: expected e.g. 0-3,6")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"invalid CPU list {text.strip()!r}: {part.strip()} goes "
                             "backwards")
        if last > MAX_CPU:
            raise ValueError(f"invalid CPU list {text.strip()!r}: CPU {last} is beyond "
                             f"{MAX_CPU}")
        out.update(range(first, last + 1))
    return frozenset(out)


def format_cpulist(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 3, 6} → "0-3,6" (the kernel's own notation)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class Core:
    """One physical core: its CPUs (SMT siblings, online ones) and its NUMA node."""

    id: int  # the lowest CPU number of the core: unique and stable
    node: int
    cpus: tuple[int, ...]


@dataclass(frozen=True)
class Topology:
    online: frozenset[int]
    cores: tuple[Core, ...]  # ordered by id
    nodes: dict[int, frozenset[int]] = field(default_factory=dict)  # node -> its online CPUs
    memory_nodes: frozenset[int] = frozenset()  # nodes with memory (cpuset.mems candidates)

    @property
    def threads_per_core(self) -> int:
        """The fewest CPUs any core has (1 without SMT, or on hybrid parts' small cores)."""
        return min((len(c.cpus) for c in self.cores), default=1)

    def node_of(self, cpu: int) -> int | None:
        return next((n for n, cpus in self.nodes.items() if cpu in cpus), None)

    def mems_for(self, cpus: Iterable[int]) -> str:
        """The memory nodes to go with `cpus`: their own nodes where those have memory,
        else every node with memory (a CPU-only node allocates from the others)."""
        own = {self.node_of(c) for c in cpus} - {None}
        with_memory = {n for n in own if n in self.memory_nodes}
        chosen = with_memory or set(self.memory_nodes) or {0}
        return format_cpulist(n for n in chosen if n is not None)

    def restrict(self, allowed: Iterable[int]) -> Topology:
        """The topology seen by a process that may only run on `allowed` CPUs (its
        affinity, or its container's cpuset): cores lose the CPUs it may not use."""
        keep = frozenset(allowed) & self.online
        cores = tuple(Core(c.id, c.node, tuple(x for x in c.cpus if x in keep))
                      for c in self.cores)
        cores = tuple(Core(c.cpus[0], c.node, c.cpus) for c in cores if c.cpus)
        nodes = {n: cpus & keep for n, cpus in self.nodes.items() if cpus & keep}
        return Topology(keep, cores, nodes, self.memory_nodes)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_topology(root: str | os.PathLike[str] = "/") -> Topology:
    """The CPU topology under `root` (see the module docstring for the files read)."""
    base = Path(root) / "sys" / "devices" / "system"
    online_text = _read(base / "cpu" / "online")
    if online_text is None:
        count = os.cpu_count() or 1
        online = frozenset(range(count)) if Path(root) == Path("/") else frozenset()
    else:
        online = parse_cpulist(online_text)
    nodes: dict[int, frozenset[int]] = {}
    node_base = base / "node"
    has_memory = _read(node_base / "has_memory")
    try:
        entries = sorted(os.listdir(node_base))
    except OSError:
        entries = []
    for name in entries:
        match = _NODE_DIR.match(name)
        if match is None:
            continue
        text = _read(node_base / name / "cpulist")
        if text is None:
            continue
        nodes[int(match.group(1))] = parse_cpulist(text) & online
    memory_nodes = set(parse_cpulist(has_memory)) if has_memory is not None else set(nodes)
    if not nodes:
        nodes = {0: online}
        memory_nodes = memory_nodes or {0}
    # Every online CPU belongs to a node: one the node files missed goes to the first.
    missed = online - frozenset().union(*nodes.values())
    if missed:
        first = min(nodes)
        nodes[first] = nodes[first] | missed
    cores: dict[int, Core] = {}
    for cpu in sorted(online):
        if any(cpu in c.cpus for c in cores.values()):
            continue
        topo = base / "cpu" / f"cpu{cpu}" / "topology"
        text = _read(topo / "core_cpus_list") or _read(topo / "thread_siblings_list")
        siblings = (parse_cpulist(text) if text else frozenset({cpu})) & online
        siblings = siblings | {cpu}
        node = next(n for n, cpus in nodes.items() if cpu in cpus)
        # Siblings on another node would be a firmware oddity: keep the core on one node.
        members = tuple(sorted(c for c in siblings if c in nodes[node]))
        cores[members[0]] = Core(members[0], node, members)
    return Topology(online, tuple(cores[k] for k in sorted(cores)), nodes,
                    frozenset(memory_nodes))


def host_topology() -> Topology:
    """This host's topology, limited to the CPUs this process may run on."""
    topology = read_topology("/")
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return topology
    return topology.restrict(allowed)
