"""Where instances run, behind one interface. The process runtime is the default;
containers and Kubernetes follow the same shape."""

from __future__ import annotations

import abc
import contextlib
import os
import signal
from dataclasses import dataclass, field

from shipyard.runtime.container_spec import ContainerSpec


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one instance; already resolved (no ${VAR} left)."""

    stack: str
    service: str
    instance: str
    argv: list[str]  # exec'd directly; with shell=True argv is ["/bin/sh", "-c", cmd]
    env: dict[str, str]  # the complete environment of the child
    workdir: str
    log_path: str  # stdout and stderr are appended here
    log_max_bytes: int = 10 * 2**20  # rotate when the file grows past this
    log_backups: int = 3
    stop_signal: str = "SIGTERM"
    stop_timeout: float = 10.0
    cpu_limit: float = 0.0  # cores; 0 = unlimited
    memory_limit: int = 0  # bytes; 0 = unlimited
    swap_limit: int | None = None  # bytes of swap beyond memory_limit; 0 = none; None = any
    cpuset: str | None = None  # CPUs to run on, "0-3,6"; None = not pinned
    mems: str | None = None  # NUMA memory nodes to allocate from, "0"; None = inherited
    container: ContainerSpec | None = None  # set for a service with an image
    user: str | None = None  # run as: name, uid, name:group or uid:gid (runtime/users)


@dataclass
class Handle:
    """What identifies a running instance, persistable so a restarted control plane can
    re-adopt it."""

    instance: str
    pid: int
    pgid: int
    proc_start: float  # psutil create_time(): a reused pid has another
    cgroup: str | None = None  # cgroup path(s) joined by ':' when cgroups are in use
    extra: dict[str, str] = field(default_factory=dict)


class Runtime(abc.ABC):
    name: str

    @abc.abstractmethod
    async def start(self, spec: LaunchSpec) -> Handle:
        """Start the instance; raises RuntimeLaunchError with a clear message if it cannot
        (command not found or not executable, missing workdir)."""

    @abc.abstractmethod
    async def wait(self, handle: Handle) -> int | None:
        """Wait until the instance has exited; its exit code (negative = killed by that
        signal), or None when it is unknown (an adopted process that is not our child)."""

    @abc.abstractmethod
    async def stop(self, handle: Handle, signal_name: str, timeout: float) -> None:
        """Send `signal_name` to every process of the instance, SIGKILL after `timeout`,
        and return once none is left (including grandchildren, where cgroups allow)."""

    @abc.abstractmethod
    def adopt(self, handle: Handle) -> bool:
        """True if the instance described by `handle` still runs and can be supervised."""

    def exit_reason(self, handle: Handle) -> str | None:
        """Why the instance ended when its exit code does not say it (e.g. "oom-killed"),
        once `wait()` has returned; None when there is nothing more to say."""
        return None

    async def kill_cgroup(self, path: str) -> None:
        """Kill whatever is left in a recorded `Handle.cgroup` (a control plane that died
        may leave grandchildren behind); runtimes without cgroups do nothing."""
        return None

    async def send_signal(self, handle: Handle, signal_name: str) -> None:
        """Send a signal to the instance's process group (e.g. SIGSTOP / SIGCONT to
        pause and resume it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handle.pgid, signal.Signals[signal_name])

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release
        """Release what the runtime holds (not the instances)."""
