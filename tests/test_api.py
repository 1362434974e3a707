"""The REST API: in-process (ASGI) against a real engine, and served for real on the unix
socket, with real processes (`python -m http.server`) behind it."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import stat
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard import Engine, EngineConfig
from shipyard.api.app import create_app
from shipyard.api.client import Client, ServerNotRunning, stack_document
from shipyard.api.models import error_body, error_from_body, error_status
from shipyard.api.server import ServerRunning, open_listeners, parse_tcp, serve
from shipyard.errors import (
    InputError,
    Issue,
    NotFoundError,
    PlanError,
    ShipyardError,
    SpecError,
    StoreError,
)
from shipyard.spec.models import Stack
from tests.conftest import pids_alive

PY = sys.executable
INSTANCE_KEYS = {"service", "instance", "state", "ready", "pid", "ports", "restarts",
                 "exit_code", "revision", "health", "message", "started_at"}


def http_service(**fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "command": [PY, "-m", "http.server", "${PORT}", "--bind", "127.0.0.1"],
        "ports": {"http": "auto"},
        "health": {"readiness": {"http": "/", "interval": "100ms", "timeout": "1s"}},
        "stop": {"timeout": "3s"},
    }
    return spec | fields


def make_stack(tmp_path: Path, services: dict[str, Any] | None = None,
               name: str = "web") -> Stack:
    base = random.randrange(12000, 19900, 100)  # below the per-worker ranges (conftest)
    services = services or {"db": http_service(),
                            "api": http_service(replicas=2, depends_on={"db": "healthy"})}
    doc = {"name": name, "ports": {"range": f"{base}-{base + 99}"},
           "deploy": {"timeout": "20s"}, "services": services}
    return Stack.model_validate(doc | {"base_dir": str(tmp_path),
                                       "source": str(tmp_path / "shipyard.yaml")})


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine(EngineConfig(home=tmp_path / "h", stop_on_exit=True)) as eng:
        yield eng


@pytest.fixture
async def api(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(engine), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as client:
        yield client


def assert_error(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["kind"] == kind
    assert body["exit_code"] == (1 if status >= 409 and status != 422 else 2)
    assert body["error"] and "Traceback" not in response.text
    return body


# -- in-process, against a real engine -----------------------------------------------------

async def test_meta_routes(api: httpx.AsyncClient) -> None:
    health = (await api.get("/healthz")).json()
    assert health["status"] == "ok" and health["pid"] == os.getpid()
    metrics = await api.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "shipyard_instances" in metrics.text
    paths = (await api.get("/openapi.json")).json()["paths"]
    for path in ("/v1/stacks", "/v1/plan", "/v1/stacks/{name}", "/v1/instances",
                 "/v1/events", "/v1/stacks/{name}/logs"):
        assert path in paths


async def test_apply_inspect_and_down(api: httpx.AsyncClient, engine: Engine,
                                      tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    plan = (await api.post("/v1/plan", json={"stack": stack_document(stack)})).json()
    assert plan["phases"] == [["db"], ["api"]]
    assert {c["service"]: c["action"] for c in plan["changes"]} == {"db": "add", "api": "add"}

    response = await api.post("/v1/stacks", json={"stack": stack_document(stack),
                                                  "wait": True})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["ok"] and sorted(result["started"]) == ["api", "db"]

    [summary] = (await api.get("/v1/stacks")).json()
    assert summary | {"instances": 3, "ready": 3} == summary
    detail = (await api.get("/v1/stacks/web")).json()
    assert detail["spec"]["name"] == "web" and len(detail["instance_records"]) == 3

    instances = (await api.get("/v1/instances", params={"stack": "web"})).json()
    assert [i["instance"] for i in instances] == ["api-1", "api-2", "db-1"]
    for inst in instances:
        assert set(inst) >= INSTANCE_KEYS
        assert inst["state"] == "ready" and inst["ready"] and inst["ports"]["http"]
    pids = [i["pid"] for i in instances]
    assert pids_alive(pids) == pids
    only_api = (await api.get("/v1/instances", params={"stack": "web",
                                                       "service": "api"})).json()
    assert {i["service"] for i in only_api} == {"api"}

    events = (await api.get("/v1/events", params={"stack": "web"})).json()
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "op.queued" and "deploy.started" in kinds and "deploy.finished" in kinds
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    db_events = (await api.get("/v1/events", params={"stack": "web",
                                                     "service": "db"})).json()
    assert db_events and {e["service"] for e in db_events} == {"db"}
    later = (await api.get("/v1/events", params={"after": events[-2]["seq"]})).json()
    assert [e["seq"] for e in later] == [events[-1]["seq"]]

    # http.server logs every readiness probe: each instance has lines by now
    text = (await api.get("/v1/stacks/web/logs", params={"tail": 1})).text
    lines = text.splitlines()
    assert [line.split(" | ")[0].strip() for line in lines] == ["api-1", "api-2", "db-1"]
    assert all('"GET / HTTP/1.1" 200' in line for line in lines)
    db_log = (await api.get("/v1/stacks/web/logs", params={"service": "db"})).text
    assert db_log and all(line.startswith("db-1 | ") for line in db_log.splitlines())

    assert (await api.delete("/v1/stacks/web")).json() == {"stack": "web", "status": "down"}
    assert pids_alive(pids) == []
    assert (await api.get("/v1/stacks")).json() == []
    assert_error(await api.get("/v1/stacks/web"), 404, "NotFoundError")


async def test_submit_returns_the_plan_at_once(api: httpx.AsyncClient,
                                               tmp_path: Path) -> None:
    stack = make_stack(tmp_path, {"solo": http_service()}, name="bg")
    response = await api.post("/v1/stacks", json={"stack": stack_document(stack)})
    assert response.status_code == 202, response.text
    submitted = response.json()
    assert submitted["phases"] == [["solo"]] and submitted["events_after"] >= 0
    result = (await api.get("/v1/stacks/bg/deploy")).json()
    assert result["ok"] and result["started"] == ["solo"]
    events = (await api.get("/v1/events", params={"after": submitted["events_after"]})).json()
    assert events[0]["kind"] == "op.queued"


async def test_failed_deploy_answers_200_with_ok_false(api: httpx.AsyncClient,
                                                       tmp_path: Path) -> None:
    crash = http_service(command=[PY, "-c", "raise SystemExit(3)"], restart="no")
    stack = make_stack(tmp_path, {"bad": crash}, name="bad")
    response = await api.post("/v1/stacks", json={"stack": stack_document(stack),
                                                  "wait": True})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["ok"] is False and "bad" in result["failed"]


async def test_errors_are_json_with_exit_codes(api: httpx.AsyncClient,
                                               tmp_path: Path) -> None:
    bad_doc = {"name": "Bad Name", "services": {}}
    body = assert_error(await api.post("/v1/stacks", json={"stack": bad_doc}), 400,
                        "SpecError")
    assert {i["path"] for i in body["issues"]} == {"name", "services"}
    cycle = make_stack(tmp_path, {"a": http_service(depends_on={"b": "started"}),
                                  "b": http_service(depends_on={"a": "started"})})
    assert_error(await api.post("/v1/plan", json={"stack": stack_document(cycle)}), 400,
                 "PlanError")
    missing = make_stack(tmp_path, {"x": {"command": ["no-such-command-xyz"]}})
    body = assert_error(await api.post("/v1/stacks", json={"stack": stack_document(missing)}),
                        400, "PlanError")
    assert "no-such-command-xyz" in body["error"]
    malformed = assert_error(await api.post("/v1/stacks", json={"nope": 1}), 422, "InputError")
    assert {tuple(d["loc"]) for d in malformed["details"]} >= {("body", "stack")}
    assert_error(await api.delete("/v1/stacks/ghost"), 404, "NotFoundError")
    assert_error(await api.get("/v1/stacks/ghost/logs"), 404, "NotFoundError")
    assert_error(await api.get("/v1/instances", params={"stack": "ghost"}), 404,
                 "NotFoundError")
    assert_error(await api.get("/v1/no-such-route"), 404, "NotFoundError")
    assert_error(await api.get("/v1/events", params={"after": -1}), 422, "InputError")


# -- errors over the wire ------------------------------------------------------------------

@pytest.mark.parametrize("exc, status", [
    (SpecError([Issue("services.api.ports", "expected a number", "s.yaml", 7)]), 400),
    (PlanError("cycle: a -> b -> a"), 400),
    (NotFoundError("no stack named x", hint="known: y"), 404),
    (InputError("bad"), 400),
    (StoreError("locked"), 500),
    (ShipyardError("it failed", hint="look"), 409),
])
def test_errors_round_trip(exc: ShipyardError, status: int) -> None:
    assert error_status(exc) == status
    back = error_from_body(error_body(exc), status)
    assert type(back) is type(exc)
    assert (back.message, back.hint, back.exit_code) == (exc.message, exc.hint, exc.exit_code)
    if isinstance(exc, SpecError):
        assert isinstance(back, SpecError) and back.issues == exc.issues


def test_unknown_error_bodies_keep_their_exit_code() -> None:
    assert type(error_from_body({"error": "x"}, 404)) is NotFoundError
    assert error_from_body({"error": "x", "exit_code": 2}, 422).exit_code == 2
    assert error_from_body({}, 502).exit_code == 1


# -- listeners -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8600", ("127.0.0.1", 8600)), (":8600", ("127.0.0.1", 8600)),
    ("8600", ("127.0.0.1", 8600)), ("localhost:1", ("localhost", 1)),
    ("[::1]:9000", ("::1", 9000)), ("127.1.2.3:0", ("127.1.2.3", 0)),
])
def test_parse_tcp_accepts_loopback(text: str, expected: tuple[str, int]) -> None:
    assert parse_tcp(text) == expected


@pytest.mark.parametrize("text", ["0.0.0.0:8600", "192.168.1.5:80", "example.com:80",
                                  "[::]:80", "127.0.0.1:http", "127.0.0.1:70000"])
def test_parse_tcp_refuses_the_rest(text: str) -> None:
    with pytest.raises(InputError):
        parse_tcp(text)


def test_listeners_own_the_home(tmp_path: Path) -> None:
    path = tmp_path / "shipyard.sock"
    first = open_listeners(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(ServerRunning, match="already running"):
            open_listeners(path)
    finally:
        first.close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(InputError, match="not a socket"):
        open_listeners(path)


def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "shipyard.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    listeners = open_listeners(path)
    listeners.close()
    other_home = tmp_path / "other"
    other_home.mkdir()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(other_home / "shipyard.sock"))
    live.listen()
    try:
        with pytest.raises(ServerRunning):
            open_listeners(other_home / "shipyard.sock")
    finally:
        live.close()


def test_tcp_listener_on_loopback(tmp_path: Path) -> None:
    listeners = open_listeners(tmp_path / "s.sock", "127.0.0.1:0")
    try:
        assert listeners.tcp_address is not None
        host, port = listeners.tcp_address
        assert host == "127.0.0.1" and port > 0
    finally:
        listeners.close()


# -- the real server on its unix socket -----------------------------------------------------

def collect(items: Iterator[Any], until: Any, out: list[Any]) -> None:
    for item in items:
        out.append(item)
        if until(item):
            return


async def test_served_on_the_unix_socket(engine: Engine, tmp_path: Path) -> None:
    sock = engine.config.socket_path
    with pytest.raises(ServerNotRunning) as info:
        Client(sock).health()
    assert "`shipyard up -d`" in info.value.render() and info.value.exit_code == 1
    stop = asyncio.Event()
    ready = asyncio.Event()
    server = asyncio.create_task(serve(engine, socket_path=sock, stop=stop,
                                       on_ready=lambda _: ready.set()))
    await asyncio.wait_for(ready.wait(), 10)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    client = Client(sock)
    try:
        assert (await asyncio.to_thread(client.health))["status"] == "ok"
        after = await asyncio.to_thread(client.latest_event)
        seen: list[dict[str, Any]] = []
        watcher = threading.Thread(target=collect, args=(
            client.follow_events(after=after, stack="web"),
            lambda e: e["kind"] == "deploy.finished", seen))
        watcher.start()
        result = await asyncio.to_thread(client.apply, make_stack(tmp_path))
        assert result.ok
        await asyncio.to_thread(watcher.join, 10)
        assert seen[0]["kind"] == "op.queued" and seen[-1]["kind"] == "deploy.finished"

        with pytest.raises(NotFoundError, match="no stack named ghost"):
            await asyncio.to_thread(client.down, "ghost")
        lines: list[str] = []
        follower = threading.Thread(target=collect, args=(
            client.follow_logs("web", "db", tail=0), lambda _: True, lines))
        follower.start()  # a probe request is logged within ~100ms
        await asyncio.to_thread(follower.join, 10)
        assert lines and lines[0].startswith("db-1 | ")

        # an open follow must not hold the shutdown up
        endless: list[dict[str, Any]] = []
        hanging = threading.Thread(target=collect, args=(
            Client(sock).follow_events(after=0), lambda _: False, endless), daemon=True)
        hanging.start()
        await asyncio.sleep(0.3)
    finally:
        client.close()
        stop.set()
        await asyncio.wait_for(server, 10)
    await asyncio.to_thread(hanging.join, 5)
    assert not hanging.is_alive() and endless
    assert not sock.exists()


async def test_restart_and_the_operation_queue(api: httpx.AsyncClient, engine: Engine,
                                               tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    body = {"stack": stack_document(stack), "wait": True, "priority": "high"}
    assert (await api.post("/v1/stacks", json=body)).json()["ok"]
    before = {i["instance"]: i["pid"] for i in
              (await api.get("/v1/instances", params={"stack": "web"})).json()}
    restarted = await api.post("/v1/stacks/web/services/api/restart", json={"rolling": True})
    assert restarted.status_code == 200, restarted.text
    assert restarted.json()["restarted"] == ["api-1", "api-2"]
    after = {i["instance"]: i["pid"] for i in
             (await api.get("/v1/instances", params={"stack": "web"})).json()}
    assert after["api-1"] != before["api-1"] and after["db-1"] == before["db-1"]
    ops = (await api.get("/v1/operations", params={"stack": "web"})).json()
    assert [(o["kind"], o["state"], o["priority"]) for o in ops] == [
        ("apply", "succeeded", "high"), ("restart", "succeeded", "normal")]
    assert "payload" not in ops[0]
    one = (await api.get(f"/v1/operations/{ops[1]['id']}")).json()
    assert one["checkpoint"] == {"done": ["api-1", "api-2"]}
    running = (await api.get("/v1/operations", params={"state": ["queued", "running"]})).json()
    assert running == []
    assert_error(await api.get("/v1/operations/999"), 404, "NotFoundError")
    assert_error(await api.post("/v1/stacks/web/services/nope/restart", json={}), 404,
                 "NotFoundError")
    bad = await api.post("/v1/stacks/web/services/api/restart", json={"priority": "urgent"})
    assert bad.status_code == 422 and bad.json()["details"][0]["loc"] == ["body", "priority"]


async def test_overload_answers_busy_503(api: httpx.AsyncClient, engine: Engine,
                                         tmp_path: Path) -> None:
    engine.ops.max_queued = 0  # any normal-priority work is now refused
    body = {"stack": stack_document(make_stack(tmp_path)), "wait": False}
    error = assert_error(await api.post("/v1/stacks", json=body), 503, "Busy")
    assert "busy" in error["error"] and error["hint"] == "retry later"
    assert await engine.store.list_operations() == []


async def test_recover_with_nothing_failed(api: httpx.AsyncClient, tmp_path: Path) -> None:
    body = {"stack": stack_document(make_stack(tmp_path)), "wait": True}
    assert (await api.post("/v1/stacks", json=body)).json()["ok"]
    done = (await api.post("/v1/stacks/web/recover")).json()
    assert done == {"ok": True, "recovered": [], "restarted": []}
    assert_error(await api.post("/v1/stacks/ghost/recover"), 404, "NotFoundError")
