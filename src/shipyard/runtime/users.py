"""Running an instance as another user (`user:` of a service).

The names are resolved in the control plane, before the fork (NSS lookups must not run in
a forked child of a threaded process); the child then only makes system calls before its
exec: `setgroups` (the user's supplementary groups, as initgroups would set them),
`setresgid`, `setresuid` (real, effective and saved ids: no way back to root).
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass

from shipyard.errors import RuntimeLaunchError

CAP_SETGID, CAP_SETUID = 6, 7


@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None  # None: a uid without a passwd entry
    home: str | None

    def describe(self) -> str:
        who = self.name or str(self.uid)
        return f"{who} (uid {self.uid}, gid {self.gid})"

    @property
    def is_self(self) -> bool:
        return (self.uid == os.geteuid() and self.gid == os.getegid())


def resolve_user(text: str, service: str = "?") -> RunAs:
    """`nobody`, `65534`, `nobody:nogroup`, `1000:1000` → the ids to run as. A uid
    without a passwd entry runs with gid = uid unless a group is given."""
    user, _, group = text.partition(":")
    entry: pwd.struct_passwd | None = None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise RuntimeLaunchError(f"service {service}: user {user!r} does not exist on "
                                     "this host") from None
    uid = entry.pw_uid if entry is not None else int(user)
    gid = entry.pw_gid if entry is not None else uid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise RuntimeLaunchError(f"service {service}: group {group!r} does not exist on "
                                     "this host") from None
    groups = (tuple(os.getgrouplist(entry.pw_name, gid)) if entry is not None else (gid,))
    return RunAs(uid, gid, groups, entry.pw_name if entry else None,
                 entry.pw_dir if entry else None)


def _capabilities() -> int:
    """The effective capabilities of this process (0 when they cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def can_switch() -> bool:
    """Whether this process may change its user and groups (root with CAP_SETUID and
    CAP_SETGID; not so inside some user namespaces)."""
    caps = _capabilities()
    return os.geteuid() == 0 and bool(caps >> CAP_SETUID & 1) and bool(caps >> CAP_SETGID & 1)


def check_switch(run_as: RunAs, service: str) -> None:
    """Raise RuntimeLaunchError unless the child can become `run_as`."""
    if run_as.is_self:
        return
    if not can_switch():
        raise RuntimeLaunchError(
            f"service {service}: cannot run as {run_as.describe()}: the control plane runs "
            f"as uid {os.geteuid()} without the right to change users",
            hint="run the server as root to use `user:`, or remove it")


def drop_privileges(run_as: RunAs,
                    before: Callable[[], None] | None = None) -> Callable[[], None]:
    """A preexec_fn: run `before` (joining a cgroup, pinning CPUs: still as root), then
    become `run_as` for good."""
    groups, gid, uid = list(run_as.groups), run_as.gid, run_as.uid

    def switch() -> None:
        if before is not None:
            before()
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)

    return switch


def user_environment(env: dict[str, str], run_as: RunAs) -> dict[str, str]:
    """HOME, USER and LOGNAME of `run_as` where the environment only carries the control
    plane's own (a service's explicit values stay)."""
    if run_as.is_self:
        return env
    out = dict(env)
    mine = {"HOME": os.environ.get("HOME"), "USER": os.environ.get("USER"),
            "LOGNAME": os.environ.get("LOGNAME")}
    theirs = {"HOME": run_as.home or "/", "USER": run_as.name or str(run_as.uid),
              "LOGNAME": run_as.name or str(run_as.uid)}
    for key, value in theirs.items():
        if key not in out or out[key] == mine[key]:
            out[key] = value
    return out


def reachable(path: str, run_as: RunAs) -> str | None:
    """The first directory above `path` that `run_as` may not traverse (lacks x), or None.
    Checked by mode bits (ACLs aside), as the kernel would for that uid and groups."""
    if run_as.uid == 0:
        return None
    current = os.path.dirname(os.path.abspath(path))
    groups = set(run_as.groups) | {run_as.gid}
    while True:
        try:
            info = os.stat(current)
        except OSError:
            return current
        if info.st_uid == run_as.uid:
            ok = bool(info.st_mode & 0o100)
        elif info.st_gid in groups:
            ok = bool(info.st_mode & 0o010)
        else:
            ok = bool(info.st_mode & 0o001)
        if not ok:
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent
