"""A light, fast reader of /proc used by the process runtime to find what belongs to an
instance when cgroups are not available (process group, session, recorded descendants,
environment markers)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgrp: int
    sid: int
    state: str  # one letter, as in /proc/<pid>/stat ("Z" = zombie)
    start: float  # seconds since the epoch, comparable to psutil create_time()

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


@cache
def _boot_and_ticks() -> tuple[float, int]:
    """Boot time (the `btime` of /proc/stat, what psutil.boot_time() reads) and clock
    ticks per second; read here, so that the runtime does not import psutil."""
    with open("/proc/stat", "rb") as f:
        btime = next(line for line in f if line.startswith(b"btime "))
    return float(btime.split()[1]), os.sysconf("SC_CLK_TCK")


def read_proc(pid: int) -> ProcInfo | None:
    """The /proc/<pid>/stat of one process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    boot, ticks = _boot_and_ticks()
    # fields[0] is field 3 of stat (state); starttime is field 22.
    return ProcInfo(
        pid=pid,
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        sid=int(fields[3]),
        state=fields[0].decode(),
        start=boot + int(fields[19]) / ticks,
    )


def scan() -> dict[int, ProcInfo]:
    """Every process of the host (that /proc shows us), by pid."""
    table: dict[int, ProcInfo] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            info = read_proc(int(name))
            if info is not None:
                table[info.pid] = info
    return table


def descendants(root: int, table: dict[int, ProcInfo]) -> list[ProcInfo]:
    """Living descendants of `root` according to `table`."""
    children: dict[int, list[ProcInfo]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info)
    found: list[ProcInfo] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child.pid != root and child.alive:
                found.append(child)
                stack.append(child.pid)
    return found


def environ_of(pid: int) -> frozenset[bytes] | None:
    """The `KEY=value` entries of `pid`'s environment (None if unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return frozenset(f.read().split(b"\0"))
    except OSError:
        return None


def same_process(pid: int, start: float, tolerance: float = 0.01) -> bool:
    """True if `pid` exists, is not a zombie and started at `start` (not a reused pid)."""
    info = read_proc(pid)
    return info is not None and info.alive and abs(info.start - start) <= tolerance


class SharedScan:
    """The process table, shared by concurrent stops for `ttl` seconds (one /proc walk
    serves a hundred instances stopping together), with each process's environment read
    at most once per scan (instead of once per instance stopping)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._at = 0.0
        self._table: dict[int, ProcInfo] = {}
        self._environs: dict[tuple[int, float], frozenset[bytes] | None] = {}

    def table(self, fresh: bool = False) -> dict[int, ProcInfo]:
        now = time.monotonic()
        if fresh or now - self._at > self.ttl:
            self._at, self._table, self._environs = now, scan(), {}
        return self._table

    def environ(self, info: ProcInfo) -> frozenset[bytes]:
        key = (info.pid, info.start)
        if key not in self._environs:
            self._environs[key] = environ_of(info.pid)
        return self._environs[key] or frozenset()
