"""Kill -9 of the control plane in the middle of a deploy, at ten different points: a new
server resumes the deploy's operation and completes it, with no orphan process, no
duplicate instance and no port handed out twice; the event log tells the story.

Real `shipyard server` processes on a unix socket, real children, real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shipyard.api.client import Client
from shipyard.spec.models import Stack
from tests.conftest import pids_alive, port_range

SVC = str(Path(__file__).parent / "fixtures" / "svc.py")
PY = sys.executable


def thirty_services(tmp_path: Path, name: str) -> Stack:
    services: dict[str, Any] = {}
    for i in range(30):
        deps = {f"s{j:02d}": "healthy" for j in (i - 1, i - 7) if j >= 0 and i % 3 != 0}
        services[f"s{i:02d}"] = {
            "command": [PY, SVC, "--port", "${PORT}", "--ready-after", "0.1"],
            "ports": {"http": "auto"}, "replicas": 2 if i % 5 == 0 else 1,
            "depends_on": deps, "stop": {"timeout": "2s"},
            "health": {"readiness": {"http": "/ready", "interval": "50ms",
                                     "failure_threshold": 1}},
        }
    return Stack.model_validate({
        "name": name, "ports": {"range": port_range()},
        "deploy": {"strategy": "hybrid", "max_parallel": 4, "timeout": "60s"},
        "services": services, "base_dir": str(tmp_path)})


def start_server(home: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, SHIPYARD_HOME=str(home))
    with open(home / "server.err", "ab") as err:
        proc = subprocess.Popen([PY, "-m", "shipyard.cli.main", "server"], env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    client = Client(home / "shipyard.sock")
    for _ in range(200):
        if client.is_running():
            return proc
        time.sleep(0.05)
    raise AssertionError((home / "server.err").read_text())


def processes_of(stack: str) -> dict[int, str]:
    """Every live process whose environment says it belongs to `stack`: pid → instance."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"SHIPYARD_STACK") == stack.encode() and pids_alive([int(entry)]):
            found[int(entry)] = env.get(b"SHIPYARD_INSTANCE", b"?").decode()
    return found


@pytest.mark.parametrize("kill_after", [2, 5, 9, 14, 20, 28, 37, 47, 60, 75])
def test_kill_9_mid_deploy_resumes_without_orphans(tmp_path: Path, kill_after: int) -> None:
    home = tmp_path / "home"
    home.mkdir()
    name = f"crash{kill_after}"
    stack = thirty_services(tmp_path, name)
    server = start_server(home)
    try:
        with Client(home / "shipyard.sock") as client:
            after = client.latest_event()
            client.submit(stack)
            for seen, _ in enumerate(client.follow_events(after=after, stack=name), 1):
                if seen >= kill_after:
                    break
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = start_server(home)
        with Client(home / "shipyard.sock") as client:
            result = client.wait_deploy(name)
            if not result.ok:  # say what the failed services' instances went through
                story = [f"{e['seq']} {e['kind']} {e.get('instance')}: {e['message']}"
                         for e in client.all_events(stack=name)
                         if e.get("service") in result.failed]
                pytest.fail(f"{result}\n" + "\n".join(story[-40:]) + "\n"
                            + (home / "server.err").read_text()[-3000:])
            instances = client.instances(stack=name)
            kinds = [e["kind"] for e in client.all_events(stack=name)]
            assert len(instances) == 36 and all(i["ready"] for i in instances)
            ports = [p for i in instances for p in i["ports"].values()]
            assert len(ports) == len(set(ports)), "a port was handed out twice"
            running = processes_of(name)
            assert Counter(running.values()) == Counter({i["instance"]: 1 for i in instances})
            assert sorted(running) == sorted(i["pid"] for i in instances)
            assert "op.resumed" in kinds  # it was killed mid-deploy, every time
            assert kinds.count("deploy.finished") == 1
            client.down(name)
        assert processes_of(name) == {}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
        for pid in processes_of(name):
            os.kill(pid, signal.SIGKILL)
