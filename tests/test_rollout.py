"""Rolling updates end to end: real processes behind the real router, under continuous
HTTP load on 127.0.0.1, asserting that no client request fails."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from shipyard import Engine
from shipyard.spec.models import Stack
from tests.conftest import port_range
from tests.loadgen import Load
from tests.test_engine import svc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stack_of(tmp_path: Path, version: str, *extra: str, name: str = "ro",
             update: dict[str, Any] | None = None, **fields: Any) -> Stack:
    api = svc("--version", version, *extra, **fields)
    api["update"] = update or {}
    return Stack.model_validate({
        "name": name, "ports": {"range": port_range()}, "deploy": {"timeout": "60s"},
        "services": {"api": api}, "base_dir": str(tmp_path)})


async def test_rolling_update_with_surge_fails_no_request(engine: Engine,
                                                          tmp_path: Path) -> None:
    port = free_port()
    v1 = stack_of(tmp_path, "v1", replicas=3, expose=port)
    assert (await engine.apply(v1)).ok
    v2 = stack_of(tmp_path, "v2", "--ready-after", "0.3", replicas=3, expose=port,
                  update={"max_surge": 1, "max_unavailable": 0, "min_ready": "200ms"})
    async with Load(port) as load:
        await load.settle()
        result = await engine.apply(v2)
        await load.settle()
    assert result.ok, result
    story = [f"{e.ts:.3f} {e.kind} {e.instance} {e.message}"
             for e in await engine.store.list_events(stack="ro")]
    if load.failures:
        print("\n".join(load.failures + story))
    assert load.failures == [], load.failures[:5]
    assert load.versions()["v1"] > 0 and load.versions()["v2"] > 0
    instances = await engine.instances("ro", "api")
    assert len(instances) == 3 and {i.revision for i in instances} == {2}
    # never more than replicas + surge instances at once, never fewer than 3 ready
    events = [e for e in await engine.store.list_events(stack="ro")
              if e.kind == "rollout.progress"]
    assert events, "the rollout reports its progress"
    for event in events:
        new, old = (int(part.split()[0]) for part in event.message.split(", ")[1:])
        assert new + old <= 4, event.message


async def test_rolling_update_in_place_keeps_names_and_ports(engine: Engine,
                                                             tmp_path: Path) -> None:
    v1 = stack_of(tmp_path, "v1", replicas=2)
    assert (await engine.apply(v1)).ok
    before = {i.instance: i.ports for i in await engine.instances("ro", "api")}
    v2 = stack_of(tmp_path, "v2", replicas=2, update={"max_surge": 1})
    result = await engine.apply(v2)
    assert result.ok, result
    after = {i.instance: (i.ports, i.revision) for i in await engine.instances("ro", "api")}
    assert {k: v[0] for k, v in after.items()} == before  # no router: addresses are kept
    assert {v[1] for v in after.values()} == {2}
    stopped = [e.instance for e in await engine.store.list_events(stack="ro")
               if e.kind == "instance.stopped"]
    assert stopped == ["api-2", "api-1"]  # one at a time (max_unavailable 1, no surge)


@pytest.mark.parametrize(("path", "bad"), [
    ("/ready", ("--ready-after", "999")),  # never ready: caught by the progress deadline
    ("/ready", ("--ready-after", "0.5", "--exit-after", "0.2", "--exit-code", "3")),
    ("/whoami", ("--status", "500")),  # answers 500: its readiness probe fails
], ids=["never-ready", "crash-loop", "answers-500"])
async def test_bad_new_version_is_rolled_back_without_failed_requests(
        engine: Engine, tmp_path: Path, path: str, bad: tuple[str, ...]) -> None:
    port = free_port()
    probe = {"readiness": {"http": path, "interval": "100ms", "failure_threshold": 1}}
    v1 = stack_of(tmp_path, "v1", replicas=2, expose=port, health=probe)
    assert (await engine.apply(v1)).ok
    update = {"max_surge": 1, "max_unavailable": 0, "progress_deadline": "3s"}
    worse = stack_of(tmp_path, "v2", *bad, replicas=2, expose=port, health=probe,
                     update=update)
    async with Load(port) as load:
        await load.settle()
        result = await engine.apply(worse)
        await load.settle()
    assert not result.ok
    assert "rolled back" in result.failed["api"], result.failed
    assert load.failures == [], load.failures[:5]
    assert set(load.versions()) == {"v1"}
    instances = await engine.instances("ro", "api")
    assert len(instances) == 2 and all(i.ready for i in instances)
    history = await engine.history("ro", "api")
    assert [h["outcome"] for h in history][-2:] == ["failed", "rolled-back"]
    async with Load(port) as load:
        await load.settle(20)
    assert load.failures == [] and set(load.versions()) == {"v1"}


# -- blue-green ----------------------------------------------------------------------

async def test_blue_green_swaps_at_once_keeps_previous_and_rolls_back_instantly(
        engine: Engine, tmp_path: Path) -> None:
    port = free_port()
    update = {"strategy": "blue-green", "verify": {"http": "/whoami"},
              "keep_previous": "30s"}
    v1 = stack_of(tmp_path, "v1", replicas=2, expose=port, update=update)
    assert (await engine.apply(v1)).ok
    blue = {i.instance: i.pid for i in await engine.instances("ro", "api")}
    v2 = stack_of(tmp_path, "v2", "--ready-after", "0.3", replicas=2, expose=port,
                  update=update)
    async with Load(port) as load:
        await load.settle()
        assert (await engine.apply(v2)).ok
        before_swap = load.versions()["v2"]
        await load.settle()
    assert load.failures == [], load.failures[:5]
    assert before_swap == 0 or load.versions()["v1"] > 0
    # after the swap only the new set answers; the old one still runs, out of the router
    async with Load(port) as load:
        await load.settle(30)
    assert set(load.versions()) == {"v2"}
    running = {i.instance: i.pid for i in await engine.instances("ro", "api")}
    assert len(running) == 4 and all(running[k] == pid for k, pid in blue.items())
    # rollback within keep_previous: a swap back to the same processes
    async with Load(port) as load:
        await load.settle()
        await engine.rollback("ro", "api")
        await load.settle()
    assert load.failures == [], load.failures[:5]
    async with Load(port) as load:
        await load.settle(30)
    assert set(load.versions()) == {"v1"}
    kinds = [e.kind for e in await engine.store.list_events(stack="ro")]
    assert kinds.count("rollout.swapped") == 2
    for _ in range(100):  # the v2 set is retired at the end of its keep_previous (30s)
        now = {i.instance: i.pid for i in await engine.instances("ro", "api")}
        if len(now) == 2:
            break
        task = engine.retirements.get(("ro", "api"))
        assert task is not None
        task.cancel()  # don't wait 30s: retire now, as the timer would
        from shipyard.engine.rollout_traffic import retire_outdated

        await retire_outdated(engine, engine.stacks_state["ro"], "api")
    assert now == blue


async def test_blue_green_verification_failure_keeps_the_old_set(engine: Engine,
                                                                 tmp_path: Path) -> None:
    port = free_port()
    update = {"strategy": "blue-green", "verify": {"http": ["/whoami"]}}
    v1 = stack_of(tmp_path, "v1", replicas=2, expose=port, update=update)
    assert (await engine.apply(v1)).ok
    bad = stack_of(tmp_path, "v2", "--status", "500", replicas=2, expose=port, update=update)
    async with Load(port) as load:
        await load.settle()
        result = await engine.apply(bad)
        await load.settle()
    assert not result.ok and "verification of api-" in result.failed["api"], result.failed
    assert load.failures == [] and set(load.versions()) == {"v1"}
    assert len(await engine.instances("ro", "api")) == 2


async def test_blue_green_manual_promotion(engine: Engine, tmp_path: Path) -> None:
    port = free_port()
    update = {"strategy": "blue-green", "promotion": "manual", "keep_previous": "0s"}
    assert (await engine.apply(stack_of(tmp_path, "v1", expose=port, update=update))).ok
    deploy = asyncio.create_task(engine.apply(stack_of(tmp_path, "v2", expose=port,
                                                       update=update)))
    for _ in range(200):
        kinds = [e.kind for e in await engine.store.list_events(stack="ro")]
        if "rollout.paused" in kinds:
            break
        await asyncio.sleep(0.05)
    async with Load(port) as load:
        await load.settle(20)
    assert set(load.versions()) == {"v1"} and not deploy.done()
    assert "waiting for promotion" in engine.promote("ro", "api")
    assert (await deploy).ok
    async with Load(port) as load:
        await load.settle(20)
    assert set(load.versions()) == {"v2"}


# -- canary --------------------------------------------------------------------------

CANARY = {"strategy": "canary", "steps": [25, 50],
          "analysis": {"window": "1s", "interval": "200ms", "min_requests": 5,
                       "max_error_rate": "5%", "max_latency_p99": "150ms"}}


async def test_canary_promotes_a_good_version(engine: Engine, tmp_path: Path) -> None:
    port = free_port()
    assert (await engine.apply(stack_of(tmp_path, "v1", replicas=2, expose=port,
                                        update=CANARY))).ok
    async with Load(port) as load:
        await load.settle()
        result = await engine.apply(stack_of(tmp_path, "v2", replicas=2, expose=port,
                                             update=CANARY))
        await load.settle()
    assert result.ok, result
    assert load.failures == [], load.failures[:5]
    steps = [e.message for e in await engine.store.list_events(stack="ro")
             if e.kind == "rollout.step"]
    assert [m.split()[2] for m in steps] == ["25%", "50%"]
    async with Load(port) as load:
        await load.settle(20)
    assert set(load.versions()) == {"v2"}
    assert {i.revision for i in await engine.instances("ro", "api")} == {2}


@pytest.mark.parametrize("bad", [("--status", "500"), ("--delay", "0.3")],
                         ids=["errors", "slow"])
async def test_canary_analysis_rolls_a_bad_version_back(engine: Engine, tmp_path: Path,
                                                        bad: tuple[str, ...]) -> None:
    port = free_port()
    assert (await engine.apply(stack_of(tmp_path, "v1", replicas=2, expose=port,
                                        update=CANARY))).ok
    async with Load(port) as load:
        await load.settle()
        result = await engine.apply(stack_of(tmp_path, "v2", *bad, replicas=2, expose=port,
                                             update=CANARY))
        await load.settle()
    assert not result.ok and "analysis at 25% failed" in result.failed["api"], result.failed
    # only the first step's share of requests can have met the bad version
    assert load.versions()["v2"] + len(load.failures) <= 0.5 * load.total, load.statuses
    aborted = [e for e in await engine.store.list_events(stack="ro")
               if e.kind == "rollout.aborted"]
    assert aborted and "stable revision" in aborted[0].message
    async with Load(port) as load:
        await load.settle(20)
    assert load.failures == [] and set(load.versions()) == {"v1"}


async def test_count_or_update_policy_changes_scale_in_place(engine: Engine,
                                                             tmp_path: Path) -> None:
    port = free_port()
    assert (await engine.apply(stack_of(tmp_path, "v1", replicas=2, expose=port))).ok
    first = {i.instance: i.pid for i in await engine.instances("ro", "api")}
    async with Load(port) as load:
        await load.settle()
        up = await engine.apply(stack_of(tmp_path, "v1", replicas=4, expose=port,
                                         update={"max_surge": 2}))
        await load.settle()
        down = await engine.apply(stack_of(tmp_path, "v1", replicas=1, expose=port,
                                           update={"max_surge": 2}))
        await load.settle()
    assert up.ok and down.ok
    story = [f"{e.ts:.3f} {e.kind} {e.instance} {e.message}"
             for e in await engine.store.list_events(stack="ro")]
    if load.failures:
        print("\n".join(load.failures + story))
    assert load.failures == [], load.failures[:5]
    now = await engine.instances("ro", "api")
    assert [(i.instance, i.pid, i.revision) for i in now] == [("api-1", first["api-1"], 3)]
    scaled = [e.message for e in await engine.store.list_events(stack="ro")
              if e.kind == "service.scaled"]
    assert scaled == ["scaled to 4 instance(s): 2 added, 0 removed, the others kept",
                      "scaled to 1 instance(s): 0 added, 3 removed, the others kept"]
