"""Shipyard side of the side-by-side benchmark: the in-process `Engine` (the library API,
no control-plane server, no CLI), in a process of its own so that its RSS and CPU can be
measured like a peer's daemon. Driven by run.py over stdin/stdout, one JSON object a line:

    setup {argv, n, ready, port_low, run_dir, poll, cgroups?} -> {control_pids}
    start                                            -> when engine.apply() returns
    pids                                             -> {pids: {instance: pid}}
    wait_new {name, old, timeout}                    -> {pid}: a new pid runs for `name`
    stop                                             -> when engine.down() returns
    quit                                             -> engine closed, cgroups checked

Run with the project's venv: `.venv/bin/python bench/peers/agent_shipyard.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from shipyard import Engine, EngineConfig
from shipyard.runtime.logpipe import LogPipes
from shipyard.runtime.process import ProcessRuntime
from shipyard.spec.models import Stack
from shipyard.state.base import InstanceState

STACK = "bench"
ALIVE = (InstanceState.RUNNING, InstanceState.READY)


class Agent:
    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.stack: Stack | None = None
        self.n = 0
        self.ready = False
        self.poll = 0.01

    async def setup(self, req: dict[str, Any]) -> dict[str, Any]:
        self.n, self.ready, self.poll = req["n"], req["ready"], req["poll"]
        service: dict[str, Any] = {
            "command": req["argv"], "replicas": self.n,
            # Restart at once, as supervisord and pm2 do by default (Shipyard's default
            # is an exponential backoff from 1 s); never give up during the kill test.
            "restart": {"policy": "always", "backoff": "fixed", "initial": "0s",
                        "max_restarts": None},
            "stop": {"signal": "SIGTERM", "timeout": "10s"},
            # The service-wide breaker would count the kill test's 20 one-off kills of
            # distinct long-running replicas as a crash loop (it opens at 10 of the last
            # 20 runs failed): off, as the peers' give-up rules are (see run.py).
            "circuit_breaker": {"enabled": False},
        }
        if self.ready:
            service["ports"] = {"http": "auto"}
            service["health"] = {"readiness": {"tcp": "http", "interval": "50ms",
                                               "timeout": "1s", "failure_threshold": 1}}
        low = req["port_low"]
        self.stack = Stack.model_validate({
            "name": STACK, "ports": {"range": f"{low}-{low + 999}"},
            "deploy": {"timeout": "5m"}, "services": {"g": service},
            "base_dir": req["run_dir"]})
        home = Path(req["run_dir"]) / "shipyard-home"
        config = EngineConfig(home=home, stop_on_exit=True)
        if req.get("cgroups") == "off":  # the variant without per-instance cgroups
            self.engine = Engine(config, runtime=ProcessRuntime(
                cgroups="off", pipes=LogPipes(home)))
        else:
            self.engine = Engine(config)
        await self.engine.start()
        return {"control_pids": [os.getpid()]}

    async def instances(self) -> dict[str, int]:
        """The running instances as `engine.instances()` reports them."""
        assert self.engine is not None
        if STACK not in self.engine.stacks_state:
            return {}
        want = (InstanceState.READY,) if self.ready else ALIVE
        return {r.instance: r.pid for r in await self.engine.instances(STACK)
                if r.pid is not None and r.state in want}

    async def start(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.engine is not None and self.stack is not None
        result = await self.engine.apply(self.stack)
        if not result.ok:
            raise RuntimeError(f"apply failed: {result.failed}")
        while len(await self.instances()) < self.n:  # apply said so; confirm
            await asyncio.sleep(self.poll)
        # the control plane is this process and the log relay it started
        runtime = self.engine.runtime
        process = getattr(runtime, "process", runtime)
        pipes = getattr(process, "pipes", None)
        relay = pipes.relay_pid if pipes is not None else None
        return {"control_pids": [os.getpid(), *([relay] if relay else [])]}

    async def wait_new(self, req: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + req["timeout"]
        while time.monotonic() < deadline:
            pid = (await self.instances()).get(req["name"])
            if pid is not None and pid != req["old"]:
                return {"pid": pid}
            await asyncio.sleep(self.poll)
        raise TimeoutError(f"no new pid for {req['name']} within {req['timeout']} s")

    async def stop(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.engine is not None
        await self.engine.down(STACK)
        return {}

    async def quit(self, req: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.engine is not None:
            runtime = self.engine.runtime
            await self.engine.close()
            if isinstance(runtime, ProcessRuntime) and runtime.cgroups_enabled:
                out["cgroups_left"] = runtime.orphan_cgroups()
                out["cgroup_dirs_left"] = _remove_empty_dirs(runtime.cgroup_support.bases)
        return out


def _remove_empty_dirs(bases: list[str]) -> list[str]:
    """Remove our (empty) cgroup directories, deepest first; returns those that existed."""
    found: list[str] = []
    for base in bases:
        if not os.path.isdir(base):
            continue
        for root, _dirs, _files in os.walk(base, topdown=False):
            found.append(root)
            with contextlib.suppress(OSError):
                os.rmdir(root)
    return found


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    agent = Agent()
    while True:
        line = await reader.readline()
        if not line:
            req: dict[str, Any] = {"op": "quit"}
        else:
            req = json.loads(line)
        op = req["op"]
        try:
            if op == "pids":
                reply: dict[str, Any] = {"pids": await agent.instances()}
            else:
                reply = await getattr(agent, op.replace("-", "_"))(req)
            reply["ok"] = True
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if op == "quit":
            return


if __name__ == "__main__":
    asyncio.run(main())
