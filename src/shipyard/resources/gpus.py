"""GPUs: which devices the host has, and which instance holds which.

Discovery, in order: NVML through `nvidia-ml-py` (the `pynvml` module, imported only
here and only when present: it is an optional dependency), else
`nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader`, run without
a shell and with a short timeout, else none. Both report devices in PCI bus order, which
is why `gpu_env` sets CUDA_DEVICE_ORDER=PCI_BUS_ID: CUDA's own default order ("fastest
first") could otherwise number the same devices differently.

Allocation: `resources.gpu: N` gets N specific devices. A device held by an instance is
not given to another, unless both are of services with `resources.gpu_shared: true`
(time-slicing, or MPS set up by the user); a shared instance never gets a device an
exclusive one holds, and is given the least shared devices first.
How a device reaches the instance: a process gets CUDA_VISIBLE_DEVICES and
NVIDIA_VISIBLE_DEVICES (`gpu_env`); a container gets a device request for those devices
(`ContainerSpec.gpus`) and sees them numbered from 0, so it gets no CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from shipyard.errors import ResourceError

QUERY = ["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader"]
# Runs argv, returns its stdout; raises OSError or subprocess.SubprocessError on failure.
Runner = Callable[[list[str], float], str]
_MEMORY_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    memory: int  # bytes; 0 when unknown

    def describe(self) -> str:
        """"GPU 0 (Tesla T4, GPU-5a3b...)"."""
        return f"GPU {self.index} ({self.name}, {self.uuid})"


@dataclass(frozen=True)
class GpuInventory:
    devices: tuple[GpuDevice, ...] = ()
    source: str = "none"  # "nvml", "nvidia-smi" or "none"
    problem: str | None = None  # why nothing was found, when something was tried

    def describe(self) -> str:
        """The devices for a message: "GPU 0 (Tesla T4, GPU-...), GPU 1 (...)", or why
        there are none."""
        if self.devices:
            return ", ".join(d.describe() for d in self.devices)
        return f"no GPU was found ({self.problem or 'no NVIDIA driver'})"


def run_tool(argv: list[str], timeout: float) -> str:
    """The default runner: no shell, stdin closed, stdout returned, errors raised."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True,
                          stdin=subprocess.DEVNULL).stdout


def parse_query_output(text: str) -> list[GpuDevice]:
    """Devices from `nvidia-smi --query-gpu=index,uuid,name,memory.total
    --format=csv,noheader` output ("0, GPU-..., Tesla T4, 15360 MiB"). A name may contain
    commas: the fields around it are taken from both ends."""
    devices = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        index, uuid, memory = int(parts[0]), parts[1], _memory(parts[-1])
        name = ", ".join(parts[2:-1])
        devices.append(GpuDevice(index, uuid, name, memory))
    return sorted(devices, key=lambda d: d.index)


def _memory(text: str) -> int:
    number, _, unit = text.strip().partition(" ")
    try:
        return int(float(number) * _MEMORY_UNITS.get(unit.strip().lower() or "mib", 2**20))
    except ValueError:
        return 0  # "[N/A]", "[Not Supported]"


def _from_nvml() -> list[GpuDevice] | None:
    """Devices through NVML, or None when nvidia-ml-py or the driver is missing."""
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, _DriverNotLoaded...: no usable driver
        return None
    try:
        devices = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            uuid, name = nvml.nvmlDeviceGetUUID(handle), nvml.nvmlDeviceGetName(handle)
            devices.append(GpuDevice(
                i, uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                name.decode() if isinstance(name, bytes) else str(name),
                int(nvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return devices
    except Exception:  # a device that fails mid-query: let nvidia-smi have a go
        return None
    finally:
        with contextlib.suppress(Exception):  # nothing to do about a failed shutdown
            nvml.nvmlShutdown()


def discover_gpus(*, runner: Runner | None = None, use_nvml: bool = True,
                  timeout: float = 2.0, tool: str | None = None) -> GpuInventory:
    """The host's NVIDIA GPUs (see the module docstring). `runner` and `tool` replace
    running the real nvidia-smi (tests feed it recorded output)."""
    if use_nvml and runner is None:
        found = _from_nvml()
        if found:
            return GpuInventory(tuple(found), "nvml")
    if tool is None:
        tool = shutil.which("nvidia-smi")
        if tool is None:
            return GpuInventory(problem="nvidia-smi is not installed")
    try:
        out = (runner or run_tool)([tool, *QUERY], timeout)
    except subprocess.TimeoutExpired:
        return GpuInventory(problem=f"nvidia-smi did not answer within {timeout:g}s")
    except (OSError, subprocess.SubprocessError) as exc:
        return GpuInventory(problem=f"nvidia-smi failed: {exc}")
    devices = parse_query_output(out)
    if not devices:
        return GpuInventory(source="nvidia-smi", problem="nvidia-smi lists no GPU")
    return GpuInventory(tuple(devices), "nvidia-smi")


def gpu_env(devices: Iterable[GpuDevice]) -> dict[str, str]:
    """The environment that confines a process to `devices` (none: no GPU at all)."""
    indices = ",".join(str(d.index) for d in devices)
    return {"CUDA_VISIBLE_DEVICES": indices, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "NVIDIA_VISIBLE_DEVICES": indices or "void"}


@dataclass
class _Hold:
    devices: tuple[int, ...]
    shared: bool


class GpuAllocator:
    """Which instance holds which of `devices`; see the module docstring for sharing.
    Not thread-safe: it belongs to the engine's event loop."""

    def __init__(self, devices: Iterable[GpuDevice]) -> None:
        self.devices = tuple(sorted(devices, key=lambda d: d.index))
        self._by_index = {d.index: d for d in self.devices}
        self._held: dict[str, _Hold] = {}

    def holders(self, index: int) -> list[str]:
        return sorted(o for o, h in self._held.items() if index in h.devices)

    def devices_of(self, owner: str) -> list[GpuDevice]:
        hold = self._held.get(owner)
        return [] if hold is None else [self._by_index[i] for i in hold.devices]

    def allocate(self, owner: str, count: int, *, shared: bool = False) -> list[GpuDevice]:
        """`count` devices for `owner` (replacing what it held), or ResourceError naming
        each device and who holds it. A failed allocation changes nothing."""
        if count < 0:
            raise ValueError(f"{owner}: negative GPU count {count}")
        previous = self._held.pop(owner, None)
        usable = []
        for device in self.devices:
            holds = [h for h in self._held.values() if device.index in h.devices]
            if not holds or (shared and all(h.shared for h in holds)):
                usable.append((len(holds), device.index))
        if len(usable) < count:
            if previous is not None:
                self._held[owner] = previous
            raise self._shortage(owner, count, shared, len(usable))
        chosen = tuple(sorted(index for _, index in sorted(usable)[:count]))
        self._held[owner] = _Hold(chosen, shared)
        return [self._by_index[i] for i in chosen]

    def reserve(self, owner: str, indices: Iterable[int], *, shared: bool = False) -> None:
        """Record devices an adopted instance already uses (from its recorded
        environment); unknown indices are ignored."""
        self._held[owner] = _Hold(tuple(sorted(i for i in set(indices)
                                               if i in self._by_index)), shared)

    def release(self, owner: str) -> list[GpuDevice]:
        hold = self._held.pop(owner, None)
        return [] if hold is None else [self._by_index[i] for i in hold.devices]

    def _shortage(self, owner: str, count: int, shared: bool, usable: int) -> ResourceError:
        if not self.devices:
            return ResourceError(f"{owner} needs {count} GPU{'s' * (count > 1)} but this "
                                 "host has none", hint="remove `resources.gpu`, or run the "
                                                       "stack on a host with GPUs")
        states = []
        for device in self.devices:
            who = self.holders(device.index)
            kinds = {self._held[o].shared for o in who}
            state = ("free" if not who else
                     f"{'shared by' if kinds == {True} else 'held by'} {', '.join(who)}")
            states.append(f"{device.describe()}: {state}")
        mode = "shared " if shared else ""
        return ResourceError(
            f"{owner} needs {count} {mode}GPU{'s' * (count > 1)} but only {usable} of "
            f"{len(self.devices)} {'is' if usable == 1 else 'are'} available; "
            + "; ".join(states),
            hint="lower `resources.gpu`, stop a service holding GPUs, or set "
                 "`resources.gpu_shared: true` on services that may share devices")
