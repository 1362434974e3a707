"""The example platform's services (examples/platform), run by hand without the orchestrator.

Each service is a real process started with this interpreter and given, through its
environment, the variables the orchestrator would inject (`PORT`, `DB_URL`, ...) on free
ports of 127.0.0.1. The tests check what the stack file relies on: /ready turns 200 only
once the dependencies answer, migrate runs to completion and exits 0, requests round-trip
through db, and SIGTERM makes every service exit 0 promptly, leaving nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shipyard.spec.models import Stack

PLATFORM = Path(__file__).resolve().parent.parent / "examples" / "platform"
STOP_WITHIN = 2.0  # seconds a service may take to exit after SIGTERM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: Any = None, token: str | None = None,
         timeout: float = 2.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as exc:
        with exc:
            raw, status = exc.read(), exc.code
    return status, json.loads(raw) if raw else None


def group_gone(pgid: int) -> bool:
    """True when no process is left in process group `pgid` (zombies aside: all reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


class Service:
    """One service process, its port and its log."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, port: int | None,
                 log: Path) -> None:
        self.proc, self.name, self.port, self.log = proc, name, port, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready_status(self) -> int:
        try:
            return http("GET", self.url + "/ready", timeout=1.0)[0]
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.output()}"
            if self.ready_status() == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready after {timeout}s:\n{self.output()}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s:\n"
                                 f"{self.output()}") from None

    def terminate(self) -> int:
        """SIGTERM; the exit status, which must come within STOP_WITHIN seconds."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait_exit(STOP_WITHIN)
        assert time.monotonic() - started < STOP_WITHIN
        return code


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Any]:
    """`launch(name, env={...})` starts services/<file>.py as the orchestrator would;
    whatever is still running at the end is killed, and fails the test."""
    started: list[Service] = []

    def start(name: str, *, file: str | None = None, env: dict[str, str] | None = None,
              args: list[str] | None = None, port: bool = True, replica: int = 1
              ) -> Service:
        number = free_port() if port else None
        environ = {k: v for k, v in os.environ.items()
                   if not k.endswith(("_URL", "_URLS", "_PORT")) and k != "PORT"}
        environ.update({"SHIPYARD_SERVICE": name, "SHIPYARD_INSTANCE": f"{name}-{replica}",
                        "PYTHONDONTWRITEBYTECODE": "1"})
        if number is not None:
            environ.update({"PORT": str(number), "PORT_HTTP": str(number)})
        environ.update(env or {})
        argv = [sys.executable, "-u", f"services/{file or name}.py", *(args or [])]
        if number is not None:
            argv += ["--port", str(number)]
        log = tmp_path / f"{name}-{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=PLATFORM, env=environ, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        service = Service(proc, name, number, log)
        started.append(service)
        return service

    yield start
    leftovers = [s for s in started if s.proc.poll() is None or not group_gone(s.proc.pid)]
    for service in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.proc.pid, signal.SIGKILL)
        service.proc.wait(5)
    assert not leftovers, f"left running: {[s.name for s in leftovers]}"


def dep(service: Service, name: str) -> dict[str, str]:
    """The variables the orchestrator injects for dependency `name` served by `service`."""
    key = name.upper()
    return {f"{key}_URL": service.url, f"{key}_HOST": "127.0.0.1",
            f"{key}_PORT": str(service.port)}


# -- the stack file --------------------------------------------------------------------


def test_stack_file_validates_and_names_existing_programs() -> None:
    data = yaml.safe_load((PLATFORM / "shipyard.yaml").read_text())
    stack = Stack.model_validate(data)
    assert stack.name == "platform"
    assert len(stack.services) >= 12
    for name, service in stack.services.items():
        assert service.command is not None
        assert service.command[0] == "python3", name
        script = next(arg for arg in service.command if arg.endswith(".py"))
        assert (PLATFORM / script).is_file(), f"{name}: {script} missing"
        for needed in service.depends_on:
            assert needed in stack.services, f"{name} depends on unknown {needed}"
        if service.ports:
            assert service.health.readiness is not None, name
            assert service.command[-2:] == ["--port", "${PORT}"], name
    assert stack.services["migrate"].one_shot
    assert stack.services["api"].replicas == 2


# -- db, migrate, api --------------------------------------------------------------------


def test_db_migrate_api_round_trip_and_graceful_stop(launch: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    db = launch("db", args=["--data-dir", str(data)])
    db.wait_ready()

    # api before migrate: up, but not ready (its schema is not there yet)
    api = launch("api", env=dep(db, "db"))
    deadline = time.monotonic() + 5
    while (status := api.ready_status()) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 503
    assert "schema" in json.dumps(http("GET", api.url + "/ready")[1])

    migrate = launch("migrate", env=dep(db, "db"), port=False)
    assert migrate.wait_exit(10) == 0, migrate.output()
    assert "done: schema version" in migrate.output()
    api.wait_ready()

    # a write through api lands in db; a read through api comes back from db
    status, body = http("PUT", api.url + "/api/items/greeting", {"value": {"text": "hi"}})
    assert (status, body["value"]) == (200, {"text": "hi"})
    assert http("GET", db.url + "/kv/items/greeting") == (
        200, {"key": "items/greeting", "value": {"text": "hi"}})
    status, body = http("GET", api.url + "/api/items/greeting")
    assert (status, body["value"], body["source"]) == (200, {"text": "hi"}, "db")
    assert http("GET", api.url + "/api/items/welcome")[0] == 200  # seeded by migrate
    assert http("GET", api.url + "/api/items/nothing")[0] == 404
    assert "greeting" in http("GET", api.url + "/api/items")[1]["items"]
    assert http("POST", api.url + "/api/jobs", {"kind": "sum"})[0] == 503  # no queue

    # each request is logged, and so is the start
    assert "started: listening on http://127.0.0.1:" in api.output()
    assert '"PUT /api/items/greeting" 200' in api.output()

    # db stops first: api stays alive but is no longer ready
    assert db.terminate() == 0
    assert "stopped" in db.output()
    assert api.proc.poll() is None
    assert api.ready_status() == 503
    assert api.terminate() == 0
    assert all(group_gone(s.proc.pid) for s in (db, api, migrate))

    # db wrote its data on the way out, and reads it back on the next start
    saved = json.loads((data / "db.json").read_text())["data"]
    assert saved["items/greeting"][0] == {"text": "hi"}
    assert saved["schema/version"][0] >= 1
    again = launch("db", args=["--data-dir", str(data)])
    again.wait_ready()
    assert http("GET", again.url + "/kv/items/greeting")[1]["value"] == {"text": "hi"}
    assert again.terminate() == 0


def test_migrate_is_idempotent_and_fails_without_db(launch: Any, tmp_path: Path) -> None:
    db = launch("db", args=["--data-dir", str(tmp_path / "data")])
    db.wait_ready()
    first = launch("migrate", env=dep(db, "db"), port=False)
    assert first.wait_exit(10) == 0, first.output()
    version = http("GET", db.url + "/kv/schema/version")[1]["value"]
    second = launch("migrate", env=dep(db, "db"), port=False)
    assert second.wait_exit(10) == 0, second.output()
    assert "nothing to do" in second.output()
    assert http("GET", db.url + "/kv/schema/version")[1]["value"] == version
    assert db.terminate() == 0

    # nothing listens there any more: migrate gives up after --wait and exits 1
    lost = launch("migrate", env=dep(db, "db"), args=["--wait", "0.5"], port=False)
    assert lost.wait_exit(10) == 1
    assert "did not answer" in lost.output()


def test_api_writes_need_a_token_from_auth(launch: Any, tmp_path: Path) -> None:
    db = launch("db", args=["--data-dir", str(tmp_path / "data")])
    config = launch("config")
    cache = launch("cache")
    for service in (db, config, cache):
        service.wait_ready()
    assert launch("migrate", env=dep(db, "db"), port=False).wait_exit(10) == 0
    auth = launch("auth", env={**dep(db, "db"), **dep(config, "config")})
    auth.wait_ready()
    api = launch("api", env={**dep(db, "db"), **dep(cache, "cache"), **dep(auth, "auth")})
    api.wait_ready()

    assert http("PUT", api.url + "/api/items/x", {"value": 1})[0] == 401
    assert http("POST", auth.url + "/token", {"user": "demo", "password": "nope"})[0] == 401
    status, body = http("POST", auth.url + "/token", {"user": "demo", "password": "demo"})
    assert status == 200, body
    token = body["token"]
    assert http("GET", auth.url + "/validate", token=token)[1]["user"] == "demo"
    assert http("GET", auth.url + "/validate", token=token[:-4] + "AAAA")[0] == 401

    assert http("PUT", api.url + "/api/items/x", {"value": 1}, token=token)[0] == 200
    assert http("GET", api.url + "/api/items/x")[1]["source"] == "db"
    assert http("GET", api.url + "/api/items/x")[1]["source"] == "cache"
    assert http("PUT", api.url + "/api/items/x", {"value": 2}, token=token)[0] == 200
    assert http("GET", api.url + "/api/items/x")[1] == {  # the write invalidated the cache
        "key": "x", "value": 2, "source": "db", "instance": "api-1"}

    for service in (api, auth, cache, config, db):
        assert service.terminate() == 0, service.output()


def test_jobs_flow_from_api_through_queue_to_a_worker(launch: Any, tmp_path: Path) -> None:
    db = launch("db", args=["--data-dir", str(tmp_path / "data")])
    queue = launch("queue", file="jobqueue")
    for service in (db, queue):
        service.wait_ready()
    assert launch("migrate", env=dep(db, "db"), port=False).wait_exit(10) == 0
    worker = launch("worker", env={**dep(db, "db"), **dep(queue, "queue")})
    api = launch("api", env={**dep(db, "db"), **dep(queue, "queue")})
    for service in (worker, api):
        service.wait_ready()

    submitted = [http("POST", api.url + "/api/jobs", job)[1]["id"]
                 for job in ({"kind": "sum", "numbers": [1, 2, 3]}, {"kind": "fail"})]
    records: dict[str, Any] = {}
    deadline = time.monotonic() + 5
    while len(records) < 2 and time.monotonic() < deadline:
        for job_id in submitted:
            record = http("GET", api.url + f"/api/jobs/{job_id}")[1]
            if record["status"] != "queued":
                records[job_id] = record
        time.sleep(0.05)
    done, failed = (records[job_id] for job_id in submitted)
    assert (done["status"], done["result"], done["worker"]) == ("done", {"sum": 6}, "worker-1")
    assert (failed["status"], failed["error"]) == ("failed", "failed on purpose")
    stats = http("GET", api.url + "/api/stats")[1]
    assert (stats["jobs_done"], stats["jobs_failed"], stats["queue_length"]) == (1, 1, 0)

    for service in (api, worker, queue, db):
        assert service.terminate() == 0, service.output()


def test_gateway_fails_over_between_api_replicas(launch: Any, tmp_path: Path) -> None:
    db = launch("db", args=["--data-dir", str(tmp_path / "data")])
    config = launch("config")
    for service in (db, config):
        service.wait_ready()
    assert launch("migrate", env=dep(db, "db"), port=False).wait_exit(10) == 0
    auth = launch("auth", env={**dep(db, "db"), **dep(config, "config")})
    replicas = [launch("api", env=dep(db, "db"), replica=n) for n in (1, 2)]
    for service in (auth, *replicas):
        service.wait_ready()
    urls = ",".join(replica.url for replica in replicas)
    gateway = launch("gateway", args=["--retry-for", "0.3"],
                     env={"API_URLS": urls, **dep(auth, "auth")})
    gateway.wait_ready()

    status, body = http("POST", gateway.url + "/auth/token", {"user": "demo", "password": "demo"})
    assert status == 200 and body["user"] == "demo"
    assert http("GET", gateway.url + "/api/items/welcome")[0] == 200

    # one replica goes away: every request still gets an answer, from the other one
    assert replicas[0].terminate() == 0
    for _ in range(4):
        status, body = http("GET", gateway.url + "/api/items/welcome")
        assert (status, body["instance"]) == (200, "api-2")
    assert http("GET", replicas[1].url + "/health")[0] == 200
    # the last one too: 502 after --retry-for, and the gateway is no longer ready
    assert replicas[1].terminate() == 0
    status, body = http("GET", gateway.url + "/api/items/welcome")
    assert status == 502 and "unavailable" in body["error"]
    assert gateway.ready_status() == 503

    for service in (gateway, auth, config, db):
        assert service.terminate() == 0, service.output()
