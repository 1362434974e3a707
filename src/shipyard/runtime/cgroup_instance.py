"""One instance's cgroup: a directory in each hierarchy (v1) or one (v2), its limits,
its processes, signalling, freezing and killing them, OOM counts, and removal."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterable

from shipyard.runtime.limits import apply_swap, write_control

CPU_PERIOD_US = 100_000  # the cfs period a cpu limit's quota is a share of


def read_control(path: str) -> str:
    """A cgroup file's text, read with plain system calls: a text-mode open() costs
    several times the read itself (buffer set-up, an fstat and an isatty ioctl), and
    stopping an instance reads its cgroup.procs twice."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        while chunks[-1]:  # a large cgroup.procs comes a page or so at a time
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def subtree(path: str) -> list[str]:
    """`path` and its sub-directories, deepest first (scandir: cgroup directories hold
    dozens of control files that os.walk would classify for nothing)."""
    out: list[str] = []
    try:
        # a cgroup directory's link count is 2 plus its sub-directories: most instances
        # have none, and one stat is cheaper than listing dozens of control files
        if os.stat(path).st_nlink <= 2:
            return [path]
        with os.scandir(path) as entries:
            subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return out
    for sub in subdirs:
        out += subtree(sub)
    out.append(path)
    return out


class InstanceCgroup:
    """The cgroup of one instance: one directory per v1 hierarchy, or one v2 directory.
    Its string form (paths joined by ':') is what `Handle.cgroup` stores."""

    def __init__(self, paths: Iterable[str], *,
                 controllers: frozenset[str] | None = None) -> None:
        self.paths = [p for p in paths if p]
        # the controllers of its hierarchies when known (v1, made by CgroupSupport.create):
        # without "memory" there is no OOM count to read; None (parsed, v2): look for it
        self.controllers = controllers
        self.cpu_quota: tuple[str, str] | None = None  # v1: (cfs_quota_us file, quota set)
        self.cpuset_applied = False  # whether the cgroup pins the instance's CPUs
        self._removed = False
        self._found: dict[str, str | None] = {}  # control file name → path (or None)

    @classmethod
    def parse(cls, joined: str) -> InstanceCgroup:
        return cls(joined.split(":"))

    def __str__(self) -> str:
        return ":".join(self.paths)

    def exists(self) -> bool:
        return any(os.path.isdir(p) for p in self.paths)

    @property
    def procs_files(self) -> list[str]:
        """The files a process writes its pid to in order to join this cgroup."""
        return [os.path.join(p, "cgroup.procs") for p in self.paths]

    def _find(self, filename: str) -> str | None:
        """The control file `filename` in whichever hierarchy has it (cached: stat on
        /sys/fs/cgroup is not free). A v1 controller's files live in the hierarchy
        named after it, so that one is tried first."""
        if filename in self._found:
            return self._found[filename]
        controller = filename.partition(".")[0]
        ordered = sorted(self.paths, key=lambda p: f"/{controller}" not in p)
        found = None
        for path in ordered:
            candidate = os.path.join(path, filename)
            if os.path.exists(candidate):
                found = candidate
                break
        self._found[filename] = found
        return found

    def apply_limits(self, cpu_limit: float, memory_limit: int,
                     swap_limit: int | None = None) -> None:
        if cpu_limit > 0:
            quota = max(1000, int(cpu_limit * CPU_PERIOD_US))
            if f := self._find("cpu.max"):
                write_control(f, f"{quota} {CPU_PERIOD_US}")
            elif f := self._find("cpu.cfs_quota_us"):
                write_control(os.path.join(os.path.dirname(f), "cpu.cfs_period_us"),
                       str(CPU_PERIOD_US))
                write_control(f, str(quota))
                self.cpu_quota = (f, str(quota))
        if memory_limit > 0:
            if (f := self._find("memory.max")) or (f := self._find("memory.limit_in_bytes")):
                write_control(f, str(memory_limit))
            apply_swap(self._find, memory_limit, swap_limit)

    def pids(self) -> set[int]:
        """The processes in the cgroup. Never our own: on v1 our spawning thread visits
        an instance's cgroup while it starts the instance, and cgroup.procs then lists
        the control plane (which nothing here may signal)."""
        found: set[int] = set()
        if self._removed:  # a removed cgroup holds nothing (stop() asks once more)
            return found
        # Every process of the instance is in its subtree in each hierarchy (it joined all
        # of them before it ran), so one hierarchy tells them all: the first that exists
        # (a leftover's paths name every hierarchy, whichever it was made in).
        dirs: list[str] = []
        for path in self.paths:
            dirs = subtree(path)
            if dirs:
                break
        for d in dirs:
            with contextlib.suppress(OSError):
                found.update(int(x) for x in read_control(os.path.join(d, "cgroup.procs")).split())
        found.discard(os.getpid())
        return found

    def empty(self) -> bool:
        return not self.pids()

    def signal(self, sig: int) -> set[int]:
        """Send `sig` to every process in the cgroup; the processes it found there."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        return pids

    def _set_frozen(self, frozen: bool, wait: float = 0.1) -> bool:
        if f := self._find("freezer.state"):
            write_control(f, "FROZEN" if frozen else "THAWED")
            want = "FROZEN" if frozen else "THAWED"
            deadline = time.monotonic() + (wait if frozen else 0.0)
            while read_control(f).strip() != want and time.monotonic() < deadline:
                time.sleep(0.002)
            return True
        if f := self._find("cgroup.freeze"):
            write_control(f, "1" if frozen else "0")
            events = os.path.join(os.path.dirname(f), "cgroup.events")
            deadline = time.monotonic() + (wait if frozen else 0.0)
            while (f"frozen {int(frozen)}" not in read_control(events)
                   and time.monotonic() < deadline):
                time.sleep(0.002)
            return True
        return False

    def kill(self) -> None:
        """SIGKILL every process, without letting a forking process escape: cgroup.kill
        (v2), else freeze, kill everything, thaw."""
        if f := self._find("cgroup.kill"):
            try:
                write_control(f, "1")
                return
            except OSError:
                pass
        frozen = False
        try:
            frozen = self._set_frozen(True)
        except OSError:
            frozen = False
        try:
            self.signal(signal.SIGKILL)
        finally:
            if frozen:
                with contextlib.suppress(OSError):
                    self._set_frozen(False)

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 if unknown, or
        when it is not in a memory cgroup of its own: see runtime/cgroups)."""
        if self.controllers is not None and "memory" not in self.controllers:
            return 0
        names = ("memory.events", "memory.oom_control")
        if len(self.paths) > 1:  # v1 (a directory per hierarchy): its file first
            names = names[::-1]
        for name, key in ((n, "oom_kill") for n in names):
            if f := self._find(name):
                with contextlib.suppress(OSError, ValueError):
                    for line in read_control(f).splitlines():
                        k, _, v = line.partition(" ")
                        if k == key:
                            return int(v)
        return 0

    def remove(self) -> bool:
        """Remove the (empty) directories, and the stack directory if it is now empty;
        True when the instance cgroup is gone (at once, when this object removed it)."""
        if self._removed:
            return True
        ok = True
        for path in self.paths:
            try:  # usually a leaf: one rmdir, no look inside first
                os.rmdir(path)
                continue
            except FileNotFoundError:
                continue
            except OSError:
                pass
            for d in subtree(path):  # sub-cgroups a process of it made, deepest first
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        ok = False
        if ok:
            self._removed = True
            # The stack directory of each hierarchy, when empty (its link count is 2):
            # instances of the stack need not share every hierarchy (runtime/cgroups).
            for path in self.paths:
                stack_dir = os.path.dirname(path)
                with contextlib.suppress(OSError):
                    if os.stat(stack_dir).st_nlink <= 2:
                        os.rmdir(stack_dir)
        return ok
