"""What the engine hands out per instance on this machine besides ports: CPU sets (whole
cores of one NUMA node for `cpuset: auto`), GPUs, and the disk quota watch.

`assign()` is called by a supervisor right before a launch, `release()` when the engine
lets an instance go, `adopt()` for an instance re-adopted after a control-plane restart
(its recorded runtime data says what it held). The disk watcher measures each running
instance's volumes (its working directory for a process, its named volumes for a
container) and acts when one is over `resources.disk`: an event, and with
`disk_action: stop` a stop of the instance (its restart policy then applies).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shipyard.engine.environment import instance_workdir
from shipyard.resources.cpusets import CpusetAllocator, share_for
from shipyard.resources.disk import DiskTarget, DiskWatcher, QuotaVerdict
from shipyard.resources.gpus import GpuAllocator, discover_gpus, gpu_env
from shipyard.resources.topology import host_topology
from shipyard.runtime.container_spec import container_spec
from shipyard.state.base import Event

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine
    from shipyard.spec.models import Service, Stack


@dataclass(frozen=True)
class Assigned:
    """What one launch gets: extra environment (GPUs), the CPU set and memory nodes, and
    the GPU indices (containers get them as device requests)."""

    env: dict[str, str]
    cpuset: str | None
    mems: str | None
    gpus: tuple[str, ...]

    def record(self) -> dict[str, str]:
        """For the instance's recorded runtime data, so a restarted engine knows."""
        out = {}
        if self.cpuset:
            out["cpuset"] = self.cpuset
        if self.gpus:
            out["gpus"] = ",".join(self.gpus)
        return out


class LocalResources:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cpusets: CpusetAllocator | None = None
        self._gpus: GpuAllocator | None = None
        self.disk = DiskWatcher(self._disk_targets, self._on_disk_event, self._on_disk_over)

    # made on first use: a stack without pinning or GPUs never reads /sys or nvidia-smi
    @property
    def cpusets(self) -> CpusetAllocator:
        if self._cpusets is None:
            self._cpusets = CpusetAllocator(host_topology())
        return self._cpusets

    @property
    def gpus(self) -> GpuAllocator:
        if self._gpus is None:
            self._gpus = GpuAllocator(discover_gpus().devices)
        return self._gpus

    def assign(self, stack: Stack, service: Service, instance: str) -> Assigned:
        """CPUs and GPUs for a launch of `instance` (ResourceError when none are left)."""
        owner, res = f"{stack.name}/{instance}", service.resources
        pin = None
        if res.cpuset == "auto":
            pin = self.cpusets.allocate_cpu(
                owner, res.cpu, max_share=share_for(stack.capacity.overcommit.cpu))
        elif res.cpuset:
            pin = self.cpusets.reserve(owner, res.cpuset)
        devices = self.gpus.allocate(owner, res.gpu, shared=res.gpu_shared) if res.gpu else []
        env = gpu_env(devices) if devices and not service.image else {}
        return Assigned(env, pin.cpuset if pin else None, pin.mems if pin else None,
                        tuple(str(d.index) for d in devices))

    def adopt(self, stack: Stack, service: Service, instance: str,
              recorded: dict[str, str]) -> None:
        owner = f"{stack.name}/{instance}"
        if recorded.get("cpuset"):
            self.cpusets.reserve(owner, recorded["cpuset"])
        if recorded.get("gpus"):
            self.gpus.reserve(owner, (int(i) for i in recorded["gpus"].split(",")),
                              shared=service.resources.gpu_shared)

    def release(self, stack: str, instance: str) -> None:
        owner = f"{stack}/{instance}"
        if self._cpusets is not None:
            self._cpusets.release(owner)
        if self._gpus is not None:
            self._gpus.release(owner)

    # -- disk quotas ---------------------------------------------------------------------
    def _disk_targets(self) -> list[DiskTarget]:
        out = []
        for state in self.engine.stacks_state.values():
            for sup in state.supervisors.values():
                svc = state.stack.services.get(sup.record.service)
                if svc is None or svc.resources.disk <= 0 or sup.handle is None:
                    continue
                if svc.image:
                    spec = container_spec(state.stack, sup.record.service)
                    volumes = Path(self.engine.config.home) / "volumes" / state.stack.name
                    paths = tuple(str(volumes / m.source) for m in (spec.mounts if spec else [])
                                  if m.type == "volume" and m.source)
                else:
                    paths = (instance_workdir(state.stack, svc),)
                if paths:
                    out.append(DiskTarget(f"{state.stack.name}/{sup.name}", paths,
                                          svc.resources.disk, svc.resources.disk_action))
        return out

    async def _on_disk_event(self, kind: str, target: DiskTarget,
                             verdict: QuotaVerdict) -> None:
        stack, _, instance = target.owner.partition("/")
        state = self.engine.stacks_state.get(stack)
        sup = state.supervisors.get(instance) if state else None
        await self.engine.record_event(Event(
            kind, f"disk usage over quota: {verdict.describe()}", stack=stack,
            service=sup.record.service if sup else None, instance=instance,
            data={"usage": verdict.usage, "quota": verdict.quota, "paths": list(target.paths),
                  "action": target.action}))

    async def _on_disk_over(self, target: DiskTarget, verdict: QuotaVerdict) -> None:
        stack, _, instance = target.owner.partition("/")
        state = self.engine.stacks_state.get(stack)
        sup = state.supervisors.get(instance) if state else None
        if sup is not None and sup.handle is not None:  # its restart policy then applies
            await self.engine.runtime.stop(sup.handle, sup.service.stop.signal,
                                           sup.service.stop.timeout)
