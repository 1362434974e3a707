"""Placement (plan layer, pure): property-tested never to exceed a node's capacity times
its overcommit, to respect labels, ports and required anti-affinity, and to be
deterministic; binpack fills nodes, spread empties them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.plan.placement import NodeInfo, Placed, Request, place

GI = 2**30


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[NodeInfo], list[Request]]:
    nodes = [NodeInfo(f"n{i}", cpu=draw(st.sampled_from([1, 2, 4, 8])),
                      memory=draw(st.sampled_from([1, 2, 4])) * GI,
                      gpu=draw(st.integers(0, 2)),
                      labels={"zone": draw(st.sampled_from(["a", "b"]))},
                      overcommit={"cpu": draw(st.sampled_from([1.0, 1.5]))})
             for i in range(draw(st.integers(1, 6)))]
    requests = []
    for s in range(draw(st.integers(1, 5))):
        replicas = draw(st.integers(1, 6))
        cpu = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]))
        memory = draw(st.sampled_from([0, 128, 512, 1024])) * 2**20
        gpu = draw(st.integers(0, 1))
        port = draw(st.sampled_from([None, 8080, 9090]))
        zone = draw(st.sampled_from([None, "a", "b"]))
        anti = draw(st.sampled_from(["none", "preferred", "required"]))
        strategy = draw(st.sampled_from(["binpack", "spread"]))
        for r in range(replicas):
            requests.append(Request(f"s{s}-{r}", f"s{s}", cpu=cpu, memory=memory, gpu=gpu,
                                    ports=frozenset([port]) if port else frozenset(),
                                    constraints={"zone": zone} if zone else {},
                                    anti_affinity=anti, strategy=strategy))
    return nodes, requests


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_placement_never_breaks_a_rule(cluster: tuple[list[NodeInfo], list[Request]]) -> None:
    nodes, requests = cluster
    result = place(requests, nodes)
    assert set(result.placed) | set(result.unplaced) == {r.instance for r in requests}
    by_name = {n.name: n for n in nodes}
    by_instance = {r.instance: r for r in requests}
    for node in nodes:
        here = [by_instance[i] for i, n in result.placed.items() if n == node.name]
        for kind in ("cpu", "memory", "gpu"):
            assert sum(getattr(r, kind) for r in here) <= node.limit(kind) + 1e-9
        ports = [p for r in here for p in r.ports]
        assert len(ports) == len(set(ports))
        for r in here:
            assert all(node.labels.get(k) == v for k, v in r.constraints.items())
            if r.anti_affinity == "required":
                assert sum(o.service == r.service for o in here) == 1
    for why in result.unplaced.values():  # each reason names the nodes that refused
        assert why.startswith("no node fits (") and any(f"{n}: " in why for n in by_name)
    assert place(list(reversed(requests)), list(reversed(nodes))).placed == result.placed


def test_binpack_fills_one_node_spread_uses_all() -> None:
    nodes = [NodeInfo(f"n{i}", cpu=4, memory=8 * GI) for i in range(3)]
    ask = [Request(f"a-{i}", "a", cpu=1, memory=GI, anti_affinity="none") for i in range(3)]
    assert set(place(ask, nodes).placed.values()) == {"n0"}
    spread = [Request(r.instance, r.service, cpu=1, memory=GI, anti_affinity="none",
                      strategy="spread") for r in ask]
    assert set(place(spread, nodes).placed.values()) == {"n0", "n1", "n2"}


def test_preferred_anti_affinity_spreads_replicas_but_still_places_them() -> None:
    nodes = [NodeInfo("n0", cpu=8, memory=8 * GI), NodeInfo("n1", cpu=8, memory=8 * GI)]
    ask = [Request(f"a-{i}", "a", cpu=1, memory=GI) for i in range(3)]
    placed = place(ask, nodes).placed
    assert len(placed) == 3 and set(placed.values()) == {"n0", "n1"}
    required = [Request(r.instance, "a", cpu=1, memory=GI, anti_affinity="required")
                for r in ask]
    result = place(required, nodes)
    assert len(result.placed) == 2
    assert "already runs a replica of a" in next(iter(result.unplaced.values()))


def test_existing_placements_count_and_reasons_name_each_node() -> None:
    nodes = [NodeInfo("n0", cpu=2, memory=GI, labels={"zone": "a"}),
             NodeInfo("n1", cpu=2, memory=GI, labels={"zone": "b"})]
    existing = [Placed("x-1", "x", "n0", cpu=2)]
    result = place([Request("a-1", "a", cpu=1, constraints={"zone": "a"}),
                    Request("b-1", "b", cpu=3)], nodes, existing)
    assert result.unplaced["a-1"].startswith("no node fits (n0: cpu 2 of 2 used, 1 more")
    assert "n1: label zone=a is b" in result.unplaced["a-1"]
    assert "n1: cpu 0 of 2 used, 3 more asked" in result.unplaced["b-1"]
