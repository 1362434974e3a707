"""Which processes belong to an instance that has no cgroup: its process group and
session, its descendants (now, and as last seen by a periodic scan: a daemon that
double-forked away is still remembered), and, when asked, the processes that carry its
environment marker."""

from __future__ import annotations

import asyncio
import contextlib
import os

from shipyard.runtime import procscan
from shipyard.runtime.base import Handle

Key = tuple[int, float]  # (pid, process start time)


class DescendantTracker:
    def __init__(self, procs: procscan.SharedScan, interval: float = 1.0) -> None:
        self.procs = procs
        self.interval = interval
        self.tracked: dict[Key, dict[int, float]] = {}  # instance → {pid: start}
        self._task: asyncio.Task[None] | None = None

    def track(self, handle: Handle) -> None:
        self.tracked.setdefault((handle.pid, handle.proc_start), {})
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # adopt() outside a loop: tracked from the next start() on
            self._task = loop.create_task(self._loop(), name="shipyard-track")

    def forget(self, handle: Handle) -> None:
        self.tracked.pop((handle.pid, handle.proc_start), None)

    async def _loop(self) -> None:
        while self.tracked:
            table = self.procs.table(True)
            for key, seen in list(self.tracked.items()):
                pid, start = key
                root = table.get(pid)
                alive = root is not None and root.alive and abs(root.start - start) <= 0.01
                if alive:
                    for d in procscan.descendants(pid, table):
                        seen[d.pid] = d.start
                for p in [p for p, s in seen.items() if p not in table
                          or not table[p].alive or abs(table[p].start - s) > 0.01]:
                    del seen[p]
                if not alive and not seen:  # nothing left to remember for it
                    del self.tracked[key]
            await asyncio.sleep(self.interval)

    def members(self, handle: Handle, table: dict[int, procscan.ProcInfo], *,
                environ: bool) -> list[procscan.ProcInfo]:
        """Processes of a cgroup-less instance: its process group and session, its
        descendants now and as recorded, and (with `environ`) its environment marker."""
        since = handle.proc_start - 0.01
        tracked = self.tracked.get((handle.pid, handle.proc_start), {})
        marker = handle.extra.get("env_marker")
        entries = (frozenset(e.encode() for e in marker.split("\n")) if marker and environ
                   else frozenset())
        me = os.getpid()
        found: dict[int, procscan.ProcInfo] = {}
        if procscan.same_process(handle.pid, handle.proc_start):
            found = {d.pid: d for d in procscan.descendants(handle.pid, table)}
        for info in table.values():
            if not info.alive or info.start < since or info.pid == me or info.pid in found:
                continue
            if (info.pgrp == handle.pgid or info.sid == handle.pgid
                    or abs(tracked.get(info.pid, -1.0) - info.start) <= 0.01
                    or (entries and entries <= self.procs.environ(info))):
                found[info.pid] = info
        return list(found.values())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
