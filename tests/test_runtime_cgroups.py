"""Which cgroup v1 hierarchies an instance gets a directory in: pids and freezer always,
memory, cpu and cpuset only when its limits need them; the spawner thread joins exactly
those; a restarted control plane still finds, empties and removes them."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shipyard.runtime.cgroups import CgroupSupport, InstanceCgroup, Mount, detect, mount_index
from shipyard.runtime.process import ProcessRuntime
from shipyard.runtime.threadspawn import ThreadSpawner
from tests.conftest import pids_alive
from tests.test_runtime_process import _cleanup, make_spec

SUPPORT = detect("auto")
V1 = SUPPORT.enabled and SUPPORT.version == 1
needs_v1 = pytest.mark.skipif(not V1, reason="needs permission to create cgroup v1 cgroups")


def _mount(point: str, *controllers: str) -> Mount:
    return Mount("/", point, "cgroup", frozenset({"rw", *controllers}))


MOUNTS = [_mount("/cg/memory", "memory"), _mount("/cg/cpu,cpuacct", "cpu", "cpuacct"),
          _mount("/cg/cpuset", "cpuset"), _mount("/cg/pids", "pids"),
          _mount("/cg/freezer", "freezer")]


def fake_v1(mounts: list[Mount]) -> CgroupSupport:
    return CgroupSupport(1, bases=[f"{m.mountpoint}/cp/shipyard" for m in mounts],
                         mounts=list(mounts))


def test_select_only_what_the_limits_need() -> None:
    v1 = fake_v1(MOUNTS)
    assert v1.select(0.0, 0, False) == [3, 4]  # pids, freezer
    assert v1.select(0.0, 64 * 2**20, False) == [0, 3, 4]
    assert v1.select(0.5, 0, False) == [1, 3, 4]
    assert v1.select(0.0, 0, True) == [2, 3, 4]
    assert v1.select(1.0, 1, True) == [0, 1, 2, 3, 4]
    assert v1.instance_paths("s", "a-1", [3, 4]) == ["/cg/pids/cp/shipyard/s/a-1",
                                                     "/cg/freezer/cp/shipyard/s/a-1"]
    assert v1.controllers(1) == frozenset({"cpu"})
    # Neither pids nor freezer mounted: at least one hierarchy holds the processes.
    assert fake_v1(MOUNTS[:2]).select(0.0, 0, False) == [0]
    assert fake_v1(MOUNTS[:2]).select(0.0, 1, False) == [0]
    # Co-mounted controllers: the hierarchy is taken for either.
    both = fake_v1([_mount("/cg/cpu,memory", "cpu", "memory"), _mount("/cg/pids", "pids")])
    assert both.select(0.0, 1, False) == [0, 1] and both.select(0.0, 0, False) == [1]
    # v2: its one hierarchy, whatever the limits.
    assert CgroupSupport(2, bases=["/cg/unified/shipyard"]).select(0.0, 0, False) == [0]


def test_spawner_maps_paths_to_mounts() -> None:
    assert mount_index(MOUNTS, "/cg/pids/cp/shipyard/s/a-1") == 3
    assert mount_index(MOUNTS, "/cg/cpu,cpuacct/x") == 1
    assert mount_index(MOUNTS, "/cg/cpu/x") is None  # not a prefix match on "cpu,cpuacct"
    assert mount_index([*MOUNTS, _mount("/cg/pids/nested", "pids")], "/cg/pids/nested/a") == 5
    spawner = ThreadSpawner(MOUNTS)
    cg = InstanceCgroup(["/cg/memory/s/a-1", "/cg/freezer/s/a-1", "/cg/pids/s/a-1"])
    assert spawner.hierarchies(cg) == {0: "/cg/memory/s/a-1", 4: "/cg/freezer/s/a-1",
                                       3: "/cg/pids/s/a-1"}
    assert spawner.hierarchies(InstanceCgroup(["/elsewhere/a-1"])) is None
    assert spawner.hierarchies(InstanceCgroup(["/cg/pids/a", "/cg/pids/b"])) is None


def test_no_memory_hierarchy_no_oom_count(tmp_path: Path) -> None:
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\noom_kill 3\n")
    assert InstanceCgroup([str(tmp_path)]).oom_kills() == 3
    assert InstanceCgroup([str(tmp_path)], controllers=frozenset({"memory"})).oom_kills() == 3
    assert InstanceCgroup([str(tmp_path)], controllers=frozenset({"pids"})).oom_kills() == 0


@pytest.fixture
def stack() -> str:
    return f"cg-{os.getpid()}-{os.urandom(4).hex()}"


@pytest.fixture(params=["thread", "preexec"])
async def rt(request: pytest.FixtureRequest, stack: str) -> AsyncIterator[ProcessRuntime]:
    runtime = ProcessRuntime(thread_join=request.param == "thread")
    yield runtime
    await _cleanup(runtime, stack)


def _hierarchy_of(support: CgroupSupport, path: str) -> frozenset[str]:
    i = mount_index(support.mounts, path)
    assert i is not None
    return support.controllers(i)


def _own_dir(support: CgroupSupport, controller: str, pid: int) -> str:
    """The directory of `pid` in the hierarchy of `controller` (relative to its root)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"no {controller} line for {pid}")


@needs_v1
async def test_instance_gets_only_the_hierarchies_it_needs(rt: ProcessRuntime, stack: str,
                                                           tmp_path: Path) -> None:
    support = rt.cgroup_support
    plain = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "30"], "plain-1"))
    limited = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "30"], "lim-1",
                                       memory_limit=64 * 2**20, cpu_limit=0.5))
    try:
        assert plain.cgroup and limited.cgroup
        plain_cg, limited_cg = (InstanceCgroup.parse(h.cgroup or "") for h in (plain, limited))
        plain_ctl = frozenset().union(*(_hierarchy_of(support, p) for p in plain_cg.paths))
        limited_ctl = frozenset().union(*(_hierarchy_of(support, p)
                                          for p in limited_cg.paths))
        mounted = frozenset().union(*(support.controllers(i)
                                      for i in range(len(support.bases))))
        if {"pids", "freezer"} & mounted:
            assert plain_ctl == {"pids", "freezer"} & mounted
        assert "memory" not in plain_ctl and "cpu" not in plain_ctl
        assert "cpuset" not in plain_ctl
        assert {"memory", "cpu"} & mounted <= limited_ctl
        # No directory was made in the others.
        for i in range(len(support.bases)):
            if not support.controllers(i) & plain_ctl:
                assert not os.path.exists(support.instance_paths(stack, "plain-1", [i])[0])
        # The plain child stays in the control plane's memory cgroup; both are listed
        # and stopped through their cgroup.
        if "memory" in mounted:
            assert _own_dir(support, "memory", plain.pid) == _own_dir(support, "memory",
                                                                      os.getpid())
            assert _own_dir(support, "memory", limited.pid).endswith(f"/{stack}/lim-1")
        assert plain_cg.pids() == {plain.pid} and limited_cg.pids() == {limited.pid}
        assert rt.exit_reason(plain) is None
    finally:
        await rt.stop(plain, "SIGTERM", 2.0)
        await rt.stop(limited, "SIGTERM", 2.0)
    assert pids_alive([plain.pid, limited.pid]) == []
    assert not InstanceCgroup.parse(plain.cgroup).exists()
    assert not InstanceCgroup.parse(limited.cgroup).exists()
    assert rt.orphan_cgroups(stack) == []
    assert not any(os.path.exists(d) for d in support.stack_dirs(stack))


@needs_v1
async def test_restarted_control_plane_empties_partial_cgroups(rt: ProcessRuntime, stack: str,
                                                               tmp_path: Path) -> None:
    """What a control plane killed with -9 leaves: instance cgroups in some hierarchies
    only. The next one finds them (recorded or not) and kills what is inside."""
    plain = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "60"], "p-1"))
    limited = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "60"], "m-1",
                                       memory_limit=64 * 2**20))
    assert plain.cgroup and limited.cgroup
    assert sorted(rt.orphan_cgroups(stack)) == sorted([plain.cgroup, limited.cgroup])
    restarted = ProcessRuntime()
    try:
        # recorded: emptied through Handle.cgroup (engine/recovery.kill_recorded)
        await restarted.kill_cgroup(limited.cgroup)
        assert pids_alive([limited.pid]) == []
        assert not InstanceCgroup.parse(limited.cgroup).exists()
        # not recorded: found under the base, emptied
        assert await restarted.cleanup_orphans(stack) == [plain.cgroup]
        assert pids_alive([plain.pid]) == []
        assert await rt.wait(plain) == -signal.SIGKILL
        # a leftover in pids/freezer only is found by a new start of the same instance
        again = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "60"], "p-1"))
        os.kill(again.pid, signal.SIGSTOP)  # still there, frozen in place
        fresh = await restarted.start(make_spec(tmp_path, stack, ["/bin/sleep", "60"], "p-1"))
        assert pids_alive([again.pid]) == []
        await restarted.stop(fresh, "SIGTERM", 2.0)
    finally:
        await restarted.close()
