"""The physical-limit baseline of the side-by-side benchmark: a bare asyncio spawner.

`subprocess.Popen` (the stdlib's vfork/exec path), output to /dev/null, every exit watched
by a pidfd on the event loop and the child started again at once; no state, no logs, no
cgroups, no checks. With `ready`, each child gets $PORT and is ready once a tcp connect to
it succeeds, tried every 50 ms (Shipyard's probe interval in the same run). Driven by
run.py over stdin/stdout with the same JSON-lines protocol as agent_shipyard.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

PROBE_INTERVAL = 0.05


class Bare:
    def __init__(self) -> None:
        self.argv: list[str] = []
        self.n = 0
        self.ready = False
        self.poll = 0.01
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}  # slot -> child
        self.exited: dict[int, asyncio.Future[None]] = {}
        self.stopping = False

    async def setup(self, req: dict[str, Any]) -> dict[str, Any]:
        self.argv, self.n, self.ready, self.poll = (req["argv"], req["n"], req["ready"],
                                                    req["poll"])
        if self.ready:
            self.ports = _free_ports(req["port_low"], self.n)
        return {"control_pids": [os.getpid()]}

    def _spawn(self, slot: int) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if self.ready:
            env["PORT"] = str(self.ports[slot])
        proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, close_fds=True)
        self.procs[slot] = proc
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self.exited[slot] = done
        fd = os.pidfd_open(proc.pid)
        loop.add_reader(fd, self._on_exit, slot, proc, fd, done)

    def _on_exit(self, slot: int, proc: subprocess.Popen[bytes], fd: int,
                 done: asyncio.Future[None]) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        proc.wait()
        done.set_result(None)
        if not self.stopping:
            self._spawn(slot)  # restart at once

    async def start(self, req: dict[str, Any]) -> dict[str, Any]:
        self.stopping = False
        probes: list[asyncio.Task[None]] = []
        for slot in range(self.n):
            self._spawn(slot)
            if self.ready:  # probed from its start on, while the next ones start
                probes.append(asyncio.create_task(_until_accepts(self.ports[slot])))
                await asyncio.sleep(0)
        await asyncio.gather(*probes)
        return {}

    def pids(self) -> dict[str, int]:
        return {str(slot): p.pid for slot, p in self.procs.items()
                if not self.exited[slot].done()}

    async def wait_new(self, req: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + req["timeout"]
        while time.monotonic() < deadline:
            pid = self.pids().get(req["name"])
            if pid is not None and pid != req["old"]:
                return {"pid": pid}
            await asyncio.sleep(self.poll)
        raise TimeoutError(f"no new pid for {req['name']}")

    async def stop(self, req: dict[str, Any]) -> dict[str, Any]:
        self.stopping = True
        for slot, proc in self.procs.items():
            if not self.exited[slot].done():
                proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*self.exited.values())
        return {}

    async def quit(self, req: dict[str, Any]) -> dict[str, Any]:
        self.stopping = True
        for slot, proc in self.procs.items():
            if not self.exited[slot].done():
                proc.kill()
        await asyncio.gather(*self.exited.values())
        return {}


def _free_ports(low: int, n: int) -> list[int]:
    ports: list[int] = []
    port = low
    while len(ports) < n:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                ports.append(port)
            except OSError:
                pass
        port += 1
    return ports


async def _until_accepts(port: int) -> None:
    """A bare tcp connect (non-blocking socket, loop.sock_connect) every PROBE_INTERVAL."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            return
        except OSError:
            pass
        finally:
            sock.close()
        next_at += PROBE_INTERVAL
        await asyncio.sleep(max(0.0, next_at - loop.time()))


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    bare = Bare()
    while True:
        line = await reader.readline()
        req: dict[str, Any] = json.loads(line) if line else {"op": "quit"}
        op = req["op"]
        try:
            reply: dict[str, Any] = ({"pids": bare.pids()} if op == "pids"
                                     else await getattr(bare, op.replace("-", "_"))(req))
            reply["ok"] = True
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if op == "quit":
            return


if __name__ == "__main__":
    asyncio.run(main())
