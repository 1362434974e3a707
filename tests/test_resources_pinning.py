"""CPU pinning and swap limits on real processes: the cpuset an instance is started with is
the one the kernel reports for it (and for what it forks), through the cgroup cpuset
controller (v1 here, joined by the spawner thread or by a preexec_fn), through a v2 cgroup
without the controller and without any cgroup (CPU affinity); the swap limit is written
where the kernel accounts swap."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shipyard.errors import RuntimeLaunchError
from shipyard.resources.cpusets import CpusetAllocator
from shipyard.resources.topology import format_cpulist, host_topology, parse_cpulist
from shipyard.runtime import limits
from shipyard.runtime.base import LaunchSpec
from shipyard.runtime.cgroups import InstanceCgroup, detect
from shipyard.runtime.process import ProcessRuntime

SUPPORT = detect("auto")
CPUSET_CGROUP = SUPPORT.enabled and SUPPORT.cpuset
ALLOWED = sorted(os.sched_getaffinity(0))
# Prints its own and a forked child's allowed CPUs and memory nodes, then sleeps.
REPORT = textwrap.dedent("""
    import os, sys, time
    def allowed():
        with open("/proc/self/status") as f:
            return [l.split(":")[1].strip() for l in f
                    if l.startswith(("Cpus_allowed_list", "Mems_allowed_list"))]
    if os.fork() == 0:
        print("child", *allowed(), flush=True)
        os._exit(0)
    os.wait()
    print("parent", *allowed(), flush=True)
    time.sleep(60)
""")


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@pytest.fixture
def stack() -> str:
    return f"pin-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def spec(tmp_path: Path, stack: str, **kw: object) -> LaunchSpec:
    fields: dict[str, object] = {
        "stack": stack, "service": "app", "instance": "app-1",
        "argv": [sys.executable, "-c", REPORT], "env": {"PATH": os.defpath},
        "workdir": str(tmp_path), "log_path": str(tmp_path / "app-1.log")}
    fields.update(kw)
    return LaunchSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture(params=["auto", "auto-preexec", "v2", "off"])
async def rt(request: pytest.FixtureRequest, stack: str) -> AsyncIterator[ProcessRuntime]:
    mode = request.param
    if mode == "auto" and not CPUSET_CGROUP:
        pytest.skip(f"no cgroup cpuset controller here ({SUPPORT.problem or 'not mounted'})")
    if mode == "auto-preexec" and not (CPUSET_CGROUP and SUPPORT.version == 1):
        pytest.skip("the preexec_fn join is the v1 fallback; no v1 cpuset controller here")
    if mode == "v2" and not detect("v2").enabled:
        pytest.skip("no writable cgroup v2 hierarchy here")
    cgroups = "auto" if mode.startswith("auto") else mode
    rt = ProcessRuntime(cgroups=cgroups,  # type: ignore[arg-type]
                        thread_join=mode != "auto-preexec")
    yield rt
    for path in rt.orphan_cgroups(stack):
        await rt.kill_cgroup(path)
    await rt.close()


async def read_report(path: Path) -> list[str]:
    for _ in range(500):
        lines = path.read_text().splitlines() if path.exists() else []
        if any(line.startswith("parent") for line in lines):
            return lines
        await asyncio.sleep(0.01)
    raise AssertionError(f"no report in {path}: {path.read_text() if path.exists() else ''}")


async def test_instance_runs_on_its_cpuset(rt: ProcessRuntime, stack: str,
                                           tmp_path: Path) -> None:
    cpu = ALLOWED[-1]  # one CPU: different from "all of them" whenever there are two
    mems = format_cpulist(host_topology().memory_nodes)
    s = spec(tmp_path, stack, cpuset=str(cpu), mems=mems)
    h = await rt.start(s)
    try:
        assert status(h.pid)["Cpus_allowed_list"] == str(cpu)
        lines = await read_report(Path(s.log_path))
        assert f"child {cpu} {mems}" in lines and f"parent {cpu} {mems}" in lines
        if h.cgroup is not None and rt.cgroup_support.cpuset:
            cg = InstanceCgroup.parse(h.cgroup)
            [cpus_file] = [os.path.join(p, "cpuset.cpus") for p in cg.paths
                           if os.path.exists(os.path.join(p, "cpuset.cpus"))]
            assert Path(cpus_file).read_text().strip() == str(cpu)
            assert h.pid in cg.pids()
    finally:
        await rt.stop(h, "SIGKILL", 1.0)


async def test_unpinned_instance_keeps_every_cpu(rt: ProcessRuntime, stack: str,
                                                 tmp_path: Path) -> None:
    """Also after a pinned start: the spawner thread (v1) that visited the pinned cgroup
    went back with all of its CPUs, and so does the control plane."""
    pinned = await rt.start(spec(tmp_path, stack, cpuset=str(ALLOWED[0])))
    s = spec(tmp_path, stack, instance="free-1", log_path=str(tmp_path / "free-1.log"))
    h = await rt.start(s)
    try:
        assert status(pinned.pid)["Cpus_allowed_list"] == str(ALLOWED[0])
        assert parse_cpulist(status(h.pid)["Cpus_allowed_list"]) == set(ALLOWED)
        assert os.sched_getaffinity(0) == set(ALLOWED)
    finally:
        await rt.stop(h, "SIGKILL", 1.0)
        await rt.stop(pinned, "SIGKILL", 1.0)


async def test_allocated_cpuset_is_applied(rt: ProcessRuntime, stack: str,
                                           tmp_path: Path) -> None:
    """What the engine does: whole cores from the allocator, into the LaunchSpec."""
    alloc = CpusetAllocator(host_topology())
    a = alloc.allocate_cpu(f"{stack}/app-1", 0.5)
    h = await rt.start(spec(tmp_path, stack, cpuset=a.cpuset, mems=a.mems))
    try:
        assert parse_cpulist(status(h.pid)["Cpus_allowed_list"]) == a.cpus
        assert status(h.pid)["Mems_allowed_list"] == a.mems
    finally:
        await rt.stop(h, "SIGKILL", 1.0)


async def test_a_cpu_that_is_not_ours_is_refused(rt: ProcessRuntime, stack: str,
                                                 tmp_path: Path) -> None:
    with pytest.raises(RuntimeLaunchError, match="cpuset 4000"):
        await rt.start(spec(tmp_path, stack, cpuset="4000"))
    assert rt.orphan_cgroups(stack) == []  # nothing left behind


# -- swap -----------------------------------------------------------------------------
SWAP_FILE = next((name for name in ("memory.swap.max", "memory.memsw.limit_in_bytes")
                  if SUPPORT.enabled and "memory" in SUPPORT.limits
                  and any(os.path.exists(os.path.join(os.path.dirname(b), name))
                          for b in SUPPORT.bases)), None)


@pytest.mark.skipif(SWAP_FILE is None, reason="no swap accounting in the memory cgroup here "
                                              "(memory.memsw.* / memory.swap.max missing)")
@pytest.mark.parametrize(("swap", "expected"), [(16 * 2**20, "memory+swap"), (0, "memory"),
                                                (None, "unlimited")])
async def test_swap_limit_written(stack: str, tmp_path: Path, swap: int | None,
                                  expected: str) -> None:
    rt = ProcessRuntime()
    memory = 64 * 2**20
    h = await rt.start(spec(tmp_path, stack, argv=["/bin/sleep", "30"], memory_limit=memory,
                            swap_limit=swap))
    try:
        assert h.cgroup
        [file] = [os.path.join(p, SWAP_FILE) for p in InstanceCgroup.parse(h.cgroup).paths
                  if os.path.exists(os.path.join(p, SWAP_FILE))]
        value = Path(file).read_text().strip()
        if expected == "unlimited":
            assert value == "max" or int(value) >= 2**62
        elif SWAP_FILE == "memory.swap.max":
            assert int(value) == swap
        else:
            assert int(value) == memory + (swap or 0)
    finally:
        await rt.stop(h, "SIGKILL", 1.0)
        for path in rt.orphan_cgroups(stack):
            await rt.kill_cgroup(path)
        await rt.close()


def test_missing_swap_accounting_warns_once(caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "_warned", set())
    caplog.set_level(logging.WARNING)
    assert limits.apply_swap(lambda name: None, 2**20, 0) is False
    assert limits.apply_swap(lambda name: None, 2**20, 2**20) is False
    assert caplog.text.count("swap limits are not enforced") == 1
    assert limits.apply_swap(lambda name: None, 2**20, None) is False  # nothing asked
