"""Reading the CPU topology from sysfs: cores from SMT siblings, NUMA nodes, memory nodes,
offline CPUs, kernels without NUMA or without core_cpus_list; on fake trees, and on this
host's real one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shipyard.resources.topology import (
    format_cpulist,
    host_topology,
    parse_cpulist,
    read_topology,
)
from tests.fake_sysfs import two_socket_smt, write_sysfs


def test_cpulist_round_trip_and_errors() -> None:
    assert parse_cpulist("0-3,6\n") == {0, 1, 2, 3, 6}
    assert parse_cpulist(" 1 - 2 , 5 ") == {1, 2, 5}
    assert parse_cpulist("") == frozenset() and parse_cpulist("\n") == frozenset()
    assert format_cpulist({6, 0, 1, 2, 3, 9, 10}) == "0-3,6,9-10"
    assert format_cpulist([]) == ""
    for bad in ("3-1", "a", "0,,1", "1-", "-1", "0-3,", "1.5", "99999"):
        with pytest.raises(ValueError):
            parse_cpulist(bad)


@given(st.sets(st.integers(0, 300), max_size=60))
def test_cpulist_formats_what_it_parses(cpus: set[int]) -> None:
    assert parse_cpulist(format_cpulist(cpus)) == cpus


def test_two_nodes_with_smt(tmp_path: Path) -> None:
    topo = read_topology(write_sysfs(tmp_path, two_socket_smt()))
    assert topo.online == frozenset(range(16))
    assert topo.nodes == {0: frozenset({0, 1, 2, 3, 8, 9, 10, 11}),
                          1: frozenset({4, 5, 6, 7, 12, 13, 14, 15})}
    assert [(c.id, c.node, c.cpus) for c in topo.cores[:2]] == [(0, 0, (0, 8)), (1, 0, (1, 9))]
    assert len(topo.cores) == 8 and topo.threads_per_core == 2
    assert {c.node for c in topo.cores if 12 in c.cpus} == {1}
    assert topo.memory_nodes == {0, 1}
    assert topo.mems_for({4, 12}) == "1" and topo.mems_for({0, 4}) == "0-1"


def test_thread_siblings_list_on_older_kernels(tmp_path: Path) -> None:
    root = write_sysfs(tmp_path, two_socket_smt(2), sibling_file="thread_siblings_list")
    topo = read_topology(root)
    assert [c.cpus for c in topo.cores] == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_offline_cpus_are_left_out(tmp_path: Path) -> None:
    topo = read_topology(write_sysfs(tmp_path, two_socket_smt(2), offline=(5, 2)))
    assert topo.online == {0, 1, 3, 4, 6, 7}
    # Core 1 lost its sibling 5: it is a one-CPU core now; core 2 is down to cpu 6.
    assert [c.cpus for c in topo.cores] == [(0, 4), (1,), (3, 7), (6,)]
    assert topo.threads_per_core == 1
    assert topo.nodes[1] == {3, 7, 6}


def test_cpu_only_node_allocates_memory_from_the_others(tmp_path: Path) -> None:
    topo = read_topology(write_sysfs(tmp_path, two_socket_smt(2), memory_nodes=(0,)))
    assert topo.memory_nodes == {0}
    assert topo.mems_for({2, 6}) == "0"  # node 1 has no memory of its own


def test_no_numa_directory_means_one_node(tmp_path: Path) -> None:
    topo = read_topology(write_sysfs(tmp_path, {0: [[0, 2], [1, 3]]}, numa=False))
    assert topo.nodes == {0: frozenset({0, 1, 2, 3})} and topo.memory_nodes == {0}
    assert [c.cpus for c in topo.cores] == [(0, 2), (1, 3)]


def test_restrict_to_allowed_cpus(tmp_path: Path) -> None:
    topo = read_topology(write_sysfs(tmp_path, two_socket_smt(2))).restrict({1, 2, 5, 6})
    assert topo.online == {1, 2, 5, 6}
    assert [(c.id, c.cpus) for c in topo.cores] == [(1, (1, 5)), (2, (2, 6))]
    assert topo.nodes == {0: {1, 5}, 1: {2, 6}}


def test_this_host(tmp_path: Path) -> None:
    """The real sysfs: every CPU we may use is in exactly one core and one node."""
    topo = host_topology()
    allowed = os.sched_getaffinity(0)
    assert topo.online == allowed & read_topology("/").online
    flat = [cpu for core in topo.cores for cpu in core.cpus]
    assert sorted(flat) == sorted(topo.online)
    assert set().union(*topo.nodes.values()) == topo.online
    real_nodes = sorted(p.name for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
    assert len(topo.nodes) == max(1, len(real_nodes))
