"""Launch helpers of the process runtime: checks made before spawning (workdir,
command resolution), the log file, the Popen call, the cgroup-joining preexec_fn, signal
names, and waiting for a process that is not our child."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Callable

from shipyard.errors import InputError, RuntimeLaunchError
from shipyard.runtime import procscan
from shipyard.runtime.base import LaunchSpec
from shipyard.runtime.users import check_switch, drop_privileges, resolve_user, user_environment

MARKER_KEYS = ("SHIPYARD_STACK", "SHIPYARD_SERVICE", "SHIPYARD_INSTANCE")


def parse_signal(name: str | int) -> signal.Signals:
    """`SIGTERM`, `TERM`, `sigterm` or `15` → signal.SIGTERM."""
    if isinstance(name, int) or str(name).strip().isdigit():
        try:
            return signal.Signals(int(name))
        except ValueError:
            raise InputError(f"unknown signal {name!r}") from None
    text = str(name).strip().upper()
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text]
    except KeyError:
        raise InputError(f"unknown signal {name!r}") from None


def launch(spec: LaunchSpec, executable: str, fd: int,
           preexec: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """Start the child in a session of its own, stdin from /dev/null, stdout and stderr
    to `fd`. Without a preexec_fn, CPython starts it by vfork + exec: fast, whatever the
    size of the control plane, and no Python code runs in the child. With `spec.user`
    (another user than ours) the child becomes that user after `preexec` (which still
    runs as root: joining a cgroup), just before its exec; see runtime/users."""
    env = spec.env
    if spec.user is not None:
        run_as = resolve_user(spec.user, spec.service)
        check_switch(run_as, spec.service)
        if not run_as.is_self:
            preexec = drop_privileges(run_as, preexec)
            env = user_environment(env, run_as)
    return subprocess.Popen(
        spec.argv, executable=executable, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
        cwd=spec.workdir, env=env, start_new_session=True, close_fds=True,
        preexec_fn=preexec,
    )


def cgroup_joiner(files: list[str]) -> Callable[[], None]:
    """A preexec_fn: the forked child moves itself into the cgroup before it execs."""
    encoded = [os.fsencode(f) for f in files]

    def join() -> None:
        pid = str(os.getpid()).encode()
        for path in encoded:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return join


async def wait_foreign(pid: int, start: float, poll: float = 0.2) -> None:
    """Return when the process `pid` (started at `start`, not our child) has exited: a
    pidfd wakes us without polling; psutil-style polling where pidfds are missing."""
    if not procscan.same_process(pid, start):
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while procscan.same_process(pid, start):
            await asyncio.sleep(poll)
        return
    try:
        if not procscan.same_process(pid, start):  # reused between check and open
            return
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
        try:
            await exited
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def check_workdir(spec: LaunchSpec) -> None:
    if not os.path.exists(spec.workdir):
        raise RuntimeLaunchError(f"service {spec.service}: workdir {spec.workdir} does not exist")
    if not os.path.isdir(spec.workdir):
        raise RuntimeLaunchError(
            f"service {spec.service}: workdir {spec.workdir} is not a directory")


def resolve_command(spec: LaunchSpec) -> str:
    """The file `spec.argv[0]` names, searched in spec.env's PATH (relative paths from
    the workdir, as the child will see them); RuntimeLaunchError when there is none."""
    cmd = spec.argv[0]
    where = f"service {spec.service}: command {cmd!r}"
    if "/" in cmd:
        full = cmd if os.path.isabs(cmd) else os.path.join(spec.workdir, cmd)
        if not os.path.exists(full):
            raise RuntimeLaunchError(f"{where} not found ({full} does not exist)")
        if os.path.isdir(full) or not _executable(full):
            raise RuntimeLaunchError(f"{where} is not executable ({full})")
        return full
    path_env = spec.env.get("PATH", os.defpath)
    dirs = [d if os.path.isabs(d) else os.path.join(spec.workdir, d)
            for d in path_env.split(os.pathsep)]
    found = shutil.which(cmd, path=os.pathsep.join(dirs))
    if found:
        return found
    for d in dirs:
        candidate = os.path.join(d, cmd)
        if os.path.isfile(candidate):
            raise RuntimeLaunchError(f"{where} is not executable ({candidate})")
    raise RuntimeLaunchError(f"{where} not found (PATH={path_env})")


def _executable(path: str) -> bool:
    """X_OK for the effective ids (what execve checks), capabilities included."""
    if os.access in os.supports_effective_ids:
        return os.access(path, os.X_OK, effective_ids=True)
    return os.access(path, os.X_OK)


def open_log(spec: LaunchSpec) -> int:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(spec.log_path)), exist_ok=True)
        return os.open(spec.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       0o640)
    except OSError as exc:
        raise RuntimeLaunchError(f"service {spec.service}: cannot open log file "
                                 f"{spec.log_path}: {exc.strerror or exc}") from exc


def env_marker(env: dict[str, str]) -> str | None:
    """The environment entries that identify the instance's processes, when the engine
    set SHIPYARD_STACK and SHIPYARD_INSTANCE."""
    if "SHIPYARD_STACK" not in env or "SHIPYARD_INSTANCE" not in env:
        return None
    entries = [f"{k}={env[k]}" for k in MARKER_KEYS if k in env]
    if any("\n" in e or "\0" in e for e in entries):
        return None
    return "\n".join(entries)
