"""The engine end to end, with real processes and real HTTP probes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shipyard import Engine, EngineConfig
from shipyard.errors import InputError, ResourceError
from shipyard.spec.models import Stack
from shipyard.state.base import InstanceState
from tests.conftest import pids_alive, port_range

SVC = str(Path(__file__).parent / "fixtures" / "svc.py")
PY = sys.executable


def svc(*args: str, **fields: Any) -> dict[str, Any]:
    """A service running tests/fixtures/svc.py with an http port and readiness probe."""
    spec: dict[str, Any] = {
        "command": [PY, SVC, "--port", "${PORT}", *args],
        "ports": {"http": "auto"},
        "health": {"readiness": {"http": "/ready", "interval": "100ms", "timeout": "1s",
                                 "failure_threshold": 1}},
        "stop": {"timeout": "3s"},
        "restart": {"policy": "on-failure", "initial": "100ms", "max": "200ms",
                    "max_restarts": 2},
    }
    spec.update(fields)
    return spec


def make_stack(tmp_path: Path, services: dict[str, Any], **top: Any) -> Stack:
    doc = {"name": "t", "ports": {"range": port_range()},
           "deploy": {"timeout": "20s", **top.pop("deploy", {})}, "services": services, **top}
    return Stack.model_validate(doc | {"base_dir": str(tmp_path)})


def all_pids(engine: Engine) -> list[int]:
    return [s.record.pid for st in engine.stacks_state.values()
            for s in st.supervisors.values() if s.record.pid]


async def test_deploys_in_dependency_order_with_health_gating(engine: Engine,
                                                              tmp_path: Path) -> None:
    record = str(tmp_path / "order.log")
    stack = make_stack(tmp_path, {
        "db": svc("--ready-after", "0.5", "--record", record),
        "migrate": {"command": [PY, SVC, "--exit-after", "0.2", "--record", record],
                    "restart": "no", "depends_on": {"db": "healthy"}},
        "api": svc("--record", record, "--env-out", str(tmp_path / "api.env"),
                   replicas=2, depends_on={"db": "healthy", "migrate": "completed"}),
    })
    result = await engine.apply(stack)
    assert result.ok, result
    starts = [line.split()[0] for line in Path(record).read_text().splitlines()]
    assert starts[0] == "db-1" and starts[1] == "migrate-1"
    assert sorted(starts[2:]) == ["api-1", "api-2"]
    records = {r.instance: r for r in await engine.instances("t")}
    assert records["migrate-1"].state is InstanceState.COMPLETED
    assert records["migrate-1"].exit_code == 0
    assert records["api-1"].ready and records["api-2"].ready
    assert records["api-1"].ports["http"] != records["api-2"].ports["http"]
    env = json.loads(Path(tmp_path / "api.env").read_text())
    assert env["DB_URL"] == f"http://127.0.0.1:{records['db-1'].ports['http']}"
    assert env["PORT"] == env["PORT_HTTP"] == str(records[env["SHIPYARD_INSTANCE"]].ports["http"])
    kinds = [e.kind for e in await engine.store.list_events(stack="t")]
    assert kinds[:3] == ["op.queued", "op.started", "deploy.started"]
    assert kinds[-2:] == ["deploy.finished", "op.done"]
    assert "instance.ready" in kinds and "instance.completed" in kinds


async def test_down_leaves_no_process(engine: Engine, tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {"a": svc(), "b": svc(depends_on={"a": "healthy"}),
                                  "c": svc("--ignore-term", stop={"timeout": "300ms"})})
    assert (await engine.apply(stack)).ok
    pids = all_pids(engine)
    assert len(pids) == 3 and len(pids_alive(pids)) == 3
    await engine.down("t")
    assert pids_alive(pids) == []
    assert await engine.store.list_instances(stack="t") == []
    assert "t" not in engine.stacks_state


async def test_down_kills_daemonized_grandchildren(engine: Engine, tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    stack = make_stack(tmp_path, {"a": svc("--daemonize", str(pidfile))})
    assert (await engine.apply(stack)).ok
    for _ in range(100):
        if pidfile.exists():
            break
        await asyncio.sleep(0.02)
    daemon = int(pidfile.read_text())
    parent = all_pids(engine)
    assert pids_alive([daemon]) == [daemon]
    await engine.down("t")
    assert pids_alive([daemon, *parent]) == []


async def test_metrics_cover_instances_restarts_deploys_and_probes(engine: Engine,
                                                                  tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    assert (await engine.apply(make_stack(tmp_path, {"a": svc(replicas=2)}))).ok
    text = generate_latest(engine.registry).decode()
    assert 'shipyard_instances{service="a",stack="t",state="ready"} 2.0' in text
    assert 'shipyard_deploy_duration_seconds_count{outcome="ok",stack="t"} 1.0' in text
    assert "shipyard_probe_duration_seconds_bucket" in text
    assert "shipyard_restarts_total" in text


async def test_crash_restarts_with_backoff_then_fails_alone(engine: Engine,
                                                            tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {
        "ok": svc(),
        "crashy": {"command": [PY, SVC, "--exit-after", "0.05", "--exit-code", "3"],
                   "restart": {"policy": "on-failure", "initial": "50ms", "max": "100ms",
                               "max_restarts": 2, "keep_trying": False}},
    }, deploy={"rollback_on_failure": False})
    # Without a readiness probe an instance counts as ready once running, so the deploy
    # succeeds; the crash loop that follows ends in `failed` without touching `ok`.
    assert (await engine.apply(stack)).ok
    for _ in range(100):
        rec = {r.service: r for r in await engine.instances("t")}
        if rec["crashy"].state is InstanceState.FAILED:
            break
        await asyncio.sleep(0.05)
    assert "gave up after 2 restarts" in rec["crashy"].message
    assert rec["crashy"].state is InstanceState.FAILED
    assert rec["crashy"].restarts == 2 and rec["crashy"].exit_code == 3
    assert rec["ok"].state is InstanceState.READY  # the rest of the stack keeps running
    assert pids_alive([rec["ok"].pid]) == [rec["ok"].pid]


async def test_liveness_failure_restarts_instance(engine: Engine, tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {"a": svc(
        "--unhealthy-after", "0.3",
        health={"liveness": {"http": "/health", "interval": "100ms", "failure_threshold": 2}},
        restart={"policy": "always", "initial": "50ms", "max": "50ms", "max_restarts": 5},
    )})
    assert (await engine.apply(stack)).ok
    first = (await engine.instances("t"))[0].pid
    for _ in range(100):
        rec = (await engine.instances("t"))[0]
        if rec.restarts >= 1 and rec.pid != first and rec.state is InstanceState.READY:
            break
        await asyncio.sleep(0.05)
    assert rec.restarts >= 1 and rec.pid != first
    kinds = [e.kind for e in await engine.store.list_events(stack="t")]
    assert "instance.unhealthy" in kinds and "instance.restarting" in kinds
    assert pids_alive([first]) == []


async def test_failed_first_deploy_rolls_back_everything(engine: Engine,
                                                         tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {
        "a": svc(),
        "never": svc("--ready-after", "999", depends_on={"a": "healthy"}),
        "after": svc(depends_on={"never": "healthy"}),
    }, deploy={"timeout": "1500ms"})
    result = await engine.apply(stack)
    assert not result.ok and result.rolled_back
    started = [e.data["pid"] for e in await engine.store.list_events(stack="t")
               if e.kind == "instance.started"]
    assert len(started) == 2 and pids_alive(started) == []
    assert "deploy timeout" in result.failed["never"]
    assert result.skipped == ["after"]
    assert await engine.store.list_instances(stack="t") == []
    assert await engine.store.get_stack("t") is None
    kinds = [e.kind for e in await engine.store.list_events(stack="t")]
    assert "deploy.failed" in kinds and "deploy.rolled-back" in kinds


async def test_control_plane_restart_readopts_without_restarting(tmp_path: Path) -> None:
    home = tmp_path / "home"
    stack = make_stack(tmp_path, {"a": svc(), "b": svc(replicas=2)})
    async with Engine(EngineConfig(home=home)) as first:
        assert (await first.apply(stack)).ok
        before = {r.instance: r.pid for r in await first.instances("t")}
    assert sorted(pids_alive(list(before.values()))) == sorted(before.values())
    async with Engine(EngineConfig(home=home, stop_on_exit=True)) as second:
        await asyncio.sleep(0.3)
        after = {r.instance: r for r in await second.instances("t")}
        assert {k: r.pid for k, r in after.items()} == before
        assert all(r.restarts == 0 for r in after.values())
        kinds = [e.kind for e in await second.store.list_events(stack="t")]
        assert kinds.count("instance.adopted") == 3
        # an adopted instance that dies is restarted
        os.kill(before["a-1"], 9)
        for _ in range(100):
            rec = (await second.instances("t", "a"))[0]
            if rec.pid != before["a-1"] and rec.state is InstanceState.READY:
                break
            await asyncio.sleep(0.05)
        assert rec.restarts == 1 and rec.pid != before["a-1"]
    assert pids_alive([*list(before.values()), rec.pid]) == []


async def test_fixed_port_taken_is_refused_before_anything_starts(engine: Engine,
                                                                  tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        stack = make_stack(tmp_path, {"a": svc(), "b": svc(ports={"http": port})})
        with pytest.raises(ResourceError) as err:
            await engine.apply(stack)
    assert f"port {port}" in err.value.message and f"pid {os.getpid()}" in err.value.message
    assert await engine.store.list_instances() == []


async def test_bad_commands_and_capacity_refused_up_front(engine: Engine,
                                                         tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {
        "a": {"command": ["no-such-program-xyz"]},
        "b": {"command": ["true"], "workdir": "missing"},
        "c": {"command": ["true"], "resources": {"memory": "100Ti"}},
    })
    with pytest.raises(InputError) as err:
        await engine.apply(stack)
    text = err.value.message
    assert "no-such-program-xyz" in text and "missing" in text and "memory" in text
    assert await engine.store.list_instances() == []
    assert await engine.store.get_stack("t") is None


async def test_reapply_changes_only_what_changed(engine: Engine, tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {"a": svc(), "b": svc(depends_on={"a": "healthy"})})
    assert (await engine.apply(stack)).ok
    pids = {r.service: r.pid for r in await engine.instances("t")}
    ports = {r.service: r.ports for r in await engine.instances("t")}
    changed = make_stack(tmp_path, {"a": svc(), "b": svc(depends_on={"a": "healthy"},
                                                         env={"X": "1"})})
    report = await engine.plan(changed)
    assert {c.service: c.action for c in report.changes} == {"a": "unchanged", "b": "change"}
    result = await engine.apply(changed)
    assert result.ok and result.started == ["b"] and result.unchanged == ["a"]
    after = {r.service: r for r in await engine.instances("t")}
    assert after["a"].pid == pids["a"] and after["b"].pid != pids["b"]
    assert after["b"].ports == ports["b"] and after["b"].revision == 2


async def test_supervisor_that_fails_resumes(engine: Engine, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault injected into the store (one failing write) must not leave an instance
    unsupervised: the supervisor says so and resumes."""
    from shipyard.errors import StoreError

    stack = make_stack(tmp_path, {"a": svc(restart={"policy": "always", "initial": "50ms"})})
    assert (await engine.apply(stack)).ok
    first = (await engine.instances("t"))[0].pid
    real = engine.store.record_instances  # what a supervisor's transitions go through
    calls = {"n": 0}

    async def flaky(changes: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreError("injected: disk went away")
        await real(changes)

    monkeypatch.setattr(engine.store, "record_instances", flaky)
    os.kill(first, 9)
    for _ in range(100):
        rec = (await engine.instances("t"))[0]
        if rec.pid != first and rec.state is InstanceState.READY:
            break
        await asyncio.sleep(0.05)
    assert rec.pid != first and rec.state is InstanceState.READY
    kinds = [e.kind for e in await engine.store.list_events(stack="t")]
    assert "instance.supervisor-error" in kinds
    assert pids_alive([first]) == []


async def test_min_healthy_lets_dependents_start_on_part_of_the_replicas(
        engine: Engine, tmp_path: Path) -> None:
    record = str(tmp_path / "order.log")
    stack = make_stack(tmp_path, {
        "db": svc("--slow", "db-2=1.5", "--record", record, replicas=2),
        "api": svc("--record", record,
                   depends_on={"db": {"condition": "healthy", "min_healthy": 1}}),
    })
    result = await engine.apply(stack)
    assert result.ok
    events = [(e.kind, e.instance) for e in await engine.store.list_events(stack="t")]
    api_started = events.index(("instance.started", "api-1"))
    db2_ready = events.index(("instance.ready", "db-2"))
    assert api_started < db2_ready < events.index(("deploy.finished", None))
    assert all(r.ready for r in await engine.instances("t"))


async def test_rolling_restart_keeps_all_but_one_ready(engine: Engine, tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {"a": svc("--ready-after", "0.3", replicas=3)})
    assert (await engine.apply(stack)).ok
    before = {r.instance: r.pid for r in await engine.instances("t")}
    lowest = 3
    sampling = True

    async def sample() -> None:
        nonlocal lowest
        while sampling:
            lowest = min(lowest, sum(r.ready for r in await engine.instances("t")))
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    result = await engine.restart("t", "a", rolling=True)
    sampling = False
    await sampler
    assert result["restarted"] == ["a-1", "a-2", "a-3"] and result["rolling"]
    after = {r.instance: r for r in await engine.instances("t")}
    assert all(after[name].pid != pid for name, pid in before.items())
    assert all(r.ready for r in after.values())
    assert lowest == 2  # one at a time: never fewer ready than replicas - 1
    assert pids_alive(list(before.values())) == []
    ops = await engine.store.list_operations(stack="t")
    assert [(o.kind, o.state.value) for o in ops][-1] == ("restart", "succeeded")
    assert ops[-1].checkpoint == {"done": ["a-1", "a-2", "a-3"]}


async def test_restart_all_at_once(engine: Engine, tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {"a": svc(replicas=2), "b": svc()})
    assert (await engine.apply(stack)).ok
    before = {r.instance: r.pid for r in await engine.instances("t")}
    await engine.restart("t", "a")
    after = {r.instance: r.pid for r in await engine.instances("t")}
    assert after["a-1"] != before["a-1"] and after["a-2"] != before["a-2"]
    assert after["b-1"] == before["b-1"]  # the other service is left alone


async def test_crash_loop_trips_the_circuit_then_a_trial_closes_it(
        engine: Engine, tmp_path: Path) -> None:
    """Crashes 3 times in a row, then (once a marker file exists) runs fine: the circuit
    opens after 3 failures, the instance is `failed` with the reason, one trial run after
    the recovery timeout reaches ready and closes the circuit."""
    from prometheus_client import generate_latest

    marker = tmp_path / "healthy-now"
    code = (f"import os, sys, time; sys.exit(3) if not os.path.exists({str(marker)!r}) "
            "else time.sleep(60)")
    stack = make_stack(tmp_path, {
        "ok": svc(),
        "loop": {"command": [PY, "-c", code],
                 "restart": {"policy": "always", "initial": "20ms", "max": "20ms",
                             "max_restarts": 100},
                 "circuit_breaker": {"consecutive_failures": 3, "recovery_timeout": "1s"}},
    }, deploy={"rollback_on_failure": False})
    await engine.submit(stack)
    for _ in range(200):
        rec = ({r.service: r for r in await engine.instances("t")}
               if "t" in engine.stacks_state else {})
        if "loop" in rec and rec["loop"].state is InstanceState.FAILED:
            break
        await asyncio.sleep(0.02)
    loop = rec["loop"]
    assert loop.state is InstanceState.FAILED and loop.restarts == 2
    assert "circuit for service:t/loop is open after 3 consecutive failures" in loop.message
    text = generate_latest(engine.registry).decode()
    assert 'shipyard_circuit_state{kind="service",service="t/loop"} 2.0' in text
    marker.write_text("")
    for _ in range(300):  # the trial run counts once it has stayed up for a second
        kinds = [e.kind for e in await engine.store.list_events(stack="t", service="loop")]
        if "circuit.closed" in kinds:
            break
        await asyncio.sleep(0.05)
    rec = {r.service: r for r in await engine.instances("t")}
    assert rec["loop"].state is InstanceState.READY and rec["loop"].restarts == 3
    assert kinds.index("circuit.open") < kinds.index("circuit.half-open")
    assert kinds.index("circuit.half-open") < kinds.index("circuit.closed")
    text = generate_latest(engine.registry).decode()
    assert 'shipyard_circuit_state{kind="service",service="t/loop"} 0.0' in text
    assert rec["ok"].restarts == 0  # the rest of the stack was never touched


async def test_giving_up_with_an_open_circuit_waits_for_its_trial(engine: Engine,
                                                                   tmp_path: Path) -> None:
    """After max_restarts the retries at the backoff cap still go through the circuit: an
    open one holds them until its recovery timeout (one trial), not every `restart.max`.
    The last exit code stays visible while the instance runs again."""
    stack = make_stack(tmp_path, {"a": {
        "command": [PY, "-c", "import time; time.sleep(0.2); raise SystemExit(4)"],
        "restart": {"policy": "on-failure", "initial": "10ms", "max": "100ms",
                    "max_restarts": 1},
        "circuit_breaker": {"consecutive_failures": 2, "window": 0,
                            "recovery_timeout": "1500ms"}}},
        deploy={"rollback_on_failure": False})
    await engine.submit(stack)
    starts: list[float] = []
    running_exit_codes = []
    deadline = time.monotonic() + 6.0
    while time.monotonic() < deadline:
        recs = await engine.instances("t") if engine.stacks_state.get("t") else []
        events = [e for e in await engine.store.list_events(stack="t")
                  if e.kind == "instance.started"]
        starts = [e.ts for e in events]
        if recs and recs[0].state is InstanceState.READY and recs[0].restarts:
            running_exit_codes.append(recs[0].exit_code)
        await asyncio.sleep(0.05)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # the first restart within backoff; later ones held by the open circuit ~1.5 s each
    assert len(starts) >= 3, gaps
    assert all(gap >= 1.4 for gap in gaps[1:]), gaps
    assert 4 in running_exit_codes


async def test_giving_up_keeps_trying_at_the_backoff_cap(engine: Engine,
                                                         tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {"a": {
        "command": [PY, "-c", "raise SystemExit(4)"],
        "restart": {"policy": "on-failure", "initial": "10ms", "max": "300ms",
                    "max_restarts": 1},
        "circuit_breaker": {"enabled": False}}}, deploy={"rollback_on_failure": False})
    await engine.submit(stack)
    seen_failed = False
    for _ in range(100):
        rec = (await engine.instances("t"))[0] if engine.stacks_state.get("t") else None
        if rec is not None and rec.state is InstanceState.FAILED:
            seen_failed = True
            assert "gave up after" in rec.message
            assert rec.message.endswith("restarts; trying again every 300ms")
        if rec is not None and rec.restarts >= 3:
            break
        await asyncio.sleep(0.05)
    assert seen_failed and rec is not None and rec.restarts >= 3


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


async def test_dependents_react_when_a_dependency_is_lost(engine: Engine,
                                                          tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {
        "db": svc(restart={"policy": "always", "initial": "1500ms", "max": "1500ms"}),
        "frozen": svc(depends_on={"db": {"condition": "healthy", "on_lost": "pause"}}),
        "stopped": svc(depends_on={"db": {"condition": "healthy", "on_lost": "stop"}}),
        "fresh": svc(depends_on={"db": {"condition": "healthy", "on_lost": "restart"}}),
        "calm": svc(depends_on={"db": "healthy"}),  # on_lost: ignore
    })
    assert (await engine.apply(stack)).ok
    before = {r.service: r.pid for r in await engine.instances("t")}
    os.kill(before["db"], 9)
    for _ in range(100):
        rec = {r.service: r for r in await engine.instances("t")}
        if rec["frozen"].state is InstanceState.PAUSED and (
                rec["stopped"].state is InstanceState.STOPPED):
            break
        await asyncio.sleep(0.02)
    assert rec["frozen"].state is InstanceState.PAUSED
    assert proc_state(before["frozen"]) == "T"  # really stopped by SIGSTOP
    assert rec["stopped"].state is InstanceState.STOPPED
    assert pids_alive([before["stopped"]]) == []
    assert rec["calm"].state is InstanceState.READY and rec["calm"].pid == before["calm"]
    for _ in range(200):  # db is restarted after 1.5 s; the reactions then end
        rec = {r.service: r for r in await engine.instances("t")}
        if all(r.state is InstanceState.READY for r in rec.values()) and (
                rec["fresh"].pid != before["fresh"]):
            break
        await asyncio.sleep(0.05)
    assert all(r.state is InstanceState.READY for r in rec.values()), rec
    assert rec["frozen"].pid == before["frozen"] and proc_state(before["frozen"]) != "T"
    assert rec["stopped"].pid != before["stopped"]
    assert rec["fresh"].pid != before["fresh"]  # restarted once db was back
    assert rec["calm"].pid == before["calm"]
    kinds = [e.kind for e in await engine.store.list_events(stack="t")]
    assert kinds.count("dependency.lost") == 3 and kinds.count("dependency.restored") == 3


async def test_partial_recovery_restarts_only_failed_services_and_dependents(
        engine: Engine, tmp_path: Path) -> None:
    marker = tmp_path / "b-can-start"
    code = (f"import os, sys, time; sys.exit(5) if not os.path.exists({str(marker)!r}) "
            "else time.sleep(60)")
    no_retry = {"policy": "on-failure", "max_restarts": 0, "keep_trying": False}
    stack = make_stack(tmp_path, {
        "a": svc(),
        "b": {"command": [PY, "-c", code], "restart": no_retry,
              "depends_on": {"a": "healthy"}},
        "c": svc(depends_on={"b": "started"}),
        "d": svc(depends_on={"a": "healthy"}),
    }, deploy={"rollback_on_failure": False})
    first = await engine.apply(stack)
    for _ in range(100):  # b has no probe: it "started", then exits 5 and gives up
        states = {r.service: r.state for r in await engine.instances("t")}
        if states.get("b") is InstanceState.FAILED:
            break
        await asyncio.sleep(0.05)
    assert states["b"] is InstanceState.FAILED, (first, states)
    before = {r.service: r.pid for r in await engine.instances("t")}
    marker.write_text("")
    result = await engine.recover("t")
    assert result["ok"] and result["recovered"] == ["b"] and result["restarted"] == ["c"]
    after = {r.service: r for r in await engine.instances("t")}
    assert all(r.state is InstanceState.READY for r in after.values())
    assert after["a"].pid == before["a"] and after["d"].pid == before["d"]  # left alone
    assert after["b"].pid != before["b"] and after["c"].pid != before.get("c")


async def test_history_and_rollback_of_one_service(engine: Engine, tmp_path: Path) -> None:
    def stack(level: str) -> Stack:
        return make_stack(tmp_path, {"a": svc(env={"LEVEL": level}), "b": svc()})

    assert (await engine.apply(stack("1"))).ok
    assert (await engine.apply(stack("2"))).ok
    b_pid = (await engine.instances("t", "b"))[0].pid
    history = await engine.history("t", "a")
    assert [(h["revision"], h["outcome"], h["current"]) for h in history] == [
        (1, "deployed", False), (2, "deployed", True)]
    assert history[1]["changed"] == ["env.LEVEL"]
    result = await engine.rollback("t", "a")
    assert result.ok and result.started == ["a"]
    history = await engine.history("t", "a")
    assert [(h["revision"], h["current"]) for h in history][-1] == (3, True)
    assert history[-1]["changed"] == ["env.LEVEL"]
    a_env = engine.stacks_state["t"].stack.services["a"].env
    assert a_env == {"LEVEL": "1"}
    assert (await engine.instances("t", "b"))[0].pid == b_pid  # b untouched
    again = await engine.rollback("t", "a", to=2)
    assert again.ok and engine.stacks_state["t"].stack.services["a"].env == {"LEVEL": "2"}
    with pytest.raises(InputError, match="has no revision 9"):
        await engine.rollback("t", "a", to=9)
    with pytest.raises(InputError, match="already runs revision"):
        await engine.rollback("t", "a", to=4)
    kinds = [o.kind for o in await engine.store.list_operations(stack="t")]
    assert kinds == ["apply", "apply", "rollback", "rollback"]


def whoami(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/whoami", timeout=5) as r:
        return r.read().decode()


async def test_exposed_service_is_balanced_behind_a_stable_address(
        engine: Engine, tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        expose = s.getsockname()[1]
    env_file = tmp_path / "client.env"
    stack = make_stack(tmp_path, {
        "api": svc(replicas=2, expose=expose,
                   restart={"policy": "always", "initial": "2s", "max": "2s"}),
        "client": svc("--env-out", str(env_file), depends_on={"api": "healthy"}),
    })
    assert (await engine.apply(stack)).ok
    env = json.loads(env_file.read_text())
    assert env["API_URL"] == f"http://127.0.0.1:{expose}" and env["API_PORT"] == str(expose)
    seen = [await asyncio.to_thread(whoami, expose) for _ in range(10)]
    assert set(seen) == {"api-1", "api-2"}
    # an instance dies: once its exit is seen the router drops it (a connection already
    # accepted by the dying process is the one case a client can see fail), and refused
    # connects are retried on another backend, so no client request fails meanwhile
    dead = (await engine.instances("t", "api"))[0].pid
    assert dead is not None
    os.kill(dead, 9)
    for _ in range(100):
        if not (await engine.instances("t", "api"))[0].state.alive:
            break
        await asyncio.sleep(0.01)
    seen = [await asyncio.to_thread(whoami, expose) for _ in range(20)]
    assert "api-2" in seen and len(seen) == 20
    text = generate_latest(engine.registry).decode()
    assert "shipyard_router_requests_total" in text and 'service="t/api"' in text
    await engine.down("t")
    with socket.socket() as s:  # the stable address is released with the stack (a
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # listener would still
        s.bind(("127.0.0.1", expose))  # clash; closed connections in TIME_WAIT do not)
        s.listen()


async def test_closing_the_engine_removes_its_empty_cgroups(tmp_path: Path) -> None:
    eng = Engine(EngineConfig(home=tmp_path / "home", stop_on_exit=True))
    async with eng:
        support = getattr(eng.runtime, "cgroup_support", None)
        if support is None or not support.enabled:
            pytest.skip("no cgroup permission here")
        assert (await eng.apply(make_stack(tmp_path, {"a": svc()}))).ok
        bases = list(support.bases)
        assert all(os.path.isdir(b) for b in bases)
    assert [b for b in bases if os.path.exists(b)] == []


async def test_exits_after_a_long_healthy_run_do_not_count_as_a_crash_loop(
        engine: Engine, tmp_path: Path) -> None:
    """Ten kills of different replicas, each after a healthy run longer than min_uptime:
    every one is restarted; the circuit stays closed and max_restarts is never reached."""
    stack = make_stack(tmp_path, {"a": svc(
        replicas=5,
        restart={"policy": "always", "initial": "10ms", "max": "10ms", "max_restarts": 1,
                 "min_uptime": "300ms"},
        circuit_breaker={"consecutive_failures": 2, "window": 4, "minimum_calls": 2})})
    assert (await engine.apply(stack)).ok
    for kill in range(10):
        await asyncio.sleep(0.35)  # longer than min_uptime: a good run
        victim = (await engine.instances("t"))[kill % 5]
        old = victim.pid
        assert old is not None
        os.kill(old, 9)
        for _ in range(200):
            if victim.pid != old and victim.state is InstanceState.READY:
                break
            await asyncio.sleep(0.02)
        assert victim.state is InstanceState.READY, victim.message
    assert sum(r.restarts for r in await engine.instances("t")) == 10
    kinds = [e.kind for e in await engine.store.list_events(stack="t")]
    assert "circuit.open" not in kinds and "instance.failed" not in kinds


async def test_revision_history_limit(engine: Engine, tmp_path: Path) -> None:
    for level in range(4):
        stack = make_stack(tmp_path, {"a": svc(env={"LEVEL": str(level)})},
                           deploy={"revision_history_limit": 2})
        assert (await engine.apply(stack)).ok
    assert [h["revision"] for h in await engine.history("t", "a")] == [3, 4]


async def test_transient_launch_failure_is_retried_and_permanent_one_is_not(
        engine: Engine, tmp_path: Path) -> None:
    """Out of file descriptors for real (RLIMIT_NOFILE lowered in this process until the
    first retry is announced): the start fails with EMFILE, is retried with backoff, and
    succeeds once the limit is back. A command that does not exist fails at once, without
    retries."""
    import logging
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    class RestoreOnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying in" in record.getMessage():
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    handler = RestoreOnRetry()
    logging.getLogger("shipyard.engine.instance").addHandler(handler)
    stack = make_stack(tmp_path, {"a": svc()})
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 1, hard))
    try:
        result = await engine.apply(stack)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        logging.getLogger("shipyard.engine.instance").removeHandler(handler)
    assert result.ok, result
    retries = [e.message for e in await engine.store.list_events(stack="t")
               if e.kind == "instance.launch-retry"]
    assert retries and "Too many open files" in retries[0], retries
    garbage = tmp_path / "not-a-program"  # executable bit, but no format exec knows
    garbage.write_bytes(b"\x00\x01\x02\x03")
    garbage.chmod(0o755)
    broken = make_stack(tmp_path, {"b": {"command": [str(garbage)], "restart": "no"}},
                        name="t2")
    result = await engine.apply(broken)
    assert not result.ok and "Exec format error" in result.failed["b"], result.failed
    kinds = [e.kind for e in await engine.store.list_events(stack="t2")]
    assert "instance.launch-retry" not in kinds


async def test_cpuset_auto_pins_each_instance_to_cores_of_its_own(engine: Engine,
                                                                  tmp_path: Path) -> None:
    cores = engine.local.cpusets.topology
    if len(cores.cores) < 2:
        pytest.skip("needs two cores")
    stack = make_stack(tmp_path, {"a": svc(replicas=2, resources={"cpu": 1, "cpuset": "auto"})})
    assert (await engine.apply(stack)).ok
    allowed = []
    for inst in await engine.instances("t", "a"):
        with open(f"/proc/{inst.pid}/status") as f:
            line = next(x for x in f if x.startswith("Cpus_allowed_list"))
        allowed.append(line.split()[1])
        assert inst.runtime["cpuset"] == allowed[-1]
    assert len(set(allowed)) == 2  # two instances, two different cores
    await engine.down("t")
    assert engine.local.cpusets.allocate_cpu("x/y-1", 2).cpuset  # all released again
