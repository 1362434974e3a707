"""The agent's reaper: a small companion process that kills the agent's instances when the
agent dies, however it dies (kill -9 included).

An agent's instances run in sessions (and cgroups) of their own, so nothing would end them
with the agent: the scheduler would then re-place them on another node while the old ones
still run. The agent starts `python -m shipyard.agent.reaper` with a pipe on its stdin and
tells it, one JSON line each, which instances it runs:

    {"op": "add", "key": "stack/instance", "handle": {...}, "signal": "SIGTERM",
     "timeout": 10}
    {"op": "remove", "key": "stack/instance"}

When the pipe reaches end of file (the kernel closes it when the agent exits), the reaper
stops every instance still listed, each with its stop signal, then SIGKILL after
min(timeout, 5 s), through the process runtime (its whole cgroup, or its process group,
descendants and environment marker), and exits. A clean agent shutdown stops its instances
first and removes them, so the reaper then finds nothing to do.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any, TextIO

from shipyard.runtime.base import Handle

MAX_STOP_TIMEOUT = 5.0


def read_orders(stream: TextIO) -> dict[str, dict[str, Any]]:
    """Follow the agent's orders until end of file; the instances still listed then."""
    listed: dict[str, dict[str, Any]] = {}
    for line in stream:
        try:
            order = json.loads(line)
            if order["op"] == "add":
                listed[order["key"]] = order
            elif order["op"] == "remove":
                listed.pop(order["key"], None)
        except (ValueError, KeyError, TypeError):
            print(f"reaper: ignoring a malformed order: {line[:200]!r}", file=sys.stderr)
    return listed


async def stop_all(listed: dict[str, dict[str, Any]]) -> None:
    from shipyard.runtime.process import ProcessRuntime

    runtime = ProcessRuntime()  # same $SHIPYARD_CGROUP_NAME as the agent: inherited
    try:
        async def stop(order: dict[str, Any]) -> None:
            handle = Handle(**order["handle"])
            timeout = min(float(order.get("timeout", MAX_STOP_TIMEOUT)), MAX_STOP_TIMEOUT)
            if runtime.adopt(handle):
                await runtime.stop(handle, str(order.get("signal") or "SIGTERM"), timeout)
            elif handle.cgroup:
                await runtime.kill_cgroup(handle.cgroup)

        await asyncio.gather(*(stop(o) for o in listed.values()), return_exceptions=True)
    finally:
        await runtime.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the end of the pipe ends us
    listed = read_orders(sys.stdin)
    if listed:
        print(f"reaper {os.getpid()}: the agent is gone; stopping {len(listed)} "
              f"instance(s): {', '.join(sorted(listed))}", file=sys.stderr)
        asyncio.run(stop_all(listed))


if __name__ == "__main__":
    main()
