"""The deploy scheduler: launch order per strategy, slots, milestones, failures."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.plan.graph import DependencyGraph
from shipyard.plan.schedule import DeployScheduler, Milestone, simulate
from shipyard.spec.models import Condition, Strategy

H, S, C = Condition.HEALTHY, Condition.STARTED, Condition.COMPLETED
SEQ, PAR, HYB = Strategy.SEQUENTIAL, Strategy.PARALLEL, Strategy.HYBRID

WEB = DependencyGraph({
    "db": {},
    "cache": {},
    "migrate": {"db": H},
    "api": {"db": H, "migrate": C, "cache": S},
    "worker": {"db": H, "cache": H},
    "web": {"api": H},
})


def launch_all(sched: DeployScheduler) -> list[str]:
    names = sched.next_to_start()
    for name in names:
        sched.mark_launched(name)
    return names


# -- strategies -------------------------------------------------------------------------


def test_sequential_goes_one_at_a_time_in_topological_order() -> None:
    sched = DeployScheduler(WEB, SEQ, max_parallel=10)
    order = []
    while not sched.done:
        batch = launch_all(sched)
        assert len(batch) == 1
        assert sched.next_to_start() == []
        order += batch
        sched.mark(batch[0], Milestone.COMPLETED if batch[0] == "migrate" else Milestone.HEALTHY)
    assert order == WEB.topo_order()
    assert sched.settled == set(WEB.services)


def test_parallel_waits_for_the_whole_previous_phase() -> None:
    sched = DeployScheduler(WEB, PAR, max_parallel=10)
    assert launch_all(sched) == ["cache", "db"]
    sched.mark("db", Milestone.HEALTHY)
    # migrate's own dependency is ready, but cache (same phase as db) has not settled
    assert sched.next_to_start() == []
    sched.mark("cache", Milestone.STARTED)
    assert sched.next_to_start() == []
    sched.mark("cache", Milestone.HEALTHY)
    assert launch_all(sched) == ["migrate", "worker"]
    sched.mark("worker", Milestone.HEALTHY)
    sched.mark("migrate", Milestone.HEALTHY)
    assert sched.next_to_start() == []  # migrate settles on completed: api waits on that
    sched.mark("migrate", Milestone.COMPLETED)
    assert launch_all(sched) == ["api"]


def test_parallel_fills_slots_within_a_phase_by_name() -> None:
    graph = DependencyGraph({name: {} for name in "edcba"} | {"z": {"a": H}})
    sched = DeployScheduler(graph, PAR, max_parallel=2)
    assert launch_all(sched) == ["a", "b"]
    assert sched.next_to_start() == []
    sched.mark("a", Milestone.HEALTHY)
    assert launch_all(sched) == ["c"]  # z waits for the rest of phase 0
    for name in "bc":
        sched.mark(name, Milestone.HEALTHY)
    assert launch_all(sched) == ["d", "e"]
    sched.mark("d", Milestone.HEALTHY)
    sched.mark("e", Milestone.HEALTHY)
    assert launch_all(sched) == ["z"]


def test_hybrid_starts_each_service_when_its_own_dependencies_are_ready() -> None:
    sched = DeployScheduler(WEB, HYB, max_parallel=10)
    assert sorted(launch_all(sched)) == ["cache", "db"]
    sched.mark("db", Milestone.HEALTHY)
    assert launch_all(sched) == ["migrate"]  # no barrier: cache is still starting
    sched.mark("cache", Milestone.STARTED)
    assert sched.next_to_start() == []  # worker needs cache healthy; api needs migrate done
    sched.mark("migrate", Milestone.COMPLETED)
    assert launch_all(sched) == ["api"]  # api only needs cache started
    sched.mark("cache", Milestone.HEALTHY)
    assert launch_all(sched) == ["worker"]


def test_hybrid_prefers_the_longest_remaining_chain() -> None:
    graph = DependencyGraph({
        "a": {}, "b": {}, "c": {}, "long1": {}, "long2": {"long1": H}, "long3": {"long2": H},
    })
    sched = DeployScheduler(graph, HYB, max_parallel=2)
    assert sched.next_to_start() == ["long1", "a"]  # chain 3 first, then ties by name
    weighted = DeployScheduler(graph, HYB, max_parallel=2, weights={"c": 10.0})
    assert weighted.next_to_start() == ["c", "long1"]


def test_started_edge_does_not_wait_for_health() -> None:
    graph = DependencyGraph({"db": {}, "api": {"db": S}})
    sched = DeployScheduler(graph, HYB, max_parallel=1)
    launch_all(sched)
    sched.mark("db", Milestone.STARTED)
    assert sched.next_to_start() == []  # eligible, but db still holds the only slot
    sched.mark("db", Milestone.HEALTHY)
    assert launch_all(sched) == ["api"]


def test_healthy_does_not_satisfy_a_completed_wait() -> None:
    graph = DependencyGraph({"migrate": {}, "api": {"migrate": C}})
    sched = DeployScheduler(graph, HYB, max_parallel=5)
    assert sched.settles_on("migrate") is Milestone.COMPLETED
    launch_all(sched)
    sched.mark("migrate", Milestone.HEALTHY)
    assert sched.in_flight == {"migrate"}
    assert sched.next_to_start() == []
    sched.mark("migrate", Milestone.COMPLETED)
    assert sched.settled == {"migrate"}
    assert sched.reached("migrate") == {Milestone.STARTED, Milestone.HEALTHY,
                                        Milestone.COMPLETED}
    assert sched.next_to_start() == ["api"]


def test_completed_settles_and_satisfies_every_wait() -> None:
    graph = DependencyGraph({"job": {}, "api": {"job": H}})
    sched = DeployScheduler(graph, HYB, max_parallel=5)
    launch_all(sched)
    sched.mark("job", Milestone.COMPLETED)  # exited 0 before anyone saw it healthy
    assert sched.settled == {"job"}
    assert sched.next_to_start() == ["api"]


def test_settles_on_is_honoured_and_raised_to_what_dependents_need() -> None:
    graph = DependencyGraph({"a": {}, "b": {"a": H}, "c": {}})
    sched = DeployScheduler(graph, HYB, max_parallel=1,
                            settles_on={"a": Milestone.STARTED, "c": Milestone.STARTED})
    assert sched.settles_on("a") is Milestone.HEALTHY
    assert sched.settles_on("c") is Milestone.STARTED
    assert launch_all(sched) == ["a"]
    sched.mark("a", Milestone.HEALTHY)
    assert launch_all(sched) == ["b"]


def test_only_treats_the_others_as_satisfied() -> None:
    sched = DeployScheduler(WEB, HYB, max_parallel=10, only={"api", "web"})
    assert launch_all(sched) == ["api"]
    sched.mark("api", Milestone.HEALTHY)
    assert launch_all(sched) == ["web"]
    sched.mark("web", Milestone.HEALTHY)
    assert sched.done
    assert sched.settled == {"api", "web"}


def test_only_with_parallel_skips_empty_phases() -> None:
    sched = DeployScheduler(WEB, PAR, max_parallel=10, only={"web"})
    assert launch_all(sched) == ["web"]


def test_max_parallel_caps_in_flight() -> None:
    graph = DependencyGraph({f"s{i}": {} for i in range(7)})
    sched = DeployScheduler(graph, HYB, max_parallel=3)
    assert launch_all(sched) == ["s0", "s1", "s2"]
    assert sched.next_to_start() == []
    sched.mark("s1", Milestone.STARTED)
    assert sched.next_to_start() == []
    sched.mark("s1", Milestone.HEALTHY)
    assert sched.next_to_start() == ["s3"]
    assert sched.next_to_start() == ["s3"]  # asking is free


# -- failures ---------------------------------------------------------------------------


def test_failure_skips_the_downstream_services() -> None:
    sched = DeployScheduler(WEB, HYB, max_parallel=10)
    launch_all(sched)
    assert sched.mark_failed("db") == {"migrate", "api", "worker", "web"}
    assert sched.skipped == {"migrate", "api", "worker", "web"}
    assert sched.failed == {"db"}
    assert not sched.done  # cache is still in flight
    sched.mark("cache", Milestone.HEALTHY)
    assert sched.done
    assert sched.pending == set()
    assert sched.mark_failed("db") == set()


def test_failure_does_not_skip_what_already_launched() -> None:
    sched = DeployScheduler(WEB, HYB, max_parallel=10)
    launch_all(sched)
    for name in ("db", "cache"):
        sched.mark(name, Milestone.HEALTHY)
    launch_all(sched)  # migrate, worker
    sched.mark("migrate", Milestone.COMPLETED)
    launch_all(sched)  # api
    assert sched.mark_failed("api") == {"web"}
    assert sched.mark_failed("worker") == set()
    assert sched.done
    assert sched.failed == {"api", "worker"}


def test_failure_after_a_started_wait_leaves_the_launched_dependent_in_flight() -> None:
    graph = DependencyGraph({"db": {}, "api": {"db": S}, "web": {"api": H}})
    sched = DeployScheduler(graph, HYB, max_parallel=5)
    launch_all(sched)
    sched.mark("db", Milestone.STARTED)
    assert launch_all(sched) == ["api"]
    assert sched.mark_failed("db") == {"web"}
    assert sched.in_flight == {"api"}
    assert not sched.done
    sched.mark("api", Milestone.HEALTHY)
    assert sched.done


def test_mark_failed_milestone_is_mark_failed() -> None:
    sched = DeployScheduler(WEB, SEQ, max_parallel=1)
    launch_all(sched)  # cache
    sched.mark("cache", Milestone.FAILED)
    assert sched.skipped == {"api", "worker", "web"}
    assert sched.next_to_start() == ["db"]  # unrelated work goes on


def test_marks_after_failure_are_ignored() -> None:
    sched = DeployScheduler(WEB, HYB, max_parallel=10)
    launch_all(sched)
    sched.mark_failed("db")
    sched.mark("db", Milestone.HEALTHY)
    assert sched.reached("db") == frozenset()
    with pytest.raises(ValueError, match="skipped"):
        sched.mark("web", Milestone.STARTED)


# -- misuse -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_parallel": 0}, "max_parallel"),
        ({"only": {"nope"}}, "nope"),
        ({"settles_on": {"db": Milestone.FAILED}}, "settle"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"max_parallel": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        DeployScheduler(WEB, HYB, **args)


def test_mark_launched_refuses_what_may_not_launch() -> None:
    sched = DeployScheduler(WEB, HYB, max_parallel=10, only={"db", "api"})
    with pytest.raises(ValueError, match="not one of"):
        sched.mark_launched("cache")
    with pytest.raises(ValueError, match="not ready"):
        sched.mark_launched("api")
    sched.mark_launched("db")
    with pytest.raises(ValueError, match="already"):
        sched.mark_launched("db")
    with pytest.raises(KeyError):
        sched.mark("nope", Milestone.STARTED)


def test_marking_an_unlaunched_service_counts_as_its_launch() -> None:
    sched = DeployScheduler(WEB, HYB, max_parallel=10)
    sched.mark("db", Milestone.STARTED)
    assert sched.launched == {"db"}
    assert sched.in_flight == {"db"}
    assert sched.next_to_start() == ["cache"]


# -- simulation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "max_parallel", "expected"),
    [
        (SEQ, 10, 1 + 3 + 2 + 4 + 2 + 1),
        (PAR, 10, 3 + 4 + 2 + 1),  # phases: max(cache, db), max(migrate, worker), api, web
        (HYB, 10, 8.0),  # db 3, migrate 2, api 2 (cache need only start), web 1
        (HYB, 1, 13.0),
    ],
)
def test_simulate(strategy: Strategy, max_parallel: int, expected: float) -> None:
    durations = {"cache": 1, "db": 3, "migrate": 2, "worker": 4, "api": 2, "web": 1}
    assert simulate(WEB, strategy, max_parallel, durations) == expected


def test_simulate_hybrid_hits_the_critical_path() -> None:
    graph = DependencyGraph({"a": {}, "b": {"a": H}, "c": {}, "d": {"c": H, "b": C}})
    durations = {"a": 0.1, "b": 0.2, "c": 0.7, "d": 0.3}
    assert simulate(graph, HYB, 4, durations) == graph.longest_chain(durations)[0]


# -- properties -------------------------------------------------------------------------


def random_dag(rng: random.Random, n: int, p: float,
               conditions: tuple[Condition, ...] = tuple(Condition)) -> DependencyGraph:
    names = [f"s{i:03d}" for i in range(n)]
    rng.shuffle(names)
    return DependencyGraph({
        name: {names[j]: rng.choice(conditions) for j in range(i) if rng.random() < p}
        for i, name in enumerate(names)
    })


@st.composite
def deploys(draw: st.DrawFn) -> tuple[DependencyGraph, Strategy, int, random.Random]:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    graph = random_dag(rng, draw(st.integers(1, 14)), draw(st.sampled_from([0.0, 0.2, 0.5])))
    return graph, draw(st.sampled_from(list(Strategy))), draw(st.integers(1, 5)), rng


def needed_settle(graph: DependencyGraph, name: str) -> Milestone:
    completed = Condition.COMPLETED in graph.dependent_edges(name).values()
    return Milestone.COMPLETED if completed else Milestone.HEALTHY


def drive(graph: DependencyGraph, strategy: Strategy, max_parallel: int, rng: random.Random,
          only: set[str] | None = None, fail: str | None = None) -> DeployScheduler:
    """Run a deploy to its end, reporting milestones of in-flight services in a random
    interleaving, and check the scheduler's promises independently at every launch."""
    sched = DeployScheduler(graph, strategy, max_parallel, only=only)
    wanted = set(graph.services) if only is None else only
    limit = 1 if strategy is SEQ else max_parallel
    reached: dict[str, set[Milestone]] = {n: set() for n in graph.services}
    todo: dict[str, list[Milestone]] = {}  # what each running service will report next
    unsettled: set[str] = set()
    closed: set[str] = set()
    while True:
        batch = sched.next_to_start()
        assert len(set(batch)) == len(batch)
        assert len(unsettled) + len(batch) <= limit
        for name in batch:
            assert name in wanted
            for dep, cond in graph.dependencies(name).items():
                assert dep not in wanted or Milestone(cond.value) in reached[dep], (name, dep)
            if strategy is PAR:
                earlier = {n for n in wanted if graph.phase_of(n) < graph.phase_of(name)}
                assert earlier <= closed
            sched.mark_launched(name)
            if name == fail:
                downstream = graph.downstream(name) & wanted
                skipped = sched.mark_failed(name)
                assert skipped == downstream - sched.launched
                closed |= skipped | {name}
                continue
            unsettled.add(name)
            steps = [Milestone.STARTED, Milestone.HEALTHY, Milestone.COMPLETED]
            todo[name] = steps[: steps.index(needed_settle(graph, name)) + 1]
        if not todo:
            if batch:
                continue  # a launch failed at once: ask again
            break
        name = rng.choice(sorted(todo))
        milestone = todo[name].pop(0)
        if rng.random() < 0.2:  # sometimes a report jumps ahead
            milestone = todo[name][-1] if todo[name] else milestone
            todo[name] = []
        sched.mark(name, milestone)
        reached[name] |= {m for m in Milestone if m is not Milestone.FAILED
                          and list(Milestone).index(m) <= list(Milestone).index(milestone)}
        if not todo[name]:
            del todo[name]
            unsettled.discard(name)
            closed.add(name)
            assert name in sched.settled
        assert sched.in_flight == unsettled
    assert sched.done
    return sched


@given(deploys())
@settings(max_examples=200, deadline=None)
def test_every_service_is_scheduled_within_the_rules(
    case: tuple[DependencyGraph, Strategy, int, random.Random],
) -> None:
    graph, strategy, max_parallel, rng = case
    sched = drive(graph, strategy, max_parallel, rng)
    assert sched.settled == set(graph.services)
    assert sched.launched == set(graph.services)
    assert not sched.skipped and not sched.failed


@given(deploys(), st.data())
@settings(max_examples=150, deadline=None)
def test_only_some_services(
    case: tuple[DependencyGraph, Strategy, int, random.Random], data: st.DataObject,
) -> None:
    graph, strategy, max_parallel, rng = case
    only = data.draw(st.sets(st.sampled_from(graph.services)))
    sched = drive(graph, strategy, max_parallel, rng, only=only)
    assert sched.settled == only == sched.launched


@given(deploys(), st.data())
@settings(max_examples=150, deadline=None)
def test_failure_skips_exactly_the_downstream_set(
    case: tuple[DependencyGraph, Strategy, int, random.Random], data: st.DataObject,
) -> None:
    graph, strategy, max_parallel, rng = case
    victim = data.draw(st.sampled_from(graph.services))
    sched = drive(graph, strategy, max_parallel, rng, fail=victim)
    assert sched.failed == {victim}
    assert sched.skipped == graph.downstream(victim)
    assert sched.settled == set(graph.services) - sched.skipped


@given(st.integers(0, 2**32 - 1), st.integers(1, 25), st.sampled_from([0.1, 0.3, 0.6]))
@settings(max_examples=100, deadline=None)
def test_makespans(seed: int, n: int, p: float) -> None:
    rng = random.Random(seed)
    graph = random_dag(rng, n, p, conditions=(H, C))
    durations = {name: float(rng.randint(0, 20)) for name in graph.services}
    critical = graph.longest_chain(durations)[0]
    total = sum(durations.values())
    assert simulate(graph, HYB, n, durations) == critical
    assert simulate(graph, SEQ, rng.randint(1, n), durations) == total
    by_phase = sum(max(durations[s] for s in level) for level in graph.phases())
    assert simulate(graph, PAR, n, durations) == by_phase
    for strategy in Strategy:
        slots = rng.randint(1, n)
        makespan = simulate(graph, strategy, slots, durations)
        assert max(critical, total / slots) <= makespan <= total


@given(st.integers(0, 2**32 - 1), st.integers(1, 20))
@settings(max_examples=60, deadline=None)
def test_started_waits_only_shorten_a_hybrid_deploy(seed: int, n: int) -> None:
    rng = random.Random(seed)
    graph = random_dag(rng, n, 0.3)
    durations = {name: float(rng.randint(1, 9)) for name in graph.services}
    assert simulate(graph, HYB, n, durations) <= graph.longest_chain(durations)[0]
