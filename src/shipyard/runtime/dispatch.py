"""One runtime for a stack that mixes processes and containers: an instance with a
`LaunchSpec.container` (its service has an `image`) runs as a container, any other as a
process. The container runtime is created on first use, so a stack without images never
starts (nor needs) a container engine."""

from __future__ import annotations

from collections.abc import Callable

from shipyard.runtime.base import Handle, LaunchSpec, Runtime


class DispatchRuntime(Runtime):
    name = "dispatch"

    def __init__(self, process: Runtime, container: Callable[[], Runtime]) -> None:
        self.process = process
        self._make_container = container
        self._container: Runtime | None = None
        self.warning: str | None = getattr(process, "warning", None)

    @property
    def container(self) -> Runtime:
        if self._container is None:
            self._container = self._make_container()
        return self._container

    def _for(self, handle: Handle) -> Runtime:
        return self.container if handle.extra.get("runtime") == "container" else self.process

    async def start(self, spec: LaunchSpec) -> Handle:
        return await (self.container if spec.container is not None else self.process).start(
            spec)

    async def wait(self, handle: Handle) -> int | None:
        return await self._for(handle).wait(handle)

    async def stop(self, handle: Handle, signal_name: str, timeout: float) -> None:
        await self._for(handle).stop(handle, signal_name, timeout)

    def adopt(self, handle: Handle) -> bool:
        return self._for(handle).adopt(handle)

    def exit_reason(self, handle: Handle) -> str | None:
        return self._for(handle).exit_reason(handle)

    async def kill_cgroup(self, path: str) -> None:
        await self.process.kill_cgroup(path)

    async def send_signal(self, handle: Handle, signal_name: str) -> None:
        await self._for(handle).send_signal(handle, signal_name)

    async def close(self) -> None:
        await self.process.close()
        if self._container is not None:
            await self._container.close()
