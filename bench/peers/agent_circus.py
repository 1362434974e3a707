"""circus side of the side-by-side benchmark. Runs with the scratch venv's interpreter
(where circus is installed, never the project's venv): starts `circusd` on an ini file
whose endpoints are unix sockets (ipc://), and talks to it with circus's own client
(`circus.client.CircusClient`, what circusctl uses) — the same JSON-lines protocol on
stdin/stdout as agent_shipyard.py.

The watcher `g` runs `n` copies of the command (numprocesses), autostart off so that the
start is timed from the `start` command; stop_signal TERM, graceful_timeout 10 s.
`check_delay` (how often circusd looks for dead processes: its only way to notice a
crash) is circus's ini default, 5 s, unless setup passes one.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from circus.client import CircusClient


class CircusAgent:
    def __init__(self) -> None:
        self.client: CircusClient | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.n = 0
        self.poll = 0.01

    def call(self, command: str, **props: Any) -> dict[str, Any]:
        assert self.client is not None
        reply: dict[str, Any] = self.client.call({"command": command, "properties": props})
        if reply.get("status") != "ok":
            raise RuntimeError(f"circus {command}: {reply}")
        return reply

    def setup(self, req: dict[str, Any]) -> dict[str, Any]:
        self.n, self.poll = req["n"], req["poll"]
        run = Path(req["run_dir"])
        argv: list[str] = req["argv"]
        lines = [
            "[circus]",
            f"endpoint = ipc://{run}/circus-ctl.sock",
            f"pubsub_endpoint = ipc://{run}/circus-pub.sock",
            # no cluster discovery socket; no stats_endpoint: naming one turns on
            # circusd-stats (statsd and httpd stay off, their defaults)
            "multicast_endpoint = ",
        ]
        if req.get("check_delay") is not None:
            lines.append(f"check_delay = {req['check_delay']}")
        lines += [
            "",
            "[watcher:g]",
            f"cmd = {shlex.quote(argv[0])}",
            f"args = {shlex.join(argv[1:])}",
            f"numprocesses = {self.n}",
            "autostart = False",
            "respawn = True",
            "stop_signal = TERM",
            "graceful_timeout = 10",
            f"working_dir = {run}",
        ]
        ini = run / "circus.ini"
        ini.write_text("\n".join(lines) + "\n")
        circusd = str(Path(sys.executable).parent / "circusd")
        with open(run / "circusd.log", "ab") as log:
            self.daemon = subprocess.Popen([circusd, str(ini)], stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=log, start_new_session=True)
        self.client = CircusClient(endpoint=f"ipc://{run}/circus-ctl.sock", timeout=60.0)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.call("list")
                break
            except Exception:
                if time.monotonic() > deadline or self.daemon.poll() is not None:
                    raise
                time.sleep(0.05)
        return {"control_pids": [self.daemon.pid]}

    def pids(self) -> dict[str, int]:
        return {str(p): p for p in self.call("list", name="g")["pids"]}

    def status(self) -> str:
        """The watcher's status (this reply has no "ok" status: it says the watcher's)."""
        assert self.client is not None
        reply = self.client.call({"command": "status", "properties": {"name": "g"}})
        return str(reply.get("status"))

    def start(self, req: dict[str, Any]) -> dict[str, Any]:
        self.call("start", name="g")  # then poll, as for every tool
        while len(self.pids()) < self.n or self.status() != "active":
            time.sleep(self.poll)
        return {}

    def wait_new(self, req: dict[str, Any]) -> dict[str, Any]:
        # circus's processes have no names: a new pid runs once the killed one is gone
        # from the watcher's list and the list is complete again.
        deadline = time.monotonic() + req["timeout"]
        before = set(self.pids()) - {req["name"]}
        while time.monotonic() < deadline:
            now = self.pids()
            if req["name"] not in now and len(now) >= self.n:
                return {"pid": next(iter(set(now) - before), None)}
            time.sleep(self.poll)
        raise TimeoutError(f"no new process after killing {req['old']}")

    def stop(self, req: dict[str, Any]) -> dict[str, Any]:
        self.call("stop", name="g")
        # done when circus says so: its stop command holds the arbiter until it is over
        while self.pids() or self.status() != "stopped":
            time.sleep(self.poll)
        return {}

    def quit(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.daemon is not None and self.daemon.poll() is None:
            deadline = time.monotonic() + 20
            while True:  # refused while another command (a stop) is still running
                try:
                    self.call("quit", waiting=True)
                    break
                except Exception:
                    if time.monotonic() > deadline or self.daemon.poll() is not None:
                        self.daemon.terminate()
                        break
                    time.sleep(0.1)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        if self.client is not None:
            self.client.stop()
        return {}


def main() -> None:
    agent = CircusAgent()
    for line in sys.stdin:
        req: dict[str, Any] = json.loads(line)
        op = req["op"]
        try:
            reply: dict[str, Any] = ({"pids": agent.pids()} if op == "pids"
                                     else getattr(agent, op.replace("-", "_"))(req))
            reply["ok"] = True
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if op == "quit":
            return
    agent.quit({})


if __name__ == "__main__":
    os.umask(0o077)
    main()
