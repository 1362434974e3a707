"""A fake sysfs CPU/NUMA tree for topology tests: the files Linux has, written under a
temporary root, so that multi-node machines can be tested on this single-node host."""

from __future__ import annotations

from pathlib import Path

from shipyard.resources.topology import format_cpulist

# node -> its cores, each core a list of CPUs (SMT siblings)
Layout = dict[int, list[list[int]]]


def write_sysfs(root: Path, layout: Layout, *, offline: tuple[int, ...] = (),
                memory_nodes: tuple[int, ...] | None = None,
                sibling_file: str = "core_cpus_list", numa: bool = True) -> Path:
    """Write /sys/devices/system/{cpu,node} under `root` for `layout`; `offline` CPUs
    exist but are not online; `sibling_file` is the topology file written (older kernels
    only have thread_siblings_list); `numa=False` writes no node directory."""
    cpu_dir = root / "sys" / "devices" / "system" / "cpu"
    node_dir = root / "sys" / "devices" / "system" / "node"
    cpu_dir.mkdir(parents=True, exist_ok=True)
    every = sorted(c for cores in layout.values() for core in cores for c in core)
    online = [c for c in every if c not in offline]
    (cpu_dir / "online").write_text(format_cpulist(online) + "\n")
    (cpu_dir / "possible").write_text(format_cpulist(every) + "\n")
    for cores in layout.values():
        for core in cores:
            for cpu in core:
                topo = cpu_dir / f"cpu{cpu}" / "topology"
                topo.mkdir(parents=True, exist_ok=True)
                if cpu in offline:
                    continue
                (topo / sibling_file).write_text(format_cpulist(core) + "\n")
    if numa:
        node_dir.mkdir(parents=True, exist_ok=True)
        for node, cores in layout.items():
            d = node_dir / f"node{node}"
            d.mkdir(exist_ok=True)
            (d / "cpulist").write_text(format_cpulist(c for core in cores for c in core) + "\n")
        mem = sorted(layout) if memory_nodes is None else sorted(memory_nodes)
        (node_dir / "has_memory").write_text(format_cpulist(mem) + "\n")
        (node_dir / "online").write_text(format_cpulist(layout) + "\n")
    return root


def two_socket_smt(cores_per_node: int = 4, nodes: int = 2) -> Layout:
    """A Linux-numbered SMT machine: the first thread of every core comes first
    (node 0: cpus 0-3 and 8-11 for 4 cores x 2 nodes), the siblings after."""
    total = cores_per_node * nodes
    return {n: [[n * cores_per_node + i, total + n * cores_per_node + i]
                for i in range(cores_per_node)] for n in range(nodes)}
