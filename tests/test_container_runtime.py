"""The container runtime against real podman: a busybox image built FROM scratch, served
on 127.0.0.1, stopped with a signal and a timeout, exit codes, OOM kills under a memory
limit, re-adoption by labels from a new runtime, exec probes inside the container, image
builds and pull policies, volumes, and the podman API service Shipyard starts itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import RuntimeLaunchError
from shipyard.runtime.base import LaunchSpec
from shipyard.runtime.container import LABEL_HOME, OOM_KILLED, ContainerRuntime
from shipyard.runtime.container_exec import exec_probe
from shipyard.runtime.container_spec import BuildSpec, ContainerSpec, MountSpec
from shipyard.runtime.podman import socket_answers
from shipyard.spec.models import Probe
from tests.podman_env import busybox_image, podman, remove_labelled, why_podman_cannot_run

REASON = why_podman_cannot_run()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"podman cannot run: {REASON}")


@pytest.fixture(scope="session")
def image() -> str:
    return busybox_image()


@pytest.fixture
async def runtime(tmp_path: Path, api_url: str) -> AsyncIterator[ContainerRuntime]:
    rt = ContainerRuntime(tmp_path / "home", base_url=api_url)
    try:
        yield rt
    finally:
        await rt.close()
        remove_labelled(f"{LABEL_HOME}={rt.home_label}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(rt: ContainerRuntime, image: str, argv: list[str] | None, **kwargs: Any
           ) -> LaunchSpec:
    instance = kwargs.pop("instance", f"web-{uuid.uuid4().hex[:6]}")
    container = ContainerSpec(image=image, command=argv is not None,
                              env_keys=frozenset(kwargs.pop("env_keys", ())),
                              pids_limit=kwargs.pop("pids_limit", 0),
                              mounts=kwargs.pop("mounts", []))
    container = replace(container, **kwargs.pop("container", {}))
    return LaunchSpec(stack="t", service="web", instance=instance, argv=argv or [],
                      env=kwargs.pop("env", {}), workdir="/",
                      log_path=str(rt.home / "logs" / f"{instance}.log"),
                      container=container, **kwargs)


async def wait_until(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def http_get(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as answer:
            return str(answer.read().decode())
    except OSError:
        return None


def inspect(container: str) -> dict[str, Any]:
    import json

    done = podman("inspect", container)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout)[0])


HTTPD = ("mkdir -p /www && echo \"hello from $SHIPYARD_INSTANCE\" > /www/index.html && "
         "echo \"port=$PORT leak=${LEAK:-none} own=$GREETING\" && "
         "trap 'exit 0' TERM; httpd -f -p 127.0.0.1:$PORT -h /www & wait")


async def test_serves_http_on_localhost_with_its_own_environment(
        runtime: ContainerRuntime, image: str) -> None:
    port = free_port()
    spec = launch(runtime, image, ["sh", "-c", HTTPD], env_keys={"GREETING"},
                  env={"PORT": str(port), "SHIPYARD_INSTANCE": "web-1", "GREETING": "hi",
                       "LEAK": "control-plane-only", "PATH": "/host/path"})
    handle = await runtime.start(spec)
    assert handle.pid > 0 and handle.extra["runtime"] == "container"
    await wait_until(lambda: http_get(port) is not None, what="httpd to answer")
    assert http_get(port) == "hello from web-1\n"
    log = Path(spec.log_path)
    await wait_until(lambda: log.exists() and "port=" in log.read_text(), what="log line")
    assert f"port={port} leak=none own=hi" in log.read_text()
    attrs = inspect(handle.extra["container"])
    assert attrs["HostConfig"]["NetworkMode"] == "host"
    labels = attrs["Config"]["Labels"]
    assert labels["shipyard.stack"] == "t" and labels["shipyard.service"] == "web"
    assert labels["shipyard.instance"] == spec.instance
    begin = time.monotonic()
    await runtime.stop(handle, "SIGTERM", 5)
    assert await runtime.wait(handle) == 0  # the trap ran: stopped by SIGTERM, not killed
    assert time.monotonic() - begin < 4
    assert http_get(port) is None


async def test_stop_with_signal_then_timeout(runtime: ContainerRuntime, image: str) -> None:
    graceful = await runtime.start(launch(runtime, image, [
        "sh", "-c", "trap 'echo bye; exit 3' TERM; while true; do sleep 0.1; done"]))
    stubborn = await runtime.start(launch(runtime, image, [
        "sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"]))
    await asyncio.sleep(0.3)
    begin = time.monotonic()
    await asyncio.gather(runtime.stop(graceful, "SIGTERM", 10),
                         runtime.stop(stubborn, "SIGTERM", 1.0))
    elapsed = time.monotonic() - begin
    assert await runtime.wait(graceful) == 3
    assert await runtime.wait(stubborn) == -9  # SIGKILL after the timeout
    assert 1.0 <= elapsed < 8, elapsed
    assert runtime.exit_reason(stubborn) is None  # killed by us, not out of memory
    assert not runtime.adopt(graceful)
    # the exited containers are removed
    await wait_until(lambda: podman("container", "exists", graceful.extra["container"])
                     .returncode != 0, what="container removal")


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 7", 7),
                                              ("kill -TERM $$; exit 1", 1),
                                              ("exit 130", -2)])
async def test_exit_codes(runtime: ContainerRuntime, image: str, script: str,
                          code: int) -> None:
    handle = await runtime.start(launch(runtime, image, ["sh", "-c", script]))
    assert await asyncio.wait_for(runtime.wait(handle), 20) == code
    assert runtime.exit_reason(handle) is None


async def test_launch_errors_are_explained(runtime: ContainerRuntime, image: str) -> None:
    with pytest.raises(RuntimeLaunchError, match="cannot start the container"):
        await runtime.start(launch(runtime, image, ["/no/such/program"]))
    with pytest.raises(RuntimeLaunchError, match="not present locally"):
        await runtime.start(launch(runtime, image, ["true"], container={
            "image": "localhost/shipyard-missing:1", "pull_policy": "never"}))
    with pytest.raises(RuntimeLaunchError, match="cannot pull image localhost:1/nothing"):
        await runtime.start(launch(runtime, image, ["true"], container={
            "image": "localhost:1/nothing:1"}))
    with pytest.raises(RuntimeLaunchError, match="bind mount source /no/such/dir"):
        await runtime.start(launch(runtime, image, ["true"], mounts=[
            MountSpec("bind", "/no/such/dir", "/data")]))
    assert await runtime.discover(running=False) == []  # nothing left behind


async def test_memory_limit_oom_kill_is_reported(runtime: ContainerRuntime,
                                                 image: str) -> None:
    handle = await runtime.start(launch(
        runtime, image, ["sh", "-c", "head -c 300m /dev/zero | tail > /dev/null"],
        memory_limit=32 * 2**20))
    assert await asyncio.wait_for(runtime.wait(handle), 60) == -9
    assert runtime.exit_reason(handle) == OOM_KILLED


async def test_limits_are_applied(runtime: ContainerRuntime, image: str) -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    handle = await runtime.start(launch(runtime, image, ["sleep", "60"],
                                        memory_limit=64 * 2**20, swap_limit=0, cpu_limit=0.5,
                                        pids_limit=50, cpuset=str(cpu)))
    host = inspect(handle.extra["container"])["HostConfig"]
    assert host["Memory"] == 64 * 2**20 and host["MemorySwap"] == 64 * 2**20  # no swap
    assert host["NanoCpus"] == 500_000_000 and host["PidsLimit"] == 50
    assert host["CpusetCpus"] == str(cpu)
    nofile = {u["Name"]: u for u in host["Ulimits"]}
    assert "RLIMIT_NOFILE" in nofile or "nofile" in nofile
    await runtime.stop(handle, "SIGKILL", 5)


@pytest.mark.parametrize(("swap", "memory_swap"), [(16 * 2**20, 80 * 2**20), (None, 2**62)])
async def test_swap_limit(runtime: ContainerRuntime, image: str, swap: int | None,
                          memory_swap: int) -> None:
    handle = await runtime.start(launch(runtime, image, ["sleep", "60"],
                                        memory_limit=64 * 2**20, swap_limit=swap))
    info = inspect(handle.extra["container"])
    host = info["HostConfig"]
    assert host["Memory"] == 64 * 2**20 and host["MemorySwap"] == memory_swap
    # and in the container's cgroup (v1 with swap accounting here; v2: memory.swap.max)
    lines = Path(f"/proc/{info['State']['Pid']}/cgroup").read_text().splitlines()
    memory_dir = next((f"/sys/fs/cgroup/memory{line.split(':')[2]}" for line in lines
                       if ":memory:" in line), None)
    memsw = Path(f"{memory_dir}/memory.memsw.limit_in_bytes")
    if memory_dir is not None and memsw.exists():
        assert int(memsw.read_text()) == memory_swap
    await runtime.stop(handle, "SIGKILL", 5)


async def test_readopted_by_labels_from_a_new_runtime(tmp_path: Path, api_url: str,
                                                      image: str) -> None:
    home = tmp_path / "home"
    first = ContainerRuntime(home, base_url=api_url)
    second = ContainerRuntime(home, base_url=api_url)
    other_home = ContainerRuntime(tmp_path / "other", base_url=api_url)
    try:
        spec = launch(first, image, ["sh", "-c", "trap 'exit 5' TERM; while true; do "
                                     "echo tick; sleep 0.2; done"])
        handle = await first.start(spec)
        await first.close()  # the control plane goes away; its container keeps running
        assert podman("container", "exists", handle.extra["container"]).returncode == 0

        found = await second.discover("t")
        assert [(h.instance, h.pid, h.extra["container"]) for h in found] == [
            (spec.instance, handle.pid, handle.extra["container"])]
        assert await other_home.discover() == []  # another home's runtime does not see it
        assert second.adopt(found[0]) and second.adopt(handle)
        size = Path(spec.log_path).stat().st_size
        await wait_until(lambda: Path(spec.log_path).stat().st_size > size,
                         what="the adopted container's output in its log")
        await second.stop(handle, "SIGTERM", 5)
        assert await second.wait(handle) == 5
        assert not second.adopt(handle)
    finally:
        for rt in (first, second, other_home):
            await rt.close()
            remove_labelled(f"{LABEL_HOME}={rt.home_label}")


async def test_exec_probe_runs_inside_the_container(runtime: ContainerRuntime,
                                                    image: str, tmp_path: Path) -> None:
    marker = f"/run/ready-{uuid.uuid4().hex}"  # the image has no /tmp
    handle = await runtime.start(launch(runtime, image, ["sh", "-c",
                                                         f"touch {marker}; sleep 60"]))
    assert not os.path.exists(marker)  # only inside
    probe = Probe(exec=["test", "-f", marker])
    for _ in range(50):  # the container touches the marker soon after it starts
        ok = await exec_probe(runtime, handle, probe)
        if ok.ok:
            break
        assert ok.message == "exec exited 1"
        await asyncio.sleep(0.1)
    assert (ok.ok, ok.message) == (True, "exec exited 0")
    failed = await exec_probe(runtime, handle,
                              Probe(exec=["sh", "-c", "echo not yet >&2; exit 2"]))
    assert (failed.ok, failed.message) == (False, "exec exited 2: not yet")
    env = await exec_probe(runtime, handle, Probe(exec=["sh", "-c", 'test "$X" = 1']),
                           env={"X": "1"})
    assert env.ok, env.message
    begin = time.monotonic()
    slow = await exec_probe(runtime, handle, Probe(exec=["sleep", "30"], timeout=0.5))
    assert (slow.ok, slow.message) == (False, "exec timed out after 500ms")
    assert time.monotonic() - begin < 5
    missing = await exec_probe(runtime, handle, Probe(exec=["no-such-probe"]))
    assert not missing.ok and "not found" in missing.message
    await runtime.stop(handle, "SIGKILL", 5)


async def test_build_from_a_containerfile_and_volumes(runtime: ContainerRuntime, image: str,
                                                      tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    tag = f"localhost/shipyard-test-built:{uuid.uuid4().hex[:8]}"
    (context / "Containerfile").write_text(
        f"FROM {image}\nARG WHO=nobody\nRUN echo \"built for $WHO\" > /built\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    script = ("cat /built; cat /data/in.txt; echo written > /cache/out.txt; "
              "(echo x > /data/denied.txt) 2>/dev/null || echo read-only; "
              "echo t > /scratch/t && echo tmpfs")
    spec = launch(runtime, image, ["sh", "-c", script], mounts=[
        MountSpec("bind", str(data), "/data", read_only=True),
        MountSpec("volume", "cache", "/cache"), MountSpec("tmpfs", None, "/scratch")],
        container={"image": tag, "pull_policy": "build",
                   "build": BuildSpec(str(context), args={"WHO": "shipyard"})})
    try:
        handle = await runtime.start(spec)
        assert await asyncio.wait_for(runtime.wait(handle), 30) == 0
        out = Path(spec.log_path).read_text().splitlines()
        assert out[:2] == ["built for shipyard", "from the host"]
        assert "read-only" in out and "tmpfs" in out
        volume = runtime.volumes_dir / "t" / "cache" / "out.txt"
        assert volume.read_text() == "written\n"  # named volumes live in the home
        assert not (data / "denied.txt").exists()
    finally:
        podman("rmi", "-f", tag)


async def test_starts_and_stops_its_own_podman_service(tmp_path: Path, image: str,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("SHIPYARD_CONTAINER_HOST", raising=False)
    if socket_answers("/var/run/docker.sock"):
        pytest.skip("a Docker engine answers: the runtime would use it")
    rt = ContainerRuntime(tmp_path / "home")
    try:
        handle = await rt.start(launch(rt, image, ["sh", "-c", "exit 4"]))
        assert await rt.wait(handle) == 4
        assert rt._service is not None and rt._service.process is not None
        sock = rt._service.socket
        assert socket_answers(sock)
    finally:
        await rt.close()
        with contextlib.suppress(Exception):
            remove_labelled(f"{LABEL_HOME}={rt.home_label}")
    assert not socket_answers(sock) and not sock.exists()


async def test_dispatch_runs_images_as_containers_and_commands_as_processes(
        tmp_path: Path, api_url: str, image: str) -> None:
    from shipyard.runtime.dispatch import DispatchRuntime
    from shipyard.runtime.process import ProcessRuntime

    made: list[ContainerRuntime] = []

    def make() -> ContainerRuntime:
        made.append(ContainerRuntime(tmp_path / "home", base_url=api_url))
        return made[0]

    rt = DispatchRuntime(ProcessRuntime(cgroup_name=f"shipyard-t-{uuid.uuid4().hex[:6]}"), make)
    try:
        process_spec = LaunchSpec(stack="t", service="cli", instance="cli-1",
                                  argv=["/bin/sh", "-c", "exit 6"], env={"PATH": "/bin"},
                                  workdir=str(tmp_path), log_path=str(tmp_path / "cli.log"))
        proc = await rt.start(process_spec)
        assert await rt.wait(proc) == 6 and made == []  # no engine needed for processes
        spec = launch(made[0] if made else make(), image, ["sh", "-c", "exit 9"])
        box = await rt.start(spec)
        assert box.extra["runtime"] == "container" and await rt.wait(box) == 9
        assert not rt.adopt(box) and rt.exit_reason(box) is None
    finally:
        await rt.close()
        for made_rt in made:
            remove_labelled(f"{LABEL_HOME}={made_rt.home_label}")
