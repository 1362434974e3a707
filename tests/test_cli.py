"""The `shipyard` command as users run it: the installed console script in a subprocess,
with its own $SHIPYARD_HOME, real servers and real processes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import pids_alive

SHIPYARD = str(Path(sys.executable).parent / "shipyard")
PY = sys.executable


def stack_yaml(name: str = "demo", *, crash: bool = False) -> str:
    base = random.randrange(12000, 19900, 100)  # below the per-worker ranges (conftest)
    server = f'[{PY}, -m, http.server, "${{PORT}}", --bind, 127.0.0.1]'
    api_command = f'[{PY}, -c, "raise SystemExit(3)"]' if crash else server
    return f"""\
name: {name}
deploy: {{timeout: 20s}}
ports: {{range: {base}-{base + 99}}}
services:
  db:
    command: {server}
    ports: {{http: auto}}
    health:
      readiness: {{http: /, interval: 100ms, timeout: 1s}}
    stop: {{timeout: 3s}}
  api:
    command: {api_command}
    replicas: 2
    restart: {{policy: "no"}}
    depends_on: {{db: healthy}}
    ports: {{http: auto}}
    health:
      readiness: {{http: /, interval: 100ms, timeout: 1s}}
    stop: {{timeout: 3s}}
"""


class Shipyard:
    """Runs the console script in `cwd` with `home` as $SHIPYARD_HOME."""

    def __init__(self, home: Path, cwd: Path) -> None:
        self.home = home
        self.cwd = cwd
        self.env = os.environ | {"SHIPYARD_HOME": str(home)}
        self.env.pop("SHIPYARD_DEBUG", None)
        self.pids: set[int] = set()  # every instance pid seen, killed at teardown

    def __call__(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([SHIPYARD, *args], cwd=self.cwd, env=self.env, text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([SHIPYARD, *args], cwd=self.cwd, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)

    def instances(self) -> list[dict[str, Any]]:
        done = self("ps", "-o", "json")
        assert done.returncode == 0, done.stderr
        found: list[dict[str, Any]] = json.loads(done.stdout)
        self.pids |= {i["pid"] for i in found if i["pid"]}
        return found

    def server_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.home / "server.lock").read_text().split()[0])
        return None

    def cleanup(self) -> None:
        pid = self.server_pid()
        if pid and pids_alive([pid]):
            with contextlib.suppress(Exception):
                self.instances()
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pids_alive([pid]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pids_alive([pid]):
                os.kill(pid, signal.SIGKILL)
        for left in pids_alive(sorted(self.pids)):
            with contextlib.suppress(OSError):
                os.killpg(left, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(left, signal.SIGKILL)




def wait_for(predicate: Any, timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Output:
    """Collects a process's output in a thread, to wait for a line without blocking."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._lock:
                self.text += line

    def wait_for(self, marker: str, timeout: float = 20) -> str:
        wait_for(lambda: marker in self.text, timeout, f"{marker!r} in:\n{self.text}")
        return self.text


# -- without a server ----------------------------------------------------------------------

def test_validate(shipyard: Shipyard) -> None:
    (shipyard.cwd / "shipyard.yaml").write_text(stack_yaml())
    done = shipyard("validate")
    assert done.returncode == 0, done.stderr
    assert "stack demo is valid" in done.stdout

    bad = shipyard.cwd / "bad.yaml"
    bad.write_text("name: demo\nservices:\n  web:\n    command: [x]\n    replicas: many\n"
                   "    portz: {http: auto}\n")
    done = shipyard("validate", "-f", str(bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) >= 2 and all(line.startswith("error: ") for line in lines)
    assert any("bad.yaml:5" in line and "replicas" in line for line in lines)
    assert any("bad.yaml:6" in line and "portz" in line for line in lines)

    done = shipyard("validate", "-f", "missing.yaml")
    assert done.returncode == 2 and "no stack file at missing.yaml" in done.stderr


def test_validate_refuses_a_dependency_cycle(shipyard: Shipyard) -> None:
    (shipyard.cwd / "shipyard.yaml").write_text(
        "name: c\nservices:\n  a: {command: [x], depends_on: [b]}\n"
        "  b: {command: [x], depends_on: [a]}\n")
    done = shipyard("validate")
    assert done.returncode == 2 and done.stderr.startswith("error: ")


def test_schema_is_json_schema(shipyard: Shipyard) -> None:
    done = shipyard("schema")
    assert done.returncode == 0
    schema = json.loads(done.stdout)
    assert "services" in schema["properties"]


def test_commands_that_need_a_server_say_how_to_start_one(shipyard: Shipyard) -> None:
    for args in (["ps"], ["logs", "api"], ["events"], ["down"]):
        done = shipyard(*args)
        assert done.returncode == 1, args
        assert done.stderr.strip() == (
            f"error: no Shipyard server is running at {shipyard.home / 'shipyard.sock'} "
            "(start one with `shipyard server`, or `shipyard up -d`)")


def test_usage_errors_exit_2(shipyard: Shipyard) -> None:
    assert shipyard("ps", "-o", "xml").returncode == 2
    assert shipyard("no-such-command").returncode == 2
    done = shipyard("server", "--tcp", "0.0.0.0:8600")
    assert done.returncode == 2 and "loopback" in done.stderr
    assert not (shipyard.home / "shipyard.sock").exists()


def test_plan_without_a_server(shipyard: Shipyard) -> None:
    (shipyard.cwd / "shipyard.yaml").write_text(stack_yaml())
    done = shipyard("plan", "-o", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["phases"] == [["db"], ["api"]]
    assert {c["action"] for c in report["changes"]} == {"add"}
    text = shipyard("plan")
    assert "phase 2: api" in text.stdout and "+ api: add" in text.stdout


def test_version(shipyard: Shipyard) -> None:
    assert shipyard("version").stdout.startswith("shipyard ")


# -- with a background server --------------------------------------------------------------

def test_detached_lifecycle(shipyard: Shipyard) -> None:
    (shipyard.cwd / "shipyard.yaml").write_text(stack_yaml())
    done = shipyard("up", "-d")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stack demo deployed" in done.stdout
    assert stat_mode(shipyard.home / "shipyard.sock") == 0o600

    instances = shipyard.instances()
    assert [i["instance"] for i in instances] == ["api-1", "api-2", "db-1"]
    assert all(i["state"] == "ready" and i["ready"] and i["pid"] for i in instances)
    pids = [i["pid"] for i in instances]
    assert pids_alive(pids) == pids

    table = shipyard("ps").stdout.splitlines()
    assert table[0].split() == ["SERVICE", "INSTANCE", "STATE", "READY", "PID", "PORTS",
                                "RESTARTS", "EXIT", "UPTIME", "REV"]
    assert table[1].split()[:4] == ["api", "api-1", "ready", "yes"]

    logs = shipyard("logs", "db", "--tail", "2")
    assert logs.returncode == 0
    assert len(logs.stdout.splitlines()) == 2
    assert all(line.startswith("db-1 | ") for line in logs.stdout.splitlines())

    events = shipyard("events", "-o", "json").stdout.splitlines()
    kinds = [json.loads(line)["kind"] for line in events]
    assert kinds[0] == "op.queued" and "deploy.started" in kinds and "deploy.finished" in kinds
    assert "deploy.finished" in shipyard("events", "--stack", "demo").stdout

    plan = json.loads(shipyard("plan", "-o", "json").stdout)
    assert {c["action"] for c in plan["changes"]} == {"unchanged"}

    restarted = shipyard("restart", "api", "--rolling")
    assert restarted.returncode == 0 and "restarted api-1, api-2 one at a time" in restarted.stdout
    pids = [i["pid"] for i in shipyard.instances()]
    ops = json.loads(shipyard("ops", "--all", "-o", "json").stdout)
    assert [(o["kind"], o["state"]) for o in ops] == [("apply", "succeeded"),
                                                      ("restart", "succeeded")]
    assert "restart" in shipyard("ops", "--all").stdout
    assert json.loads(shipyard("ops", "-o", "json").stdout) == []  # nothing waiting
    history = json.loads(shipyard("history", "api", "-o", "json").stdout)
    assert [(h["revision"], h["current"]) for h in history] == [(1, True)]
    assert "*1" in shipyard("history", "api").stdout
    nothing = shipyard("rollback", "api")
    assert nothing.returncode == 2 and "no earlier deployed revision" in nothing.stderr
    missing = shipyard("restart", "nosuch")
    assert missing.returncode == 2 and "has no service nosuch" in missing.stderr

    # a second stack: commands needing one now ask which
    (shipyard.cwd / "bad.yaml").write_text(stack_yaml("other", crash=True))
    done = shipyard("up", "-d", "-f", "bad.yaml")
    assert done.returncode == 1 and "FAILED" in done.stdout
    done = shipyard("logs", "api")
    assert done.returncode == 0  # the failed first deploy rolled back: one stack left

    done = shipyard("down")
    assert done.returncode == 0 and "stack demo is down" in done.stdout
    assert pids_alive(pids) == []
    assert shipyard.instances() == []


def test_foreground_up_uses_a_running_server(shipyard: Shipyard) -> None:
    (shipyard.cwd / "shipyard.yaml").write_text(stack_yaml())
    server = shipyard.popen("server")
    try:
        wait_for(lambda: shipyard("ps").returncode == 0, what="the server to answer")
        up = shipyard.popen("up")
        out = Output(up).wait_for("supervising stack demo")
        assert "deploy.finished" in out
        pids = [i["pid"] for i in shipyard.instances()]
        assert len(pids) == 3
        up.send_signal(signal.SIGINT)
        assert up.wait(20) == 0
        assert pids_alive(pids) == []
        assert shipyard("ps", "-o", "json").stdout.strip() == "[]"  # the server stays
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)


# -- foreground, in-process control plane --------------------------------------------------

def test_foreground_up_stops_everything_on_ctrl_c(shipyard: Shipyard) -> None:
    (shipyard.cwd / "shipyard.yaml").write_text(stack_yaml())
    up = shipyard.popen("up")
    try:
        out = Output(up).wait_for("supervising stack demo")
        assert "deploy.finished" in out and "stack demo deployed" in out
        instances = shipyard.instances()  # served from the foreground process
        assert all(i["ready"] for i in instances) and len(instances) == 3
        pids = [i["pid"] for i in instances]
        up.send_signal(signal.SIGINT)
        assert up.wait(20) == 0
        assert pids_alive(pids) == []
        assert not (shipyard.home / "shipyard.sock").exists()
    finally:
        if up.poll() is None:
            up.kill()


def test_foreground_up_refuses_a_bad_stack_before_starting(shipyard: Shipyard) -> None:
    (shipyard.cwd / "shipyard.yaml").write_text(
        "name: x\nservices:\n  a: {command: [no-such-command-xyz]}\n")
    done = shipyard("up")
    assert done.returncode == 2
    assert "no-such-command-xyz" in done.stderr
    assert not (shipyard.home / "shipyard.sock").exists()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_scale_top_and_rollout_commands(shipyard: Shipyard) -> None:
    (shipyard.cwd / "shipyard.yaml").write_text(stack_yaml())
    done = shipyard("up", "-d")
    assert done.returncode == 0, done.stdout + done.stderr
    done = shipyard("scale", "api", "3")
    assert done.returncode == 0 and "api: 3 instance(s) (+1 -0)" in done.stdout, done.stderr
    assert [i["instance"] for i in shipyard.instances()] == ["api-1", "api-2", "api-3", "db-1"]
    done = shipyard("top", "-o", "json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["api"]["replicas"] == 3 and len(view["api"]["instances"]) == 3
    assert all(i["rss"] for i in view["api"]["instances"])
    done = shipyard("top")
    assert done.returncode == 0 and "api-3" in done.stdout
    done = shipyard("promote", "api")  # nothing in progress: a clear error, exit 2
    assert done.returncode == 2 and "no rollout in progress" in done.stderr, done.stderr
    done = shipyard("autoscale", "api", "--resume")
    assert done.returncode == 1 and "no autoscale policy" in done.stderr, done.stderr
    done = shipyard("scale", "nope", "2")
    assert done.returncode == 2 and "no service nope" in done.stderr, done.stderr
    assert shipyard("down").returncode == 0
