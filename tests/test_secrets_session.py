"""The scripted session of issue 11: a stack with secrets from the control plane's
environment, from a file and from Shipyard's store, deployed through a real `shipyard
server` and the CLI. Then every output is searched for the values — CLI stdout/stderr of
secret/up/ps/plan/validate/logs/events/down, every API answer (errors included), /metrics,
the bytes of every file in the home (state store, audit trail, secret store, logs), the
server's log, every process's command line — and they are found nowhere but in the
instances that use them (their environment, their secret file)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shipyard.api.client import Client, stack_document
from shipyard.spec.loader import load_stack
from tests.conftest import pids_alive

SHIPYARD = str(Path(sys.executable).parent / "shipyard")
PY = sys.executable
TOKEN = secrets.token_hex(8)
ENV_VALUE = f"envSecret-{TOKEN}"
STORED_VALUE = f"storedSecret-{TOKEN}"
FILE_VALUE = f"fileSecret-{TOKEN}"
VALUES = (ENV_VALUE, STORED_VALUE, FILE_VALUE)
SLEEP = "import time; print('up', flush=True); time.sleep(3600)"
LEAK = "import os, sys; sys.stderr.write('oops ' + os.environ['DB_PASSWORD']); sys.exit(1)"


def stack_yaml() -> str:
    return yaml.safe_dump({
        "name": "vault",
        "deploy": {"timeout": "30s"},
        "secrets": {"db_password": {"env": "SESSION_DB_PASSWORD"},
                    "api_token": {"stored": "api-token"},
                    "tls_key": {"file": "./tls.key"}},
        "services": {
            "app": {
                "command": [PY, "-c", SLEEP],
                "secrets": [{"name": "db_password", "env": "DB_PASSWORD"},
                            {"name": "api_token", "env": "API_TOKEN"},
                            {"name": "tls_key", "file": "/run/secrets/tls_key"}],
                "health": {"readiness": {"exec": [PY, "-c", "import os; assert "
                                                  "os.environ['DB_PASSWORD']"],
                                         "interval": "100ms"}},
                "stop": {"timeout": "3s"}},
            # its liveness probe prints the secret: the failure message must not carry it
            "leaky": {
                "command": [PY, "-c", SLEEP],
                "secrets": [{"name": "db_password", "env": "DB_PASSWORD"}],
                "restart": {"policy": "no"},
                "health": {"liveness": {"exec": [PY, "-c", LEAK], "initial_delay": "1s",
                                        "interval": "200ms", "failure_threshold": 1}},
                "stop": {"timeout": "3s"}},
            "plain": {"command": [PY, "-c", SLEEP], "stop": {"timeout": "3s"}},
        }})


class Session:
    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.project = tmp_path / "project"
        self.project.mkdir()
        (self.project / "shipyard.yaml").write_text(stack_yaml())
        (self.project / "tls.key").write_text(FILE_VALUE)
        self.server_log = tmp_path / "server.out"
        self.env = os.environ | {"SHIPYARD_HOME": str(self.home)}
        self.env.pop("SHIPYARD_DEBUG", None)
        self.outputs: dict[str, str] = {}  # what each command or answer said
        self.server: subprocess.Popen[bytes] | None = None

    def start_server(self) -> None:
        with open(self.server_log, "wb") as log:
            self.server = subprocess.Popen(
                [SHIPYARD, "server"], cwd=self.project, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, env=self.env | {"SESSION_DB_PASSWORD": ENV_VALUE})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.run("ps", record=False).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("the server did not answer")

    def run(self, *args: str, stdin: str | None = None,
            record: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([SHIPYARD, *args], cwd=self.project, env=self.env, text=True,
                              capture_output=True, timeout=60, input=stdin,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
        if record:
            self.outputs[f"$ shipyard {' '.join(args)}"] = done.stdout + done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def client(self) -> Client:
        return Client(self.home / "shipyard.sock")

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session(tmp_path)
    pids: list[int] = []
    try:
        yield s
    finally:
        if s.server is not None and s.server.poll() is None:  # never auto-start one
            with contextlib.suppress(Exception):
                with s.client() as client:
                    pids = [i["pid"] for i in client.instances() if i.get("pid")]
                s.run("down", record=False)
        s.stop()
        for pid in pids_alive(pids):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def assert_nowhere(where: str, text: str | bytes) -> None:
    for value in VALUES:
        needle: Any = value.encode() if isinstance(text, bytes) else value
        assert needle not in text, f"secret value found in {where}"


def test_secrets_reach_their_instances_and_nothing_else(session: Session) -> None:
    session.start_server()
    # -- the store: the value from stdin, through the server (audited) ------------------
    done = session.run("secret", "set", "api-token", stdin=STORED_VALUE + "\n")
    assert done.returncode == 0, done.stderr
    assert "secret api-token stored" in done.stderr
    listed = session.run("secret", "ls")
    assert listed.returncode == 0 and listed.stdout.split()[0] == "api-token"
    # -- deploy, and every read command -------------------------------------------------
    assert session.run("validate").returncode == 0
    plan = session.run("plan")
    assert plan.returncode == 0, plan.stderr
    up = session.run("up", "-d")
    assert up.returncode == 0, up.stdout + up.stderr
    with session.client() as client:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # leaky's liveness fails after its delay
            events = client.events(stack="vault", limit=10000)
            if any(e["kind"] == "instance.unhealthy" for e in events):
                break
            time.sleep(0.1)
        instances = {i["service"]: i for i in client.instances(stack="vault")}
        unhealthy = [e["message"] for e in events if e["kind"] == "instance.unhealthy"]
    assert unhealthy and "<secret:db_password>" in unhealthy[0], unhealthy
    for args in (("ps",), ("ps", "-o", "json"), ("logs", "app"), ("logs", "leaky"),
                 ("events",), ("events", "-o", "json"), ("plan",), ("secret", "ls", "-o",
                                                                     "json"),
                 ("audit",), ("history", "app")):
        done = session.run(*args)
        assert done.returncode == 0, (args, done.stderr)
    # -- the API, answers and errors ------------------------------------------------------
    document = stack_document(load_stack(session.project / "shipyard.yaml"))
    bad = dict(document, services={"x": {"command": ["true"],
                                         "stop": {"signal": ENV_VALUE}}})
    with session.client() as client:
        http = client._http
        for path in ("/v1/stacks", "/v1/stacks/vault", "/v1/instances?stack=vault",
                     "/v1/events?limit=10000", "/v1/operations", "/v1/secrets", "/v1/audit",
                     "/metrics", "/openapi.json", "/v1/stacks/vault/logs", "/healthz"):
            answer = http.get(path)
            assert answer.status_code == 200, (path, answer.text)
            session.outputs[f"GET {path}"] = answer.text
        refused = http.post("/v1/plan", json={"stack": bad})  # the value quoted back...
        assert refused.status_code == 400 and "<secret:db_password>" in refused.text
        session.outputs["POST /v1/plan (bad)"] = refused.text
        for method, path, body in (("PUT", "/v1/secrets/Bad", {"value": STORED_VALUE}),
                                   ("PUT", "/v1/secrets/x", {"value": STORED_VALUE, "y": 1}),
                                   ("PUT", "/v1/secrets/x", [STORED_VALUE])):
            answer = http.request(method, path, json=body)
            assert answer.status_code == 400, answer.text
            session.outputs[f"{method} {path} {body!r}"] = answer.text
        assert "vault" in http.get("/v1/stacks").text
    # -- the instances: theirs, and only theirs ------------------------------------------
    app, leaky, plain = (instances[s] for s in ("app", "leaky", "plain"))
    env = environ_of(app["pid"])
    assert env["DB_PASSWORD"] == ENV_VALUE and env["API_TOKEN"] == STORED_VALUE
    secret_file = Path(env["TLS_KEY_FILE"])
    assert secret_file.read_text() == FILE_VALUE
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert secret_file.is_relative_to(session.home / "run" / "vault")
    assert "SESSION_DB_PASSWORD" not in env  # the source variable is not inherited
    assert leaky["state"] == "failed"
    assert_nowhere("the environment of an instance without secrets",
                   Path(f"/proc/{plain['pid']}/environ").read_bytes())
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert_nowhere("ps", ps)
    # -- down: the secret files go with the instances -----------------------------------
    down = session.run("down")
    assert down.returncode == 0, down.stderr
    assert not secret_file.exists() and not secret_file.parent.exists()
    # -- every output, the server's log, every file of the home ---------------------------
    for where, text in session.outputs.items():
        assert_nowhere(where, text)
    session.stop()
    assert_nowhere("the server's log", session.server_log.read_bytes())
    files = [p for p in session.home.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"state.db", "audit.db", "secrets.db", "secrets.key"} <= names, names
    for path in files:
        assert_nowhere(str(path), path.read_bytes())
