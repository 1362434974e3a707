"""Per-instance cgroups for the process runtime.

Layout: `<base>/shipyard/<stack>/<instance>` where `<base>` is, in each hierarchy, the
cgroup of the control plane itself (or `parent` when given, relative to the hierarchy
root). cgroup v1 uses the memory, cpu, cpuset, pids and freezer hierarchies that are
mounted; v2 uses one directory with memory.max, cpu.max, the cpuset and pids controllers
when they can be enabled (cpusets and swap: runtime/limits.py).

cgroup v1: an instance gets a directory only in the hierarchies it needs
(`CgroupSupport.select`): pids and freezer always (they list its processes and stop
them all at once, forks included), memory only with a memory limit, cpu only with a cpu
limit, cpuset only when it is pinned. In the others it stays where the control plane is,
which the cgroups made here would only have copied (unlimited children of our own
cgroup). Each directory is a mkdir at start and an rmdir at stop, so a plain instance
costs two of each instead of five. OOM kills are read from memory.oom_control, so on v1
an instance without a memory limit has no OOM count: a host-wide OOM kill of it shows
as its SIGKILL exit (-9) without the "oom-killed" reason (it has no limit of its own to
exceed; a limited instance, and every v2 instance, still report it). The recorded
`Handle.cgroup` lists exactly the directories made, so a restarted control plane finds
and empties them.

Everything here is synchronous file I/O on cgroupfs (fast, no blocking waits); waiting
is left to the caller.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from shipyard.runtime.cgroup_instance import InstanceCgroup, read_control
from shipyard.runtime.limits import (
    apply_cpuset,
    inherit_v1,
    is_v1_cpuset,
    write_control,
)

CgroupMode = Literal["auto", "v1", "v2", "off"]

V1_CONTROLLERS = ("memory", "cpu", "cpuset", "pids", "freezer")
V2_CONTROLLERS = ("memory", "cpu", "cpuset", "pids")
V1_ALWAYS = frozenset({"pids", "freezer"})  # every v1 instance: listing, freezing, killing
LIMITS = ("memory", "cpu")  # the controllers needed to enforce LaunchSpec limits
TOP = "shipyard"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(name: str) -> str:
    """A cgroup directory name for a stack or instance name."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".")
    return cleaned or "_"


@dataclass(frozen=True)
class Mount:
    root: str  # the path inside the hierarchy that is mounted at `mountpoint`
    mountpoint: str
    fstype: str
    options: frozenset[str]  # super options; for cgroup v1 they name the controllers


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts of a /proc/<pid>/mountinfo text."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 3 or rf[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(Mount(_unescape(lf[3]), _unescape(lf[4]), rf[0],
                            frozenset(rf[2].split(","))))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """controller -> cgroup path from /proc/<pid>/cgroup; "" is the v2 hierarchy."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for ctl in controllers.split(","):
            if ctl:
                paths[ctl] = path
    return paths


def member_dirs(mounts: list[Mount], proc_cgroup: str) -> list[str] | None:
    """The directory of each v1 hierarchy in `mounts` that a task is in, from its
    /proc/<pid>/cgroup (or /proc/thread-self/cgroup) text; None when one is not visible
    through its mount (outside the mounted subtree or the cgroup namespace)."""
    own = parse_proc_cgroup(proc_cgroup)
    out = []
    for mount in mounts:
        path = next((own[c] for c in V1_CONTROLLERS if c in mount.options and c in own), None)
        root = mount.root.rstrip("/")
        if path is None or (root and path != root and not path.startswith(root + "/")):
            return None
        rel = path[len(root):]
        if rel.startswith("/.."):
            return None
        out.append(os.path.normpath(os.path.join(mount.mountpoint, rel.lstrip("/"))))
    return out


def mount_index(mounts: list[Mount], path: str) -> int | None:
    """The index in `mounts` of the hierarchy that cgroup directory `path` is in (the
    mount point it is under; the longest, should one be inside another)."""
    best, length = None, -1
    for i, mount in enumerate(mounts):
        point = mount.mountpoint.rstrip("/")
        if (path == point or path.startswith(point + "/")) and len(point) > length:
            best, length = i, len(point)
    return best


def _hierarchy_dir(mount: Mount, cg_path: str, parent: str | None) -> str:
    if parent is not None:
        return os.path.join(mount.mountpoint, parent.strip("/"))
    root = mount.root.rstrip("/")
    rel = cg_path[len(root):] if root and cg_path.startswith(root + "/") else cg_path
    if root and cg_path == root:
        rel = ""
    # A path outside our cgroup namespace shows as /../..: use the mount itself.
    if rel.startswith("/.."):
        rel = ""
    return os.path.join(mount.mountpoint, rel.strip("/"))


@dataclass
class CgroupSupport:
    """What this host lets us do with cgroups, found once by `detect()`."""

    version: int  # 0 = not usable, 1 or 2
    bases: list[str] = field(default_factory=list)  # the `.../shipyard` directories
    mounts: list[Mount] = field(default_factory=list)  # v1: the hierarchy of each base
    limits: frozenset[str] = frozenset()  # subset of LIMITS that can be enforced
    problem: str | None = None  # why cgroups (or some limits) are unavailable
    cpuset: bool = False  # whether cpusets are enforced by the cgroup (else by affinity)

    @property
    def enabled(self) -> bool:
        return self.version in (1, 2) and bool(self.bases)

    def instance_paths(self, stack: str, instance: str,
                       hierarchies: list[int] | None = None) -> list[str]:
        """The instance's directory in each base (or in the bases `hierarchies` index)."""
        bases = self.bases if hierarchies is None else [self.bases[i] for i in hierarchies]
        return [os.path.join(b, safe_name(stack), safe_name(instance)) for b in bases]

    def controllers(self, index: int) -> frozenset[str]:
        """The controllers of base `index` (v1: those of its hierarchy)."""
        if self.version != 1 or index >= len(self.mounts):
            return frozenset(V2_CONTROLLERS if self.version == 2 else V1_CONTROLLERS)
        return frozenset(c for c in V1_CONTROLLERS if c in self.mounts[index].options)

    def select(self, cpu_limit: float, memory_limit: int, pinned: bool) -> list[int]:
        """The bases an instance with these limits gets a directory in (indexes, in base
        order): v2 its one hierarchy; v1 pids and freezer, plus memory, cpu and cpuset
        when it has a memory limit, a cpu limit, a pin (or at least the first hierarchy,
        where neither pids nor freezer is mounted and nothing else is wanted)."""
        if self.version != 1:
            return list(range(len(self.bases)))
        wanted = set(V1_ALWAYS)
        if memory_limit > 0:
            wanted.add("memory")
        if cpu_limit > 0:
            wanted.add("cpu")
        if pinned:
            wanted.add("cpuset")
        chosen = [i for i in range(len(self.bases)) if self.controllers(i) & wanted]
        return chosen or [0]

    def stack_dirs(self, stack: str) -> list[str]:
        return [os.path.join(b, safe_name(stack)) for b in self.bases]

    def create(self, stack: str, instance: str, cpu_limit: float, memory_limit: int, *,
               swap_limit: int | None = None, cpuset: str | None = None,
               mems: str | None = None) -> InstanceCgroup:
        """Create the (empty) cgroup of an instance, in the hierarchies it needs (see
        `select`), and apply its limits. A leftover directory must have been emptied and
        removed by the caller first. Raises RuntimeLaunchError (after removing it) when
        the kernel refuses the cpuset."""
        chosen = self.select(cpu_limit, memory_limit, bool(cpuset or mems))
        paths = self.instance_paths(stack, instance, chosen)
        controllers = frozenset().union(*(self.controllers(i) for i in chosen))
        for attempt in range(3):
            try:
                for path in paths:
                    if self.version == 1:  # the stack directory is usually there already
                        try:
                            os.mkdir(path)
                            continue
                        except FileExistsError:
                            continue
                        except FileNotFoundError:
                            pass
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    if self.version == 2:
                        _enable_v2_controllers(os.path.dirname(path))
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(path)
                break
            except FileNotFoundError:  # a concurrent stop() removed the stack directory
                if attempt == 2:
                    raise
        # v1: what it is in (and so what it may own); v2: unknown (controllers enabled)
        cg = InstanceCgroup(paths, controllers=controllers if self.version == 1 else None)
        if "cpuset" in controllers:  # v1: a cpuset directory needs its cpus and mems
            try:
                cg.cpuset_applied = apply_cpuset(paths, self.version, cpuset, mems)
            except Exception:
                cg.remove()
                raise
        cg.apply_limits(cpu_limit, memory_limit, swap_limit)
        return cg

    def list_instances(self, stack: str | None = None) -> list[str]:
        """`InstanceCgroup` strings of the instance cgroups under our bases (leftovers
        of a control plane that died, for example)."""
        found: dict[tuple[str, str], list[str]] = {}
        for base in self.bases:
            stacks = [safe_name(stack)] if stack is not None else _subdirs(base)
            for st in stacks:
                for inst in _subdirs(os.path.join(base, st)):
                    found.setdefault((st, inst), []).append(os.path.join(base, st, inst))
        return [":".join(paths) for paths in found.values()]


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def _enable_v2_controllers(path: str) -> set[str]:
    """Enable for the children of `path` what it has of V2_CONTROLLERS; what got enabled."""
    try:
        available = set(read_control(os.path.join(path, "cgroup.controllers")).split())
        enabled = set(read_control(os.path.join(path, "cgroup.subtree_control")).split())
    except OSError:
        return set()
    for ctl in V2_CONTROLLERS:
        if ctl in available and ctl not in enabled:
            try:
                write_control(os.path.join(path, "cgroup.subtree_control"), f"+{ctl}")
                enabled.add(ctl)
            except OSError:
                pass
    return enabled & set(V2_CONTROLLERS)


def _enable_v2_own(path: str, *, move_self: bool) -> None:
    """Enable the controllers for the children of our own v2 cgroup. The kernel refuses
    (EBUSY) while that cgroup holds processes, unless it is the root ("no internal
    processes"): as systemd's delegation model asks, the control plane, when it is alone
    there, then moves itself into a leaf, `<own>/shipyard-control`, and tries again."""
    wanted = set(V2_CONTROLLERS)
    with contextlib.suppress(OSError):
        wanted &= set(read_control(os.path.join(path, "cgroup.controllers")).split())
    if wanted <= _enable_v2_controllers(path) or not move_self:
        return
    try:
        procs = read_control(os.path.join(path, "cgroup.procs")).split()
        if procs != [str(os.getpid())]:  # empty, or others would still be in the way
            return
        leaf = os.path.join(path, "shipyard-control")
        os.makedirs(leaf, exist_ok=True)
        write_control(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
    except OSError:
        return
    _enable_v2_controllers(path)


def detect(mode: CgroupMode = "auto", parent: str | None = None, *, top: str = TOP,
           mountinfo: str = "/proc/self/mountinfo",
           proc_cgroup: str = "/proc/self/cgroup") -> CgroupSupport:
    """Find the cgroup hierarchies we can use and check we may create cgroups there."""
    if mode == "off":
        return CgroupSupport(0, problem="cgroups disabled by configuration")
    try:
        mounts = parse_mountinfo(read_control(mountinfo))
        own = parse_proc_cgroup(read_control(proc_cgroup))
    except OSError as exc:
        return CgroupSupport(0, problem=f"cannot read cgroup information: {exc}")
    v1: dict[str, Mount] = {}
    for m in mounts:
        if m.fstype == "cgroup":
            for ctl in V1_CONTROLLERS:
                if ctl in m.options and ctl not in v1:
                    v1[ctl] = m
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if mode == "v1" or (mode == "auto" and v1):
        if not v1:
            return CgroupSupport(0, problem="no cgroup v1 controller is mounted")
        dirs: list[str] = []
        used: list[Mount] = []
        for ctl, mount in v1.items():
            d = _hierarchy_dir(mount, own.get(ctl, "/"), parent)
            if d not in dirs:
                dirs.append(d)
                used.append(mount)
        support = _probe(1, [os.path.join(d, top) for d in dirs])
        if support.enabled:
            support.limits = frozenset(c for c in LIMITS if c in v1)
            support.mounts = used
            _prepare_v1_cpuset(support)
    elif v2 is not None and mode in ("auto", "v2"):
        top_dir = os.path.join(_hierarchy_dir(v2, own.get("", "/"), parent), top)
        support = _probe(2, [top_dir])
        if support.enabled:
            _enable_v2_own(os.path.dirname(top_dir), move_self=parent is None)
            enabled = _enable_v2_controllers(top_dir)
            support.limits = frozenset(c for c in LIMITS if c in enabled)
            support.cpuset = "cpuset" in enabled
    else:
        return CgroupSupport(0, problem="no cgroup hierarchy is mounted")
    if support.enabled and set(LIMITS) - support.limits:
        missing = ", ".join(sorted(set(LIMITS) - support.limits))
        support.problem = (f"cgroup v{support.version}: controller(s) {missing} not available"
                           f" under {os.path.dirname(support.bases[0])}")
    return support


def _prepare_v1_cpuset(support: CgroupSupport) -> None:
    """Give our v1 cpuset directory its parent's cpus and mems (tasks cannot join a cpuset
    without them); without permission, leave the cpuset hierarchy out (pinning then falls
    back to CPU affinity)."""
    for i, base in enumerate(support.bases):
        if is_v1_cpuset(base):
            try:
                inherit_v1(base)
                support.cpuset = True
            except OSError:
                del support.bases[i], support.mounts[i]
            return


def prune_empty(bases: list[str]) -> None:
    """Remove the empty cgroup directories under (and including) `bases`: stacks that are
    gone, and the top one when nothing runs. Cgroups of running instances are busy and
    stay, to be re-adopted."""
    for base in bases:
        for root, dirs, _ in os.walk(base, topdown=False):
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(root, d))
        with contextlib.suppress(OSError):
            os.rmdir(base)


def _probe(version: int, bases: list[str]) -> CgroupSupport:
    probe_name = f".probe-{os.getpid()}"
    for base in bases:
        try:
            os.makedirs(base, exist_ok=True)
            probe = os.path.join(base, probe_name)
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as exc:
            return CgroupSupport(0, problem=f"cannot create cgroups under {base}: "
                                            f"{exc.strerror or exc}")
    return CgroupSupport(version, bases=bases)
