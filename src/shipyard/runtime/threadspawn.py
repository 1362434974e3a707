"""Starting a child inside its cgroup without a preexec_fn (cgroup v1).

A new process is born in the cgroups of the thread that clones it, and on cgroup v1 one
thread can move alone (writing "0", "myself", to a hierarchy's `tasks` file). So a
dedicated thread moves itself into the instance's cgroups, starts the child with a plain
subprocess.Popen (vfork + exec: no fork() copying the control plane's page tables, no
Python code run in the child), and moves back, whatever happened. The child belongs to
every hierarchy of its cgroup from its first instruction, as with a preexec_fn that
joins before exec, and so does anything it forks. An instance has a directory in only some
of the hierarchies (runtime/cgroups: pids and freezer, plus those its limits need): the
thread joins those (each path is matched to its mount), and in the others the child stays
where the control plane is.

Why a dedicated thread and never the event loop's (usually the main thread):
- the memory cgroup's OOM killer chooses among the thread-group leaders found in the
  cgroup: the main thread sitting in an instance's memory cgroup makes the whole control
  plane a candidate, and the largest one (tried: it is the process killed). A worker
  thread is never a leader.
- nothing of the control plane's own work is charged to an instance's cgroup.
The caller waits for the spawn (as it waited for the preexec_fn spawn), so the spawner
thread runs without contention for the GIL and leaves the cgroups right after the exec.

The instance's cpu quota is lifted while the thread is inside: a child that uses up a
small quota at once (0.01 cpu = 1 ms per 100 ms period) would otherwise throttle the
thread with it, for one or more periods (tried: starts then take ~100 ms instead of ~1).
The child thus runs its first few dozen microseconds after exec without its quota.

Writing "0" rather than the thread id also lets the kernel skip the global lock that a
move of another task takes (the one that holds up every fork and exit on the host).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from shipyard.runtime.cgroups import InstanceCgroup, Mount, member_dirs, mount_index

log = logging.getLogger("shipyard.runtime.process")

Launch = Callable[[], "subprocess.Popen[bytes]"]


def _read_self() -> str:
    """The calling thread's /proc/thread-self/cgroup (read raw: this is on every spawn)."""
    fd = os.open("/proc/thread-self/cgroup", os.O_RDONLY)
    try:
        chunks = [os.read(fd, 8192)]
        while chunks[-1]:
            chunks.append(os.read(fd, 8192))
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def _write(path: str, value: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value)
    finally:
        os.close(fd)


def _join(directory: str) -> None:
    """Move the calling thread (only it) into the v1 cgroup `directory`."""
    _write(os.path.join(directory, "tasks"), b"0")


class ThreadSpawner:
    """Runs launches on one dedicated thread that visits the instance's v1 cgroups.

    `mounts`: the v1 hierarchies (an instance cgroup's paths are each in one of them)."""

    def __init__(self, mounts: list[Mount]) -> None:
        self.mounts = list(mounts)
        # Into the cpu hierarchy last, out of it first.
        cpu = [i for i, m in enumerate(self.mounts) if "cpu" in m.options]
        self._order = [i for i in range(len(self.mounts)) if i not in cpu] + cpu
        self._pool: ThreadPoolExecutor | None = None
        self._retire = False
        self.disabled: str | None = None  # why the thread is not used (then: preexec_fn)
        self.thread_id: int | None = None  # the spawner thread's native id, once it ran

    def spawn(self, cgroup: InstanceCgroup, launch: Launch) -> subprocess.Popen[bytes] | None:
        """`launch()` run by the spawner thread while it is in `cgroup`; its exceptions
        are raised here. None when the thread could not join the cgroup: nothing was
        launched, the caller may use a preexec_fn instead. Blocks until done."""
        if self.disabled is not None:
            return None
        where = self.hierarchies(cgroup)
        if where is None:
            return None
        if self._pool is None:
            # The worker thread is created by (and starts in the cgroups of) this thread.
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shipyard-spawn")
        try:
            return self._pool.submit(self._run, cgroup, where, launch).result()
        finally:
            if self._retire:  # it could not go back: let it end, the next one starts clean
                self._pool.shutdown(wait=False)
                self._pool = None
                self._retire = False

    def hierarchies(self, cgroup: InstanceCgroup) -> dict[int, str] | None:
        """Mount index → the cgroup's directory in that hierarchy; None when a path is in
        none of the mounts, or two are in one (not a cgroup made by CgroupSupport)."""
        where: dict[int, str] = {}
        for path in cgroup.paths:
            i = mount_index(self.mounts, path)
            if i is None or i in where:
                return None
            where[i] = os.path.normpath(path)
        return where or None

    def _run(self, cgroup: InstanceCgroup, where: dict[int, str],
             launch: Launch) -> subprocess.Popen[bytes] | None:
        self.thread_id = threading.get_native_id()
        home = member_dirs(self.mounts, _read_self())
        if home is None:
            self.disabled = "the control plane's own cgroups are not visible through the mounts"
            log.info("cgroups: %s; joining by a preexec_fn instead", self.disabled)
            return None
        quota = cgroup.cpu_quota
        try:
            if quota is not None:
                _write(quota[0], b"-1")
        except OSError as exc:
            log.debug("cgroups: cannot lift the cpu quota of %s: %s", cgroup, exc)
            return None
        try:
            return self._inside(cgroup, where, home, launch)
        finally:
            if quota is not None:
                try:
                    _write(quota[0], quota[1].encode())
                except OSError as exc:
                    log.warning("cgroups: cannot set the cpu quota of %s back (%s): its cpu"
                                " limit is not enforced", cgroup, exc)

    def _inside(self, cgroup: InstanceCgroup, where: dict[int, str], home: list[str],
                launch: Launch) -> subprocess.Popen[bytes] | None:
        order = [i for i in self._order if i in where]
        try:
            try:
                for i in order:
                    _join(where[i])
            except OSError as exc:
                log.debug("cgroups: the spawner thread cannot join %s: %s", cgroup, exc)
                return None
            child = launch()
            # Still there after the clone: the child was born inside. (Only someone moving
            # the whole control plane meanwhile could have taken the thread out.)
            now = member_dirs(self.mounts, _read_self())
            if now is None or any(now[i] != path for i, path in where.items()):
                log.error("cgroups: the spawner thread was moved out of %s while starting"
                          " pid %d; killing it and starting it again", cgroup, child.pid)
                _kill(child)
                return None
            return child
        finally:
            self._go_home(home, order)

    def _go_home(self, home: list[str], order: list[int]) -> None:
        for i in reversed(order):
            try:
                _join(home[i])
            except OSError as exc:
                self._retire = True
                log.error("cgroups: the spawner thread cannot return to %s: %s", home[i], exc)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _kill(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        child.kill()
    child.wait()
