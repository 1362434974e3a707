"""Limits of process instances beyond cpu and memory: CPU pinning and swap.

CPU pinning (`LaunchSpec.cpuset`, `.mems`):
- cgroup v1: the cpuset hierarchy is one of the instance's hierarchies. A v1 cpuset
  cgroup starts with empty `cpuset.cpus` and `cpuset.mems`, and no task may join it until
  both are set, so every level Shipyard creates (`shipyard/`, the stack, the instance)
  gets them: the instance its own cpuset (or its parent's, when it is not pinned), the
  levels above copies of their parent's. The kernel then sets the affinity of whatever
  joins, and keeps every descendant inside.
- cgroup v2: `cpuset.cpus` / `cpuset.mems` of the instance's cgroup, when the cpuset
  controller is enabled there (empty files there mean "inherit", so nothing else is set).
- no cgroup, or no cpuset controller: the child sets its own CPU affinity before exec
  (`affinity_preexec`), which its descendants inherit; they could widen it again, and
  memory nodes are not restricted.

Swap (`LaunchSpec.swap_limit`, bytes beyond memory_limit; None = unlimited):
- v1: memory.memsw.limit_in_bytes = memory + swap, when the file exists (the kernel has
  swap accounting, `swapaccount=1`); otherwise a warning, once per control plane.
- v2: memory.swap.max = swap.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable

from shipyard.errors import RuntimeLaunchError, TransientLaunchError

log = logging.getLogger("shipyard.runtime.process")

_warned: set[str] = set()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def write_control(path: str, value: str) -> None:
    """Write a cgroup control file in one write(2), as the kernel expects."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)


# -- cpuset ---------------------------------------------------------------------------
def is_v1_cpuset(path: str) -> bool:
    """Whether `path` is a directory of a cgroup v1 cpuset hierarchy."""
    return os.path.exists(os.path.join(path, "cpuset.cpus")) and not os.path.exists(
        os.path.join(path, "cgroup.controllers"))


def inherit_v1(path: str) -> None:
    """Give v1 cpuset directory `path` its parent's cpus and mems where it has none."""
    parent = os.path.dirname(path)
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not _read(os.path.join(path, name)):
            write_control(os.path.join(path, name), _read(os.path.join(parent, name)))


def apply_cpuset(paths: list[str], version: int, cpuset: str | None,
                 mems: str | None) -> bool:
    """Write the instance's cpuset into its cgroup; True when the cgroup now enforces it
    (False: no cpuset controller here; the caller pins by affinity instead). Raises
    RuntimeLaunchError when the kernel refuses the CPUs or nodes (outside those the
    control plane may use)."""
    for path in paths:
        if version == 1 and is_v1_cpuset(path):
            try:
                parent = os.path.dirname(path)  # the stack's, under shipyard/
                inherit_v1(os.path.dirname(parent))
                inherit_v1(parent)
                write_control(os.path.join(path, "cpuset.cpus"),
                       cpuset or _read(os.path.join(parent, "cpuset.cpus")))
                write_control(os.path.join(path, "cpuset.mems"),
                       mems or _read(os.path.join(parent, "cpuset.mems")))
            except OSError as exc:
                raise _refused(path, cpuset, mems, exc) from exc
            return cpuset is not None
        if version == 2 and cpuset is not None:
            cpus_file = os.path.join(path, "cpuset.cpus")
            if not os.path.exists(cpus_file):
                return False
            try:
                write_control(cpus_file, cpuset)
                if mems:
                    write_control(os.path.join(path, "cpuset.mems"), mems)
            except OSError as exc:
                raise _refused(path, cpuset, mems, exc) from exc
            return True
    return False


def _refused(path: str, cpuset: str | None, mems: str | None,
             exc: OSError) -> RuntimeLaunchError:
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR):
        # not a refusal: the control plane is short of something that may come back
        return TransientLaunchError(f"cannot set up the cpuset of {path}: "
                                    f"{exc.strerror or exc}")
    parent = os.path.dirname(path)
    allowed = "?"
    with contextlib.suppress(OSError):
        allowed = (_read(os.path.join(parent, "cpuset.effective_cpus"))
                   or _read(os.path.join(parent, "cpuset.cpus")))
    return RuntimeLaunchError(
        f"cpuset {cpuset or '(inherited)'} / memory nodes {mems or '(inherited)'} refused "
        f"by the kernel in {path} ({exc.strerror or exc}); the CPUs available there are "
        f"{allowed}")


def affinity_preexec(cpuset: str | None,
                     then: Callable[[], None] | None = None) -> Callable[[], None] | None:
    """A preexec_fn pinning the child to `cpuset` (after `then`, e.g. joining a cgroup),
    or `then` itself when there is nothing to pin. RuntimeLaunchError here, in the parent,
    when none of the CPUs is one this control plane may use (the kernel would refuse)."""
    if cpuset is None:
        return then
    from shipyard.resources.topology import parse_cpulist

    cpus = set(parse_cpulist(cpuset))
    with contextlib.suppress(AttributeError, OSError):
        allowed = os.sched_getaffinity(0)
        if not cpus & allowed:
            raise RuntimeLaunchError(
                f"cpuset {cpuset}: none of these CPUs may be used here (allowed: "
                f"{','.join(str(c) for c in sorted(allowed))})")

    def pin() -> None:
        if then is not None:
            then()
        os.sched_setaffinity(0, cpus)

    return pin


# -- swap -----------------------------------------------------------------------------
def apply_swap(find: Callable[[str], str | None], memory_limit: int,
               swap_limit: int | None) -> bool:
    """Limit swap beyond `memory_limit` to `swap_limit` bytes; `find(name)` is the path of
    a control file of the instance's cgroup, or None. True when enforced."""
    if swap_limit is None or memory_limit <= 0:
        return False
    name, value = "memory.swap.max", swap_limit
    f = find(name)
    if f is None:
        name, value = "memory.memsw.limit_in_bytes", memory_limit + swap_limit
        f = find(name)
    if f is not None:
        try:
            write_control(f, str(value))
            return True
        except OSError as exc:
            log.warning("cannot write %s (%s): the swap limit is not enforced", f,
                        exc.strerror or exc)
            return False
    warn_once("swap", "swap limits are not enforced: this kernel has no swap accounting "
                      "(memory.memsw.* or memory.swap.max missing; on cgroup v1 boot with "
                      "swapaccount=1)")
    return False
