"""What the host offers, what a stack asks for, and who holds what.

Capacity is detected from the host (or given in the stack file), then multiplied by the
stack's overcommit ratios: requests are reservations, and most services use far less than
they reserve most of the time. `check_fit` is the question asked before a deploy (does the
whole stack fit?); `ResourceLedger` keeps the running account per instance.

Detection choices:
- cpu: the CPUs this process may run on (affinity), capped by a cgroup v2 `cpu.max` quota,
  so a container limited to 2 CPUs on a 64-core host reports 2.
- memory: total RAM, capped by a cgroup `memory.max`. Total, not available: available
  memory swings with the page cache and with what the instances themselves use, and a
  reservation is about the instances' share of the machine.
- disk: *free* space on the filesystem of `path_for_disk`, not its size. A disk request is
  room to write; on a laptop whose disk is 90% full the total would promise space that
  does not exist. It is measured when detected (the engine detects once per process).
- gpu: the devices NVML or `nvidia-smi` list (resources/gpus.py); 0 when neither
  answers. Their names are kept for messages: a stack asking for more GPUs than exist is
  told which devices there are.

GPU demand: a service with `resources.gpu_shared` needs its `gpu` devices once, whatever
its replicas (they may share them); any other service needs gpu x replicas.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shipyard.errors import ResourceError
from shipyard.resources.gpus import discover_gpus
from shipyard.spec.models import Capacity, Stack
from shipyard.spec.units import format_cpu, format_size

RESOURCES = ("cpu", "memory", "disk", "gpu")
_CPU_SCALE = 1_000_000  # the ledger counts CPU in micro-cores: integer sums never drift
_EPSILON = 1e-9
_TIMES = "\u00d7"  # the multiplication sign, in messages


class ResourcesLike(Protocol):
    """Anything with the four amounts: `spec.models.Resources`, `HostCapacity`..."""

    @property
    def cpu(self) -> float: ...
    @property
    def memory(self) -> int: ...
    @property
    def disk(self) -> int: ...
    @property
    def gpu(self) -> int: ...


@dataclass(frozen=True)
class HostCapacity:
    """Amounts of each resource: cores, bytes, bytes, devices. When it is an effective
    capacity, `base` holds the amounts before overcommit (for messages)."""

    cpu: float
    memory: int
    disk: int
    gpu: int
    base: HostCapacity | None = field(default=None, repr=False, compare=False)
    # The GPUs for messages ("GPU 0 (Tesla T4, GPU-...)", or why there are none).
    gpu_devices: str = field(default="", repr=False, compare=False)

    def amount(self, resource: str) -> float:
        return float(getattr(self, resource))

    def explain(self, resource: str) -> str:
        """'3 (2 x overcommit 1.5)', or '3' when no overcommit applies."""
        total = format_amount(resource, self.amount(resource))
        if self.base is None:
            return total
        base = self.base.amount(resource)
        if base <= 0 or abs(self.amount(resource) - base) < _EPSILON:
            return total
        ratio = self.amount(resource) / base
        return f"{total} ({format_amount(resource, base)} {_TIMES} overcommit {ratio:.3g})"


def format_amount(resource: str, amount: float) -> str:
    """An amount in the stack file's units: 500m, 256Mi, 2."""
    if resource == "cpu":
        return format_cpu(amount)
    if resource in ("memory", "disk"):
        return _format_bytes(int(amount))
    return f"{amount:g}"


def _format_bytes(size: int) -> str:
    """Like `format_size`, but in the largest unit that fits: 9.6Gi, not 10066330Ki."""
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size >= factor:
            if size % factor == 0:
                return format_size(size)
            return f"{size / factor:.3g}{unit}"
    return format_size(size)


# -- detection ------------------------------------------------------------------------


def detect_host_capacity(path_for_disk: str = "/") -> HostCapacity:
    """What this host offers, before overcommit. See the module docstring for choices."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, quota)
    # (what psutil's virtual_memory().total and disk_usage().free read, without psutil)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_memory_limit()
    if limit is not None:
        memory = min(memory, limit)
    try:
        st = os.statvfs(path_for_disk)
        disk = st.f_bavail * st.f_frsize
    except OSError:
        disk = 0
    gpus = discover_gpus()
    return HostCapacity(cpu=cpus, memory=memory, disk=disk, gpu=len(gpus.devices),
                        gpu_devices=gpus.describe())


def detect_gpus(timeout: float = 2.0) -> int:
    """(Kept for callers that only count; `gpus.discover_gpus` names the devices.)
    How many NVIDIA GPUs `nvidia-smi -L` lists; 0 without the tool or on any failure."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return 0
    try:
        out = subprocess.run(
            [tool, "-L"], capture_output=True, text=True, timeout=timeout, check=True,
            stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _cgroup_dirs() -> list[Path]:
    """This process's cgroup v2 directory and its ancestors, innermost first."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return []
    root = Path("/sys/fs/cgroup")
    path = root / rel.lstrip("/")
    dirs = [path, *path.parents]
    return [d for d in dirs if d == root or root in d.parents]


def _cgroup_cpu_quota() -> float | None:
    best: float | None = None
    for d in _cgroup_dirs():
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and int(period) > 0:
            cores = int(quota) / int(period)
            best = cores if best is None else min(best, cores)
    return best


def _cgroup_memory_limit() -> int | None:
    best: int | None = None
    for d in _cgroup_dirs():
        try:
            text = (d / "memory.max").read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            best = int(text) if best is None else min(best, int(text))
    return best


def effective_capacity(capacity: Capacity, host: HostCapacity) -> HostCapacity:
    """The stack's `capacity` values where given, else the host's; times overcommit."""
    over = capacity.overcommit
    base = HostCapacity(
        cpu=host.cpu if capacity.cpu is None else capacity.cpu,
        memory=host.memory if capacity.memory is None else capacity.memory,
        disk=host.disk if capacity.disk is None else capacity.disk,
        gpu=host.gpu if capacity.gpu is None else capacity.gpu,
    )
    return HostCapacity(
        cpu=base.cpu * over.cpu,
        memory=int(base.memory * over.memory),
        disk=int(base.disk * over.disk),
        gpu=int(base.gpu * over.gpu + _EPSILON),
        base=base,
        gpu_devices=host.gpu_devices if capacity.gpu is None else "",
    )


# -- fitting a stack ------------------------------------------------------------------


@dataclass
class Shortfall:
    """One resource a stack asks more of than is available, and who asks for it."""

    resource: str
    requested: float
    available: float
    services: list[tuple[str, float]]  # (service, requests x replicas), largest first
    capacity: HostCapacity | None = None  # the effective capacity, for the explanation

    def describe(self) -> str:
        """'cpu: the stack requests 4 (api 3, worker 1) but only 1 of 3 (2 x overcommit
        1.5) is available'."""
        fmt = format_amount
        who = ", ".join(f"{name} {fmt(self.resource, amount)}" for name, amount in self.services)
        avail = fmt(self.resource, self.available)
        if self.capacity is not None:
            total = self.capacity.explain(self.resource)
            whole = abs(self.capacity.amount(self.resource) - self.available) < _EPSILON
            avail = total if whole else f"{avail} of {total}"
        devices = ""
        if self.resource == "gpu" and self.capacity is not None and self.capacity.gpu_devices:
            devices = f"; this host has: {self.capacity.gpu_devices}"
        return (f"{self.resource}: the stack requests {fmt(self.resource, self.requested)}"
                + (f" ({who})" if who else "") + f" but only {avail} is available" + devices)

    def __str__(self) -> str:
        return f"not enough {self.describe()}"


def stack_demand(stack: Stack) -> dict[str, list[tuple[str, float]]]:
    """Per resource, each service's requests x replicas (services asking nothing left out)."""
    out: dict[str, list[tuple[str, float]]] = {r: [] for r in RESOURCES}
    for name, svc in stack.services.items():
        for resource in RESOURCES:
            amount = float(getattr(svc.resources, resource)) * svc.replicas
            if resource == "gpu" and svc.resources.gpu_shared and svc.replicas > 0:
                amount = float(svc.resources.gpu)
            if amount > 0:
                out[resource].append((name, amount))
    return out


def check_fit(
    stack: Stack,
    host: HostCapacity,
    *,
    already: Mapping[str, ResourcesLike] | None = None,
    others: Iterable[Stack] | None = None,
) -> list[Shortfall]:
    """Whether `stack` fits on `host` (with its capacity overrides and overcommit), next to
    what is `already` allocated (owner → amounts) and the demand of `others` stacks (a stack
    of the same name is the one being replaced and is not counted). Empty list = it fits."""
    effective = effective_capacity(stack.capacity, host)
    used = dict.fromkeys(RESOURCES, 0.0)
    for amounts in (already or {}).values():
        for resource in RESOURCES:
            used[resource] += float(getattr(amounts, resource))
    for other in others or ():
        if other.name == stack.name:
            continue
        for resource, parts in stack_demand(other).items():
            used[resource] += sum(amount for _, amount in parts)
    shortfalls = []
    for resource, parts in stack_demand(stack).items():
        requested = sum(amount for _, amount in parts)
        available = max(effective.amount(resource) - used[resource], 0.0)
        if requested > available + _EPSILON * max(1.0, requested):
            parts.sort(key=lambda part: -part[1])
            shortfalls.append(Shortfall(resource, requested, available, parts, effective))
    return shortfalls


# -- the running account --------------------------------------------------------------


class ResourceLedger:
    """Who holds how much of `capacity` (an effective capacity, overcommit included).

    Amounts are kept as integers (CPU in micro-cores), so allocating and releasing in any
    order returns the ledger exactly to where it was."""

    def __init__(self, capacity: HostCapacity) -> None:
        self.capacity = capacity
        self._cap = _units(capacity.cpu, capacity.memory, capacity.disk, capacity.gpu)
        self._used = [0, 0, 0, 0]
        self._held: dict[str, tuple[int, int, int, int]] = {}

    def allocate(self, owner: str, cpu: float = 0.0, memory: int = 0, disk: int = 0,
                 gpu: int = 0) -> None:
        """Reserve amounts for `owner` (replacing what it held), or raise ResourceError
        naming each shortfall: "api-2 needs 500m cpu but only 200m of 3 (2 x overcommit
        1.5) is free". A failed allocation changes nothing."""
        want = _units(cpu, memory, disk, gpu)
        if min(want) < 0:
            raise ValueError(f"negative resource request for {owner}: {want}")
        had = self._held.get(owner, (0, 0, 0, 0))
        cap, used = self._cap, self._used
        problems = []
        for i in range(4):
            free = cap[i] - used[i] + had[i]
            if want[i] > free:
                problems.append(self._shortfall(i, want[i], free))
        if problems:
            raise ResourceError(
                f"{owner} needs " + "; and ".join(problems),
                hint="lower the service's resources, or raise `capacity` or its "
                     "overcommit in the stack file",
            )
        for i in range(4):
            used[i] += want[i] - had[i]
        self._held[owner] = want

    def release(self, owner: str) -> bool:
        """Give back everything `owner` holds; False if it held nothing."""
        had = self._held.pop(owner, None)
        if had is None:
            return False
        for i in range(4):
            self._used[i] -= had[i]
        return True

    def allocation(self, owner: str) -> HostCapacity | None:
        had = self._held.get(owner)
        return None if had is None else _amounts(had)

    @property
    def owners(self) -> list[str]:
        return list(self._held)

    @property
    def used(self) -> HostCapacity:
        return _amounts(self._used)

    @property
    def free(self) -> HostCapacity:
        return _amounts([c - u for c, u in zip(self._cap, self._used, strict=True)])

    def _shortfall(self, index: int, want: int, free: int) -> str:
        resource = RESOURCES[index]
        scale = _CPU_SCALE if index == 0 else 1
        return (f"{format_amount(resource, want / scale)} {resource} but only "
                f"{format_amount(resource, max(free, 0) / scale)} of "
                f"{self.capacity.explain(resource)} is free")


def _units(cpu: float, memory: int, disk: int, gpu: int) -> tuple[int, int, int, int]:
    return (round(cpu * _CPU_SCALE), int(memory), int(disk), int(gpu))


def _amounts(units: tuple[int, int, int, int] | list[int]) -> HostCapacity:
    return HostCapacity(cpu=units[0] / _CPU_SCALE, memory=units[1], disk=units[2],
                        gpu=units[3])
