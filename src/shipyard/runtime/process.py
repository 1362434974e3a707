"""The process runtime: every instance is a local process in its own session, with its
output appended to a log file (by the home's log relay, runtime/logpipe.py, when the
runtime has one; else by the instance itself), and, where the host allows, in its own
cgroup (limits, complete kill, OOM accounting).

Without permission to create cgroups it falls back to process groups and sessions, plus
a best-effort sweep of descendants (recorded while alive) and of processes carrying the
instance's SHIPYARD_STACK/SHIPYARD_INSTANCE environment; `warning` then says that limits
are not enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

from shipyard.errors import RuntimeLaunchError, TransientLaunchError
from shipyard.runtime import procscan
from shipyard.runtime.base import Handle, LaunchSpec, Runtime
from shipyard.runtime.cgroups import TOP, CgroupMode, InstanceCgroup, detect, prune_empty
from shipyard.runtime.limits import affinity_preexec
from shipyard.runtime.logpipe import LogPipes, pipe_record
from shipyard.runtime.spawn import (
    cgroup_joiner,
    check_workdir,
    env_marker,
    launch,
    open_log,
    parse_signal,
    resolve_command,
    wait_foreign,
)
from shipyard.runtime.threadspawn import ThreadSpawner
from shipyard.runtime.tracking import DescendantTracker

log = logging.getLogger("shipyard.runtime.process")
# Failures to start a process that may pass on their own: out of processes, memory, file
# descriptors; an executable being written. Anything else (not found, not executable) is
# permanent and not retried.
TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                              errno.ETXTBSY, errno.EINTR})

OOM_KILLED = "oom-killed"
KILL_PATIENCE = 30.0  # how long stop() keeps SIGKILLing before giving up with an error
_FINISHED_KEEP = 4096  # exit codes / reasons remembered for children that exited
SCAN_TTL = 0.02  # how long a /proc scan is reused while waiting for processes to go


@dataclass
class _Child:
    """A process we spawned (and therefore reap)."""

    popen: subprocess.Popen[bytes]
    handle: Handle
    cgroup: InstanceCgroup | None
    done: asyncio.Future[int]
    pidfd: int | None = None
    oom_at_stop: int | None = None


class ProcessRuntime(Runtime):
    """Local processes. One instance per event loop (it registers pidfd readers)."""

    name = "process"

    def __init__(self, *, cgroups: CgroupMode = "auto", cgroup_parent: str | None = None,
                 cgroup_name: str | None = None, track_interval: float = 1.0,
                 thread_join: bool = True, pipes: LogPipes | None = None) -> None:
        """`cgroups`: "auto" (v1 or v2, whichever the host has), "v1", "v2" or "off".
        `cgroup_parent`: the cgroup under which `shipyard/<stack>/<instance>` is made,
        relative to each hierarchy's root (default: the control plane's own cgroup).
        `cgroup_name`: the name of that top cgroup, distinct per Shipyard home (default:
        $SHIPYARD_CGROUP_NAME, else "shipyard").
        `thread_join` (v1): start children from a thread that visits their cgroup; False
        always uses the fallback, a forked child joining it by a preexec_fn (slower).
        `pipes`: carry output through the log relay (instances survive a full log disk
        and a dead control plane); None: instances append to their log file directly."""
        self.pipes = pipes
        top = cgroup_name or os.environ.get("SHIPYARD_CGROUP_NAME") or TOP
        self.cgroup_support = detect(cgroups, cgroup_parent, top=top)
        self.warning: str | None = None
        support = self.cgroup_support
        if not support.enabled:
            self.warning = (f"cgroups unavailable ({support.problem}): cpu and memory limits"
                            " are not enforced; processes that leave the instance's process"
                            " group are tracked best effort")
        elif support.problem:
            self.warning = f"{support.problem}: those limits are not enforced"
        if self.warning:
            log.warning("%s", self.warning)
        self._children: dict[int, _Child] = {}
        self._finished: OrderedDict[tuple[int, float], tuple[int | None, str | None]] = (
            OrderedDict())
        self._procs = procscan.SharedScan(SCAN_TTL)
        self._tracker = DescendantTracker(self._procs, track_interval)
        # v1: children are started by a thread that visits their cgroup (no preexec_fn).
        self._spawner = (ThreadSpawner(support.mounts)
                         if thread_join and support.enabled and support.version == 1 else None)

    # -- status -----------------------------------------------------------------------
    @property
    def cgroups_enabled(self) -> bool:
        return self.cgroup_support.enabled

    @property
    def limits_enforced(self) -> frozenset[str]:
        """Which of "cpu" and "memory" limits are enforced."""
        return self.cgroup_support.limits if self.cgroup_support.enabled else frozenset()

    # -- start ------------------------------------------------------------------------
    async def start(self, spec: LaunchSpec) -> Handle:
        if not spec.argv:
            raise RuntimeLaunchError(f"service {spec.service}: empty command")
        check_workdir(spec)
        executable = resolve_command(spec)
        fifo: str | None = None
        if self.pipes is None:
            fd = open_log(spec)
        else:
            os.close(open_log(spec))  # the file exists and can be written: said now
            fd, fifo = await self._open_pipe(spec)
        cgroup: InstanceCgroup | None = None
        try:
            cgroup = await self._make_cgroup(spec)
            popen = self._spawn(spec, executable, fd, cgroup)
            if popen is None and cgroup is not None:  # could not join: run without it
                await self._empty_cgroup(cgroup)
                cgroup = None
                popen = self._spawn(spec, executable, fd, None)
            assert popen is not None
        except BaseException:
            if cgroup is not None:
                await self._empty_cgroup(cgroup)
            if fifo is not None and self.pipes is not None:
                self.pipes.discard(fifo)
            raise
        finally:
            os.close(fd)
        info = procscan.read_proc(popen.pid)
        handle = Handle(
            instance=spec.instance, pid=popen.pid, pgid=popen.pid,
            proc_start=info.start if info is not None else time.time(),
            cgroup=str(cgroup) if cgroup is not None else None,
            extra={"stack": spec.stack, "service": spec.service},
        )
        marker = env_marker(spec.env)
        if marker:
            handle.extra["env_marker"] = marker
        if fifo is not None:  # kept with the handle: re-adoption re-attaches the pipe
            handle.extra.update(pipe_record(fifo, spec))
        loop = asyncio.get_running_loop()
        child = _Child(popen, handle, cgroup, loop.create_future())
        self._children[popen.pid] = child
        self._watch(child, loop)
        if cgroup is None:
            self._tracker.track(handle)
        return handle

    async def _open_pipe(self, spec: LaunchSpec) -> tuple[int, str]:
        assert self.pipes is not None
        try:
            return await self.pipes.open(f"{spec.stack}.{spec.instance}", spec.log_path,
                                         spec.log_max_bytes, spec.log_backups,
                                         f"{spec.stack}/{spec.instance}")
        except OSError as exc:
            error = TransientLaunchError if exc.errno in TRANSIENT_ERRNOS else RuntimeLaunchError
            raise error(f"service {spec.service}: cannot make the output pipe of "
                        f"{spec.instance}: {exc.strerror or exc}") from exc

    async def _make_cgroup(self, spec: LaunchSpec) -> InstanceCgroup | None:
        support = self.cgroup_support
        if not support.enabled:
            return None
        leftover = InstanceCgroup(support.instance_paths(spec.stack, spec.instance))
        if leftover.exists():
            if leftover.pids():
                log.warning("service %s: killing processes left in %s by a previous run",
                            spec.service, leftover)
            await self._empty_cgroup(leftover)
        try:
            return support.create(spec.stack, spec.instance, spec.cpu_limit, spec.memory_limit,
                                  swap_limit=spec.swap_limit, cpuset=spec.cpuset, mems=spec.mems)
        except OSError as exc:
            log.warning("service %s: cannot set up cgroup %s (%s); running without it,"
                        " limits not enforced", spec.service, leftover, exc)
            with contextlib.suppress(OSError):
                leftover.remove()
            return None

    def _spawn(self, spec: LaunchSpec, executable: str, fd: int,
               cgroup: InstanceCgroup | None) -> subprocess.Popen[bytes] | None:
        """Start the child; with a cgroup, inside it before it runs anything: born there
        (v1, see threadspawn), else joining it by a preexec_fn before its exec. A cpuset
        the cgroup does not enforce is set as the child's CPU affinity (runtime/limits)."""
        pin = None if cgroup is not None and cgroup.cpuset_applied else spec.cpuset
        try:
            if cgroup is None:
                return launch(spec, executable, fd, affinity_preexec(pin))
            if self._spawner is not None:
                popen = self._spawner.spawn(
                    cgroup, partial(launch, spec, executable, fd, affinity_preexec(pin)))
                if popen is not None:
                    return popen
            return launch(spec, executable, fd,
                          affinity_preexec(pin, cgroup_joiner(cgroup.procs_files)))
        except subprocess.SubprocessError as exc:  # only the preexec_fn raises this
            log.warning("service %s: cannot join cgroup %s (%s); running without it,"
                        " limits not enforced", spec.service, cgroup, exc)
            return None
        except OSError as exc:
            error = TransientLaunchError if exc.errno in TRANSIENT_ERRNOS else RuntimeLaunchError
            raise error(
                f"service {spec.service}: cannot execute {spec.argv[0]!r}: "
                f"{exc.strerror or exc}") from exc

    # -- exit of our children ---------------------------------------------------------
    def _watch(self, child: _Child, loop: asyncio.AbstractEventLoop) -> None:
        try:
            child.pidfd = os.pidfd_open(child.popen.pid)
            loop.add_reader(child.pidfd, self._on_exit, child)
        except (AttributeError, OSError, NotImplementedError):
            if child.pidfd is not None:
                os.close(child.pidfd)
                child.pidfd = None
            self._poll_exit(child, loop)
        if child.popen.poll() is not None:  # exited before the reader was in place
            self._on_exit(child)

    def _poll_exit(self, child: _Child, loop: asyncio.AbstractEventLoop) -> None:
        if child.popen.poll() is None:
            loop.call_later(0.05, self._poll_exit, child, loop)
        else:
            self._on_exit(child)

    def _on_exit(self, child: _Child) -> None:
        code = child.popen.poll()
        if code is None or child.done.done():
            return
        if child.pidfd is not None:
            with contextlib.suppress(Exception):
                child.done.get_loop().remove_reader(child.pidfd)
            os.close(child.pidfd)
            child.pidfd = None
        reason: str | None = None
        if child.cgroup is not None:
            with contextlib.suppress(OSError):
                base = child.oom_at_stop or 0
                if code == -signal.SIGKILL and child.cgroup.oom_kills() > base:
                    reason = OOM_KILLED
            with contextlib.suppress(OSError):
                if child.cgroup.empty():
                    child.cgroup.remove()
        if self.pipes is not None and "log_fifo" in child.handle.extra:
            self.pipes.forget(child.handle.extra["log_fifo"])
        key = (child.handle.pid, child.handle.proc_start)
        self._finished[key] = (code, reason)
        if self._children.get(child.handle.pid) is child:
            del self._children[child.handle.pid]
        while len(self._finished) > _FINISHED_KEEP:
            self._finished.popitem(last=False)
        child.done.set_result(code)

    def _own(self, handle: Handle) -> _Child | None:
        child = self._children.get(handle.pid)
        if child is not None and abs(child.handle.proc_start - handle.proc_start) <= 0.01:
            return child
        return None

    # -- wait / adopt -----------------------------------------------------------------
    async def wait(self, handle: Handle) -> int | None:
        child = self._own(handle)
        if child is not None:
            return await asyncio.shield(child.done)
        key = (handle.pid, handle.proc_start)
        finished = self._finished.get(key)
        if finished is not None:
            return finished[0]
        await wait_foreign(handle.pid, handle.proc_start)
        if handle.cgroup and key not in self._finished:
            # An adopted instance: keep what its cgroup says, remove it when empty.
            cg = InstanceCgroup.parse(handle.cgroup)
            with contextlib.suppress(OSError):
                if cg.exists():
                    self._finished[key] = (None, OOM_KILLED if cg.oom_kills() > 0 else None)
                    if cg.empty():
                        cg.remove()
        return None

    def adopt(self, handle: Handle) -> bool:
        if not procscan.same_process(handle.pid, handle.proc_start):
            return False
        if not handle.cgroup:
            self._tracker.track(handle)
        if self.pipes is not None and "log_fifo" in handle.extra:
            self.pipes.readopt(handle.extra, f"{handle.extra.get('stack', '')}/{handle.instance}")
        return True

    def exit_reason(self, handle: Handle) -> str | None:
        """Why the instance ended when its exit code does not say it: "oom-killed" when
        the kernel killed it for exceeding its memory limit (cgroups only)."""
        finished = self._finished.get((handle.pid, handle.proc_start))
        if finished is not None:
            return finished[1]
        if handle.cgroup and self._own(handle) is None:  # adopted: ask the cgroup
            cg = InstanceCgroup.parse(handle.cgroup)
            with contextlib.suppress(OSError):
                if cg.exists() and cg.oom_kills() > 0:
                    return OOM_KILLED
        return None

    last_exit_reason = exit_reason

    # -- stop -------------------------------------------------------------------------
    async def stop(self, handle: Handle, signal_name: str, timeout: float) -> None:
        sig = parse_signal(signal_name)
        child = self._own(handle)
        cg = InstanceCgroup.parse(handle.cgroup) if handle.cgroup else None
        if child is not None and child.cgroup is not None:
            cg = child.cgroup  # the same object as the exit handler's: removed once
        if child is not None and cg is not None and not child.done.done():
            with contextlib.suppress(OSError):
                child.oom_at_stop = cg.oom_kills()
        loop = asyncio.get_running_loop()
        known = self._signal_all(handle, child, cg, sig, sweep=True)
        deadline = loop.time() + max(0.0, timeout)
        if not await self._until_gone(handle, child, cg, known, deadline):
            log.info("instance %s: still running %.1fs after %s, sending SIGKILL",
                     handle.instance, timeout, sig.name)
            deadline = loop.time() + KILL_PATIENCE
            while True:
                known |= self._kill_all(handle, child, cg)
                if await self._until_gone(handle, child, cg, known,
                                          min(deadline, loop.time() + 0.5)):
                    break
                if loop.time() >= deadline:
                    log.error("instance %s: processes survive SIGKILL: %s", handle.instance,
                              sorted(self._remaining(handle, child, cg, known)))
                    break
        if cg is not None:
            await self._remove_cgroup(cg)
        self._tracker.forget(handle)

    def _scan(self, fresh: bool = False) -> dict[int, procscan.ProcInfo]:
        return self._procs.table(fresh)

    def _main_alive(self, handle: Handle, child: _Child | None) -> bool:
        if child is not None:
            return not child.done.done()
        return procscan.same_process(handle.pid, handle.proc_start)

    def _signal_all(self, handle: Handle, child: _Child | None, cg: InstanceCgroup | None,
                    sig: int, *, sweep: bool) -> set[tuple[int, float]]:
        """Signal every process of the instance once: the cgroup's, or (without one) the
        process group and the processes we can attribute to the instance; returns the
        latter as (pid, start) for later checks."""
        if cg is not None:
            found: set[int] = set()
            with contextlib.suppress(OSError):
                found = cg.signal(sig)
            if handle.pid not in found and self._main_alive(handle, child):
                with contextlib.suppress(OSError):  # not in its cgroup (could not join)
                    os.killpg(handle.pgid, sig)
            return set()
        members = self._tracker.members(handle, self._scan(), environ=sweep)
        # A process group id cannot be reused while the group has a member.
        if self._main_alive(handle, child) or any(m.pgrp == handle.pgid for m in members):
            with contextlib.suppress(OSError):
                os.killpg(handle.pgid, sig)
        for m in members:
            if m.pgrp != handle.pgid:
                with contextlib.suppress(OSError):
                    os.kill(m.pid, sig)
        return {(m.pid, m.start) for m in members}

    def _kill_all(self, handle: Handle, child: _Child | None,
                  cg: InstanceCgroup | None) -> set[tuple[int, float]]:
        if cg is not None:
            with contextlib.suppress(OSError):
                cg.kill()
        return self._signal_all(handle, child, cg, signal.SIGKILL, sweep=True)

    def _remaining(self, handle: Handle, child: _Child | None, cg: InstanceCgroup | None,
                   known: set[tuple[int, float]]) -> set[int]:
        left: set[int] = set()
        if self._main_alive(handle, child):
            left.add(handle.pid)
            if child is not None:  # ours: waited for by its exit; the rest is read after
                return left
        if cg is not None:
            with contextlib.suppress(OSError):
                left |= cg.pids()
            return left
        left |= {pid for pid, start in known if procscan.same_process(pid, start)}
        left |= {m.pid for m in self._tracker.members(handle, self._scan(), environ=False)}
        return left

    async def _until_gone(self, handle: Handle, child: _Child | None,
                          cg: InstanceCgroup | None, known: set[tuple[int, float]],
                          deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        pause = 0.005
        while True:
            # (our own child counts until it is reaped, by _on_exit)
            if not self._remaining(handle, child, cg, known):
                return True
            if loop.time() >= deadline:
                return False
            if child is not None and not child.done.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(child.done),
                                           min(pause, max(0.0, deadline - loop.time())))
            else:
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
            pause = min(pause * 2, 0.05)

    async def _empty_cgroup(self, cg: InstanceCgroup) -> None:
        """SIGKILL everything in `cg`, wait until it is empty, remove it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KILL_PATIENCE
        while True:
            with contextlib.suppress(OSError):
                if cg.empty():
                    break
                cg.kill()
            if loop.time() >= deadline:
                log.error("cgroup %s: processes survive SIGKILL: %s", cg, sorted(cg.pids()))
                return
            for _ in range(50):
                await asyncio.sleep(0.01)
                with contextlib.suppress(OSError):
                    if cg.empty():
                        break
        await self._remove_cgroup(cg)

    async def _remove_cgroup(self, cg: InstanceCgroup) -> None:
        for _ in range(100):  # rmdir may fail briefly while the last task is released
            if cg.remove():
                return
            await asyncio.sleep(0.01)
        log.warning("cgroup %s could not be removed", cg)

    async def kill_cgroup(self, path: str) -> None:
        """Empty and remove a cgroup left behind (`Handle.cgroup` form, ':'-joined),
        e.g. by a control plane that died; a no-op when it does not exist."""
        cg = InstanceCgroup.parse(path)
        if cg.exists():
            await self._empty_cgroup(cg)

    def orphan_cgroups(self, stack: str | None = None) -> list[str]:
        """Instance cgroups present under our cgroup base (for `stack`, or all stacks),
        in `Handle.cgroup` form: compare with the recorded instances, `kill_cgroup` the
        rest."""
        return self.cgroup_support.list_instances(stack) if self.cgroups_enabled else []

    async def cleanup_orphans(self, stack: str | None = None,
                              keep: Iterable[str] = ()) -> list[str]:
        """`kill_cgroup` every instance cgroup of `stack` (or of all stacks) under our
        base except those in `keep` (the `Handle.cgroup` of adopted instances); returns
        what was removed."""
        kept = {p for k in keep if k for p in k.split(":")}
        removed = []
        for path in self.orphan_cgroups(stack):
            if not kept.intersection(path.split(":")):
                await self.kill_cgroup(path)
                removed.append(path)
        return removed

    async def close(self) -> None:
        if self.pipes is not None:
            await self.pipes.close()
        if self.cgroup_support.enabled:
            prune_empty(self.cgroup_support.bases)
        if self._spawner is not None:
            self._spawner.close()
        await self._tracker.close()
        for child in self._children.values():
            if child.pidfd is not None:
                with contextlib.suppress(Exception):
                    child.done.get_loop().remove_reader(child.pidfd)
                os.close(child.pidfd)
                child.pidfd = None


