"""Commands inside a running container: `ContainerRuntime.exec`, and `exec_probe`, the
exec health probe of a containerised instance (the health layer calls it instead of
running the probe's argv on the host).

A command that outlives its timeout is killed (its process, seen from the host) and
reported as timed out, as the host's exec probe does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import docker
import docker.errors

from shipyard.errors import RuntimeLaunchError
from shipyard.health.probes import ProbeResult
from shipyard.runtime.base import Handle
from shipyard.runtime.container_images import explain
from shipyard.spec.models import Probe
from shipyard.spec.units import format_duration

if TYPE_CHECKING:
    from shipyard.runtime.container import ContainerRuntime

_NOT_FOUND = ("executable file not found", "no such file or directory", "not found in $path")


async def run_exec(runtime: ContainerRuntime, container: str, argv: list[str],
                   timeout: float, env: Mapping[str, str] | None = None
                   ) -> tuple[int | None, bytes]:
    """Run `argv` in `container`: (exit code, output), or (None, output so far) when it
    timed out (then killed). RuntimeLaunchError when it cannot be run at all."""
    client = await runtime.client()

    def create() -> str:
        try:
            created = client.api.exec_create(container, argv, stdout=True, stderr=True,
                                             environment=dict(env) if env else None)
        except docker.errors.APIError as exc:
            raise RuntimeLaunchError(f"exec: {explain(exc)}") from None
        return str(created["Id"])

    def start(exec_id: str) -> tuple[int | None, bytes]:
        try:
            output = client.api.exec_start(exec_id)
            info = client.api.exec_inspect(exec_id)
        except docker.errors.APIError as exc:
            message = explain(exc)
            if any(text in message.lower() for text in _NOT_FOUND):
                raise RuntimeLaunchError(f"exec: command {argv[0]!r} not found") from None
            raise RuntimeLaunchError(f"exec: {message}") from None
        data = output if isinstance(output, bytes) else b""
        return info.get("ExitCode"), data

    exec_id = await asyncio.to_thread(create)
    task = asyncio.ensure_future(asyncio.to_thread(start, exec_id))
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout)
    except TimeoutError:
        await asyncio.to_thread(_kill_exec, client, exec_id)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
        return None, b""


def _kill_exec(client: docker.DockerClient, exec_id: str) -> None:
    with contextlib.suppress(docker.errors.DockerException, ProcessLookupError,
                             PermissionError):
        pid = client.api.exec_inspect(exec_id).get("Pid")
        if pid:
            os.kill(int(pid), signal.SIGKILL)


async def exec_probe(runtime: ContainerRuntime, handle: Handle, probe: Probe,
                     env: Mapping[str, str] | None = None) -> ProbeResult:
    """One exec probe inside the instance's container, worded like the host's probes:
    "exec exited 0", "exec exited 1: <first line>", "exec timed out after 1s"."""
    assert probe.exec is not None
    begin = time.perf_counter()
    ok, message = False, ""
    try:
        code, output = await runtime.exec(handle, probe.exec, probe.timeout,
                                          dict(env) if env else None)
    except RuntimeLaunchError as exc:
        message = exc.message
    else:
        if code is None:
            message = f"exec timed out after {format_duration(probe.timeout)}"
        elif code == 0:
            ok, message = True, "exec exited 0"
        else:
            detail = _first_line(output)
            message = f"exec exited {code}" + (f": {detail}" if detail else "")
    return ProbeResult(ok, time.perf_counter() - begin, message)


def _first_line(data: Any) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data or "")
    return next((line.strip()[:200] for line in text.splitlines() if line.strip()), "")
