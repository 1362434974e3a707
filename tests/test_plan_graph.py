"""The dependency graph: validation, phases, orders and chains."""

from __future__ import annotations

import itertools
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.errors import PlanError
from shipyard.plan.graph import DependencyGraph
from shipyard.spec.models import Condition, Stack

H, S, C = Condition.HEALTHY, Condition.STARTED, Condition.COMPLETED

# A small web stack: migrate runs to completion, api waits for db and migrate.
WEB = {
    "db": {},
    "cache": {},
    "migrate": {"db": H},
    "api": {"db": H, "migrate": C, "cache": S},
    "worker": {"db": H, "cache": H},
    "web": {"api": H},
}


def make_dag(rng: random.Random, n: int, p: float = 0.3) -> dict[str, dict[str, Condition]]:
    """A random DAG of `n` services whose names do not follow the topological order."""
    names = [f"s{i:03d}" for i in range(n)]
    rng.shuffle(names)
    edges: dict[str, dict[str, Condition]] = {}
    for i, name in enumerate(names):
        edges[name] = {
            names[j]: rng.choice(list(Condition))
            for j in range(i) if rng.random() < p
        }
    return edges


@st.composite
def dags(draw: st.DrawFn, max_size: int = 14) -> dict[str, dict[str, Condition]]:
    n = draw(st.integers(1, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    p = draw(st.sampled_from([0.0, 0.15, 0.4, 0.8]))
    return make_dag(random.Random(seed), n, p)


# -- construction -----------------------------------------------------------------------


def test_from_stack_reads_depends_on() -> None:
    stack = Stack.model_validate({
        "name": "demo",
        "services": {
            "db": {"command": "db"},
            "api": {"command": "api", "depends_on": {"db": "healthy"}},
            "web": {"command": "web", "depends_on": ["api"]},
        },
    })
    graph = DependencyGraph.from_stack(stack)
    assert graph.services == ["api", "db", "web"]
    assert graph.dependencies("api") == {"db": Condition.HEALTHY}
    assert graph.dependencies("web") == {"api": Condition.HEALTHY}
    assert graph.dependents("db") == {"api"}
    assert graph.phases() == [["db"], ["api"], ["web"]]


def test_conditions_may_be_strings() -> None:
    graph = DependencyGraph({"a": {}, "b": {"a": "completed"}})
    assert graph.dependencies("b") == {"a": Condition.COMPLETED}


def test_missing_dependency_suggests_a_close_name() -> None:
    with pytest.raises(PlanError) as err:
        DependencyGraph({"db": {}, "api": {"dbx": H}})
    assert str(err.value) == (
        "service 'api' depends on 'dbx', which is not in the stack (did you mean 'db'?)"
    )


def test_every_missing_dependency_is_reported_at_once() -> None:
    with pytest.raises(PlanError) as err:
        DependencyGraph({"db": {}, "api": {"dbx": H, "queue": H}, "web": {"apx": H}})
    lines = str(err.value).splitlines()
    assert lines == [
        "service 'api' depends on 'dbx', which is not in the stack (did you mean 'db'?)",
        "service 'api' depends on 'queue', which is not in the stack",
        "service 'web' depends on 'apx', which is not in the stack (did you mean 'api'?)",
    ]
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    ("edges", "message"),
    [
        ({"api": {"api": H}}, "dependency cycle: api -> api"),
        ({"a": {"b": H}, "b": {"a": S}}, "dependency cycle: a -> b -> a"),
        (
            {"api": {"auth": H}, "auth": {"db": H}, "db": {"api": H}},
            "dependency cycle: api -> auth -> db -> api",
        ),
        (
            # the cycle is reported from its smallest name, behind a valid prefix
            {"web": {"x": H}, "x": {"z": H}, "z": {"y": H}, "y": {"x": C}, "ok": {}},
            "dependency cycle: x -> z -> y -> x",
        ),
    ],
)
def test_cycle_is_reported_with_its_path(edges: dict, message: str) -> None:
    with pytest.raises(PlanError) as err:
        DependencyGraph(edges)
    assert str(err.value) == message
    assert err.value.hint


def test_missing_dependencies_are_reported_before_cycles() -> None:
    with pytest.raises(PlanError, match="not in the stack"):
        DependencyGraph({"a": {"b": H}, "b": {"a": H, "c": H}})


def test_unknown_service_query_raises_key_error() -> None:
    graph = DependencyGraph(WEB)
    with pytest.raises(KeyError, match="nope"):
        graph.dependencies("nope")
    with pytest.raises(KeyError):
        graph.downstream("nope")
    assert "nope" not in graph
    assert "db" in graph
    assert len(graph) == 6


# -- orders -----------------------------------------------------------------------------


def test_phases_topo_and_reverse_order() -> None:
    graph = DependencyGraph(WEB)
    assert graph.phases() == [["cache", "db"], ["migrate", "worker"], ["api"], ["web"]]
    assert graph.topo_order() == ["cache", "db", "migrate", "worker", "api", "web"]
    assert graph.reverse_order() == ["web", "api", "migrate", "worker", "cache", "db"]
    assert graph.phase_of("api") == 2


def test_phases_are_copies() -> None:
    graph = DependencyGraph(WEB)
    graph.phases()[0].append("x")
    graph.services.append("x")
    assert graph.phases()[0] == ["cache", "db"]
    assert "x" not in graph.services


def test_downstream_and_upstream() -> None:
    graph = DependencyGraph(WEB)
    assert graph.downstream("db") == {"migrate", "api", "worker", "web"}
    assert graph.downstream("cache") == {"api", "worker", "web"}
    assert graph.downstream("web") == set()
    assert graph.upstream("web") == {"api", "db", "migrate", "cache"}
    assert graph.upstream("db") == set()
    assert graph.dependent_edges("migrate") == {"api": C}


# -- chains -----------------------------------------------------------------------------


def test_longest_chain_default_weights_count_services() -> None:
    graph = DependencyGraph(WEB)
    assert graph.longest_chain() == (4.0, ["db", "migrate", "api", "web"])


def test_longest_chain_follows_weights() -> None:
    graph = DependencyGraph(WEB)
    length, path = graph.longest_chain({"cache": 10.0, "migrate": 0.5})
    assert path == ["cache", "api", "web"]
    assert length == 12.0


def test_remaining_chain() -> None:
    graph = DependencyGraph(WEB)
    chain = graph.remaining_chain({"worker": 5.0})
    assert chain == {
        "web": 1.0, "api": 2.0, "worker": 5.0, "migrate": 3.0, "db": 6.0, "cache": 6.0,
    }


def test_chains_of_an_empty_graph() -> None:
    graph = DependencyGraph({})
    assert graph.longest_chain() == (0.0, [])
    assert graph.remaining_chain() == {}
    assert graph.phases() == []


def test_negative_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        DependencyGraph(WEB).longest_chain({"db": -1.0})


# -- properties -------------------------------------------------------------------------


@given(dags())
@settings(max_examples=150, deadline=None)
def test_phases_respect_every_edge(edges: dict[str, dict[str, Condition]]) -> None:
    graph = DependencyGraph(edges)
    phases = graph.phases()
    assert sorted(n for level in phases for n in level) == sorted(edges)
    assert all(level == sorted(level) for level in phases)
    level_of = {n: i for i, level in enumerate(phases) for n in level}
    for name, deps in edges.items():
        for dep in deps:
            assert level_of[dep] < level_of[name]
        # a service sits right after its deepest dependency
        assert level_of[name] == max((level_of[d] + 1 for d in deps), default=0)
    order = graph.topo_order()
    position = {n: i for i, n in enumerate(order)}
    assert all(position[d] < position[n] for n, deps in edges.items() for d in deps)
    stop = {n: i for i, n in enumerate(graph.reverse_order())}
    assert all(stop[d] > stop[n] for n, deps in edges.items() for d in deps)


@given(dags(), st.data())
@settings(max_examples=100, deadline=None)
def test_chains_agree_with_brute_force(edges: dict[str, dict[str, Condition]],
                                       data: st.DataObject) -> None:
    graph = DependencyGraph(edges)
    weights = {n: data.draw(st.integers(0, 9), label=n) * 1.0 for n in edges}

    def best_from(name: str) -> float:  # exhaustive over dependents
        return weights[name] + max((best_from(d) for d in graph.dependents(name)), default=0.0)

    remaining = graph.remaining_chain(weights)
    assert remaining == {n: best_from(n) for n in edges}
    length, path = graph.longest_chain(weights)
    assert length == max(remaining.values())
    assert sum(weights[n] for n in path) == length
    assert all(path[i] in graph.dependencies(path[i + 1]) for i in range(len(path) - 1))
    for name in edges:
        down = graph.downstream(name)
        assert down == {d for d in edges if name in graph.upstream(d)}


@st.composite
def digraphs(draw: st.DrawFn) -> dict[str, dict[str, Condition]]:
    n = draw(st.integers(1, 10))
    names = [f"n{i}" for i in range(n)]
    pairs = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(names)),
                          max_size=3 * n))
    edges: dict[str, dict[str, Condition]] = {name: {} for name in names}
    for a, b in pairs:
        edges[a][b] = H
    return edges


def _has_cycle(edges: dict[str, dict[str, Condition]]) -> bool:
    state: dict[str, int] = {}

    def visit(name: str) -> bool:
        state[name] = 1
        for dep in edges[name]:
            if state.get(dep) == 1 or (dep not in state and visit(dep)):
                return True
        state[name] = 2
        return False

    return any(name not in state and visit(name) for name in edges)


@given(digraphs())
@settings(max_examples=200, deadline=None)
def test_cycles_are_always_detected_with_a_real_path(
    edges: dict[str, dict[str, Condition]],
) -> None:
    if not _has_cycle(edges):
        DependencyGraph(edges)
        return
    with pytest.raises(PlanError) as err:
        DependencyGraph(edges)
    match = re.fullmatch(r"dependency cycle: (.+)", str(err.value))
    assert match
    path = match.group(1).split(" -> ")
    assert path[0] == path[-1]
    assert len(set(path[:-1])) == len(path) - 1
    for a, b in itertools.pairwise(path):
        assert b in edges[a]
