"""The cpuset allocator: whole cores, one NUMA node when possible, never the same core to
two instances unless overcommit allows, explicit lists checked and recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.errors import ResourceError
from shipyard.resources.cpusets import (
    CpusetAllocator,
    check_explicit,
    cores_for,
    share_for,
    stack_cpuset_problems,
)
from shipyard.resources.topology import Core, Topology, read_topology
from tests.fake_sysfs import Layout, two_socket_smt, write_sysfs


def topology_of(layout: Layout, memory_nodes: set[int] | None = None) -> Topology:
    cores = tuple(sorted((Core(min(core), node, tuple(sorted(core)))
                          for node, node_cores in layout.items() for core in node_cores),
                         key=lambda c: c.id))
    nodes = {n: frozenset(c for core in cs for c in core) for n, cs in layout.items()}
    online = frozenset().union(*nodes.values())
    return Topology(online, cores, nodes,
                    frozenset(layout if memory_nodes is None else memory_nodes))


TWO_NODES = topology_of(two_socket_smt())  # 2 nodes x 4 cores x 2 threads


def test_auto_gives_whole_cores_of_one_node() -> None:
    alloc = CpusetAllocator(TWO_NODES)
    a = alloc.allocate("demo/api-1", 2)
    assert a.cpuset == "0-1,8-9" and a.mems == "0" and a.nodes == (0,) and a.cores == (0, 1)
    # 3 cores: node 0 has 2 left, node 1 has 4: the only node that fits is 1.
    b = alloc.allocate("demo/api-2", 3)
    assert b.nodes == (1,) and b.cpus == {4, 5, 6, 12, 13, 14} and b.mems == "1"
    # 2 cores: both nodes fit; best fit takes node 0's last two, keeping node 1's for later.
    c = alloc.allocate("demo/api-3", 2)
    assert c.cpuset == "2-3,10-11"
    with pytest.raises(ResourceError) as info:
        alloc.allocate("demo/api-4", 2)
    message = info.value.message
    assert "needs 2 whole cores for its cpuset but only 1 of 8 is free" in message
    assert "demo/api-1 (core 0-1)" in message and "demo/api-2 (core 4-6)" in message
    assert alloc.assignment("demo/api-4") is None  # a failed allocation changes nothing
    assert alloc.release("demo/api-2") == b
    assert alloc.allocate("demo/api-4", 2).nodes == (1,)


def test_spans_nodes_only_when_no_node_is_enough() -> None:
    alloc = CpusetAllocator(TWO_NODES)
    big = alloc.allocate("big-1", 6)
    assert big.nodes == (0, 1) and big.mems == "0-1" and len(big.cpus) == 12
    assert len(alloc.free_cores()) == 2
    with pytest.raises(ResourceError, match="needs 9 whole cores for its cpuset but this "
                                            "host has 8 usable"):
        alloc.allocate("huge-1", 9)


def test_reallocating_an_owner_replaces_what_it_held() -> None:
    alloc = CpusetAllocator(TWO_NODES)
    alloc.allocate("a", 4)
    again = alloc.allocate("a", 4)
    assert len(alloc.free_cores()) == 4 and again.nodes in ((0,), (1,))
    with pytest.raises(ResourceError):
        alloc.allocate("a", 9)
    assert alloc.assignment("a") == again  # kept after the failed replacement


def test_overcommit_two_lets_two_instances_share_a_core() -> None:
    one_core = topology_of({0: [[0, 1]]})
    exclusive = CpusetAllocator.for_overcommit(one_core, 1.5)  # the default overcommit
    exclusive.allocate("a", 1)
    with pytest.raises(ResourceError, match="only 0 of 1 are free"):
        exclusive.allocate("b", 1)
    shared = CpusetAllocator.for_overcommit(one_core, 2.0)
    assert shared.allocate("a", 1).cpuset == shared.allocate("b", 1).cpuset == "0-1"
    with pytest.raises(ResourceError, match="may be shared by 2 instances"):
        shared.allocate("c", 1)
    assert shared.holders(0) == {"a", "b"}
    # per request: a stack with overcommit 2 next to one with the default on one host
    mixed = CpusetAllocator(one_core)
    mixed.allocate("x", 1, max_share=share_for(2.0))
    with pytest.raises(ResourceError):
        mixed.allocate("y", 1)  # the default: exclusive
    assert mixed.allocate("y", 1, max_share=share_for(2.5)).cpuset == "0-1"
    assert [share_for(r) for r in (1.0, 1.5, 1.99, 2.0, 3.2)] == [1, 1, 1, 2, 3]


def test_least_shared_cores_first() -> None:
    alloc = CpusetAllocator(topology_of({0: [[0], [1], [2]]}), max_share=2)
    assert alloc.allocate("a", 2).cpus == {0, 1}
    assert alloc.allocate("b", 2).cpus == {0, 2}  # the free core 2 before a shared one
    assert alloc.allocate("c", 1).cpus == {1}  # core 1 has one holder, 0 and 2 have two


def test_explicit_lists_are_checked_and_recorded() -> None:
    alloc = CpusetAllocator(TWO_NODES)
    r = alloc.reserve("db-1", "0,8")
    assert r.cores == (0,) and r.mems == "0"
    assert alloc.reserve("db-2", "0,8").cpuset == "0,8"  # asked for: never refused
    assert 0 not in alloc.allocate("api-1", 3).cores  # auto avoids reserved cores
    with pytest.raises(ResourceError) as info:
        alloc.reserve("x-1", "0-3,64")
    assert "CPU(s) 64 that are not online here (online: 0-15)" in info.value.message
    assert alloc.assignment("x-1") is None
    with pytest.raises(ResourceError, match="invalid CPU list"):
        check_explicit("3-1", TWO_NODES)


def test_cores_for_rounds_cpu_up_to_whole_cores() -> None:
    assert [cores_for(c, TWO_NODES) for c in (0, 0.5, 1, 2, 2.1, 3, 8)] == [1, 1, 1, 1, 2, 2, 4]
    no_smt = topology_of({0: [[0], [1], [2]]})
    assert [cores_for(c, no_smt) for c in (0.25, 1, 2.5)] == [1, 1, 3]
    alloc = CpusetAllocator(TWO_NODES)
    assert len(alloc.allocate_cpu("a", 2.5).cpus) == 4


def test_stack_problems_for_preflight() -> None:
    problems = stack_cpuset_problems(
        [("api", "auto", 2.0, 3), ("db", "0-3,99", 0.0, 1), ("web", None, 1.0, 9),
         ("batch", "auto", 4.0, 2)], TWO_NODES)
    # api 3 + batch 4 = 7 cores fit in 8; web is not pinned; db names a missing CPU
    assert problems == ["cpuset of service db: cpuset 0-3,99 names CPU(s) 99 that are not "
                        "online here (online: 0-15)"]
    over = stack_cpuset_problems([("api", "auto", 2.0, 9)], TWO_NODES)
    assert over == ["not enough cores for cpusets: the stack pins 9 whole cores (api 9) "
                    "but this host has 8"]
    assert stack_cpuset_problems([("api", "auto", 2.0, 9)], TWO_NODES, max_share=2) == []


def test_allocation_on_a_fake_sysfs_tree(tmp_path: Path) -> None:
    topo = read_topology(write_sysfs(tmp_path, two_socket_smt(), memory_nodes=(0,)))
    alloc = CpusetAllocator(topo)
    alloc.allocate("a", 3)
    b = alloc.allocate("b", 3)
    assert b.nodes == (1,) and b.mems == "0"  # node 1 has no memory: node 0's is used


# -- properties -----------------------------------------------------------------------
@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    nodes = draw(st.integers(1, 3))
    threads = draw(st.integers(1, 2))
    cpu = 0
    out: Layout = {}
    for node in range(nodes):
        out[node] = []
        for _ in range(draw(st.integers(1, 4))):
            out[node].append(list(range(cpu, cpu + threads)))
            cpu += threads
    return out


operations = st.lists(st.tuples(st.sampled_from("abcdefg"), st.integers(0, 5)), max_size=40)


@settings(deadline=None, max_examples=200)
@given(layout=layouts(), ops=operations, max_share=st.sampled_from([1, 1, 2]))
def test_never_overlapping_whole_cores_one_node_when_possible(
        layout: Layout, ops: list[tuple[str, int]], max_share: int) -> None:
    topo = topology_of(layout)
    alloc = CpusetAllocator(topo, max_share=max_share)
    core_sets = {frozenset(c.cpus) for c in topo.cores}
    for owner, cores in ops:
        if cores == 0:
            alloc.release(owner)
            continue
        alloc.release(owner)  # what it held is free for its new allocation
        counts = {c.id: len(alloc.holders(c.id)) for c in topo.cores}
        usable_per_node: dict[int, int] = {}
        for core in topo.cores:
            if counts[core.id] < max_share:
                usable_per_node[core.node] = usable_per_node.get(core.node, 0) + 1
        before = {o: alloc.assignment(o) for o in alloc.owners}
        try:
            got = alloc.allocate(owner, cores)
        except ResourceError:
            assert sum(usable_per_node.values()) < cores
            assert {o: alloc.assignment(o) for o in alloc.owners} == before
            continue
        # whole cores: the cpus are a union of complete cores, `cores` of them
        chosen = [c for c in topo.cores if c.id in got.cores]
        assert len(chosen) == cores
        assert got.cpus == frozenset(cpu for c in chosen for cpu in c.cpus)
        assert all(frozenset(c.cpus) in core_sets for c in chosen)
        # one node whenever one node had enough usable cores
        if any(n >= cores for n in usable_per_node.values()):
            assert len(got.nodes) == 1
        # never more holders on a core than max_share; exclusive means disjoint
        for core in topo.cores:
            assert len(alloc.holders(core.id)) <= max_share
        if max_share == 1:
            held = [alloc.assignment(o) for o in alloc.owners]
            cpus = [cpu for a in held if a is not None for cpu in a.cpus]
            assert len(cpus) == len(set(cpus))


# -- the stack file -------------------------------------------------------------------
def test_resources_fields_in_the_stack_file() -> None:
    import jsonschema
    import yaml

    from shipyard.errors import SpecError
    from shipyard.spec.loader import parse_stack
    from shipyard.spec.schema import stack_json_schema

    validator = jsonschema.Draft202012Validator(stack_json_schema())

    def load(resources: dict[str, object]) -> object:
        doc = {"services": {"a": {"command": "x", "resources": resources}}}
        assert list(validator.iter_errors(doc)) == []  # what loads, the schema accepts
        return parse_stack(yaml.safe_dump(doc), base_dir="/srv").services["a"].resources

    r = load({"cpuset": "3, 0-1", "memory": "1Gi", "swap": "512Mi", "disk": "1Gi",
              "disk_action": "stop", "gpu": 1, "gpu_shared": True})
    assert (r.cpuset, r.swap, r.disk_action, r.gpu_shared) == ("0-1,3", 2**29, "stop", True)
    assert load({"cpuset": "auto"}).cpuset == "auto"  # type: ignore[attr-defined]
    assert load({"cpuset": 2}).cpuset == "2"  # type: ignore[attr-defined]
    defaults = load({})
    assert (defaults.cpuset, defaults.swap, defaults.disk_action) == (None, None, "warn")  # type: ignore[attr-defined]
    for bad, words in (({"cpuset": "3-1"}, "goes backwards"), ({"cpuset": "fast"}, "0-3,6"),
                       ({"swap": "1Gi"}, "set memory too"), ({"disk_action": "delete"}, "warn")):
        doc = {"services": {"a": {"command": "x", "resources": bad}}}
        with pytest.raises(SpecError, match=words):
            parse_stack(yaml.safe_dump(doc), base_dir="/srv")
