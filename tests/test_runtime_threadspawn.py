"""Starting children inside their cgroup: on cgroup v1 from a thread that visits the
instance's cgroups (the default), or by a preexec_fn (the fallback). Either way the child,
and whatever it forks, is in its cgroup in every hierarchy from the start; the control
plane's threads end up where they were, whatever happened."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from shipyard.errors import RuntimeLaunchError
from shipyard.runtime import process, threadspawn
from shipyard.runtime.cgroups import InstanceCgroup, Mount, detect, member_dirs
from shipyard.runtime.process import ProcessRuntime
from shipyard.runtime.threadspawn import ThreadSpawner
from tests.conftest import PYTHON, pids_alive
from tests.test_runtime_process import DAEMONIZER, _cleanup, make_spec, read_pid, until

V1 = detect("auto").version == 1 and detect("auto").enabled
needs_v1 = pytest.mark.skipif(not V1, reason="needs permission to create cgroup v1 cgroups")
CPU_V1 = V1 and "cpu" in detect("auto").limits


@pytest.fixture
def stack() -> str:
    return f"ts-{os.getpid()}-{os.urandom(4).hex()}"


@pytest.fixture(params=["thread", "preexec"])
async def rt(request: pytest.FixtureRequest, stack: str,
             monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ProcessRuntime]:
    runtime = ProcessRuntime(thread_join=request.param == "thread")
    preexec_used = []

    def joiner(files: list[str]) -> Callable[[], None]:
        preexec_used.append(files)
        return real_joiner(files)

    real_joiner = process.cgroup_joiner
    monkeypatch.setattr(process, "cgroup_joiner", joiner)
    yield runtime
    await _cleanup(runtime, stack)
    if request.param == "thread":
        assert not preexec_used, "fell back to the preexec_fn"


def task_cgroup(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/cgroup").read_text()


def dirs_of(runtime: ProcessRuntime, pid: int) -> list[str] | None:
    """The cgroup directories of process `pid` in our v1 hierarchies."""
    return member_dirs(runtime.cgroup_support.mounts, Path(f"/proc/{pid}/cgroup").read_text())


def in_cgroup(dirs: list[str] | None, cg: InstanceCgroup) -> bool:
    """Whether a task in `dirs` (one per hierarchy) is in each directory of `cg` (which
    has one in only some of the hierarchies: pids, freezer and what its limits need)."""
    return dirs is not None and set(cg.paths) <= set(dirs)


def assert_inside(runtime: ProcessRuntime, pid: int, cg: InstanceCgroup) -> None:
    assert in_cgroup(dirs_of(runtime, pid), cg)
    for path in cg.paths:
        assert str(pid) in Path(path, "tasks").read_text().split()


def assert_spawner_home(runtime: ProcessRuntime, loop_cgroups: str) -> None:
    """The loop thread never moved; the spawner thread (if used) is back beside it."""
    me = threading.get_native_id()
    assert task_cgroup(me) == loop_cgroups
    spawner = runtime._spawner
    if spawner is not None:
        assert spawner.thread_id is not None and spawner.thread_id != me
        assert task_cgroup(spawner.thread_id) == loop_cgroups


# -- where children are born --------------------------------------------------------------
@needs_v1
async def test_child_and_daemonized_grandchild_in_cgroup(rt: ProcessRuntime, stack: str,
                                                         tmp_path: Path) -> None:
    loop_cgroups = task_cgroup(threading.get_native_id())
    # What the child itself sees before it does anything else.
    spec = make_spec(tmp_path, stack, ["/bin/cat", "/proc/self/cgroup"], "cat-1")
    h = await rt.start(spec)
    assert h.cgroup and await rt.wait(h) == 0
    seen = member_dirs(rt.cgroup_support.mounts, Path(spec.log_path).read_text())
    assert in_cgroup(seen, InstanceCgroup.parse(h.cgroup))
    # A daemon it forks is inside too (and so killed by stop()).
    pidfile = tmp_path / "daemon.pid"
    spec = make_spec(tmp_path, stack, [PYTHON, "-c", DAEMONIZER, str(pidfile)], "d-1")
    h = await rt.start(spec)
    assert h.cgroup
    cg = InstanceCgroup.parse(h.cgroup)
    assert_inside(rt, h.pid, cg)
    await until(pidfile.exists)
    daemon = read_pid(pidfile)
    assert_inside(rt, daemon, cg)
    assert {h.pid, daemon} <= cg.pids()  # (and the exiting middle process, maybe)
    assert_spawner_home(rt, loop_cgroups)
    await rt.stop(h, "SIGTERM", 2.0)
    assert pids_alive([h.pid, daemon]) == []
    assert not cg.exists()


@needs_v1
async def test_concurrent_starts_each_in_its_cgroup(rt: ProcessRuntime, stack: str,
                                                    tmp_path: Path) -> None:
    loop_cgroups = task_cgroup(threading.get_native_id())
    specs = [make_spec(tmp_path, stack, ["/bin/sleep", "30"], f"c-{i}") for i in range(50)]
    handles = await asyncio.gather(*(rt.start(s) for s in specs))
    try:
        assert len({h.cgroup for h in handles}) == 50
        for spec, h in zip(specs, handles, strict=True):
            assert h.cgroup and h.cgroup.endswith(spec.instance)
            assert_inside(rt, h.pid, InstanceCgroup.parse(h.cgroup))
        assert_spawner_home(rt, loop_cgroups)
    finally:
        await asyncio.gather(*(rt.stop(h, "SIGTERM", 2.0) for h in handles))
    assert pids_alive([h.pid for h in handles]) == []
    assert rt.orphan_cgroups(stack) == []


@needs_v1
async def test_spawner_returns_after_failed_exec(stack: str, tmp_path: Path) -> None:
    rt = ProcessRuntime()
    loop_cgroups = task_cgroup(threading.get_native_id())
    try:
        with pytest.raises(RuntimeLaunchError, match="not found"):  # caught before spawning
            await rt.start(make_spec(tmp_path, stack, ["nope-xyz-cmd"]))
        bad_interpreter = tmp_path / "bad.sh"
        bad_interpreter.write_text("#!/nonexistent/interpreter\n")
        garbage = tmp_path / "garbage"
        garbage.write_bytes(b"\x00\x01\x02 not a program\n")
        for exe in (bad_interpreter, garbage):
            exe.chmod(0o755)
            with pytest.raises(RuntimeLaunchError, match="cannot execute"):  # at exec
                await rt.start(make_spec(tmp_path, stack, [str(exe)], cpu_limit=0.5))
            assert_spawner_home(rt, loop_cgroups)
            assert rt.orphan_cgroups(stack) == []
        first = rt._spawner.thread_id if rt._spawner else None
        h = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "30"]))
        assert h.cgroup
        assert_inside(rt, h.pid, InstanceCgroup.parse(h.cgroup))
        assert rt._spawner is not None and rt._spawner.thread_id == first  # same thread
        await rt.stop(h, "SIGTERM", 2.0)
    finally:
        await _cleanup(rt, stack)


@pytest.mark.skipif(not CPU_V1, reason="needs the cgroup v1 cpu controller")
async def test_cpu_quota_set_back_after_spawn(stack: str, tmp_path: Path) -> None:
    rt = ProcessRuntime()
    try:
        h = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "30"], cpu_limit=0.01))
        assert h.cgroup and rt._spawner is not None and rt._spawner.thread_id is not None
        quota = [Path(p, "cpu.cfs_quota_us") for p in InstanceCgroup.parse(h.cgroup).paths]
        assert [int(q.read_text()) for q in quota if q.exists()] == [1000]
        await rt.stop(h, "SIGTERM", 2.0)
    finally:
        await _cleanup(rt, stack)


# -- when the thread cannot do it ---------------------------------------------------------
@needs_v1
async def test_falls_back_to_preexec_when_thread_cannot_join(
        stack: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = ProcessRuntime()
    loop_cgroups = task_cgroup(threading.get_native_id())
    real_join = threadspawn._join

    def join(directory: str) -> None:
        if f"/{stack}/" in directory:
            raise PermissionError(13, "Permission denied")
        real_join(directory)

    monkeypatch.setattr(threadspawn, "_join", join)
    try:
        h = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "30"], cpu_limit=0.5))
        assert h.cgroup
        cg = InstanceCgroup.parse(h.cgroup)
        assert_inside(rt, h.pid, cg)  # joined by the preexec_fn
        assert_spawner_home(rt, loop_cgroups)
        if CPU_V1:  # the lifted quota was put back
            quota = [Path(p, "cpu.cfs_quota_us") for p in cg.paths]
            assert [int(q.read_text()) for q in quota if q.exists()] == [50_000]
        await rt.stop(h, "SIGTERM", 2.0)
    finally:
        await _cleanup(rt, stack)


@needs_v1
async def test_spawner_thread_replaced_when_it_cannot_return(
        stack: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = ProcessRuntime()
    loop_cgroups = task_cgroup(threading.get_native_id())
    real_join = threadspawn._join
    failures = [1]

    def join(directory: str) -> None:
        if f"/{stack}/" not in directory and failures:
            failures.pop()
            raise OSError(5, "Input/output error")
        real_join(directory)

    monkeypatch.setattr(threadspawn, "_join", join)
    try:
        h = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "30"], "a-1"))
        assert h.cgroup and rt._spawner is not None
        assert_inside(rt, h.pid, InstanceCgroup.parse(h.cgroup))
        stuck = rt._spawner.thread_id
        assert stuck is not None
        await until(lambda: not os.path.exists(f"/proc/self/task/{stuck}"))  # it ended
        h2 = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "30"], "a-2"))
        assert h2.cgroup
        assert_inside(rt, h2.pid, InstanceCgroup.parse(h2.cgroup))
        assert rt._spawner.thread_id != stuck
        assert_spawner_home(rt, loop_cgroups)
        await asyncio.gather(rt.stop(h, "SIGTERM", 2.0), rt.stop(h2, "SIGTERM", 2.0))
        assert rt.orphan_cgroups(stack) == []
    finally:
        await _cleanup(rt, stack)


@needs_v1
def test_spawner_thread_inside_without_quota_while_launching(stack: str) -> None:
    support = detect("auto")
    spawner = ThreadSpawner(support.mounts)
    cg = support.create(stack, "inside-1", 0.01 if CPU_V1 else 0.0, 0)
    seen: list[object] = []

    def launch() -> subprocess.Popen[bytes]:
        seen.append(member_dirs(support.mounts, threadspawn._read_self()))
        if cg.cpu_quota is not None:
            seen.append(Path(cg.cpu_quota[0]).read_text().strip())
        return subprocess.Popen(["/bin/true"])

    try:
        child = spawner.spawn(cg, launch)
        assert child is not None and child.wait() == 0
        assert isinstance(seen[0], list) and in_cgroup(seen[0], cg)
        if CPU_V1:
            assert cg.cpu_quota is not None and seen[1] == "-1"
            assert Path(cg.cpu_quota[0]).read_text().strip() == "1000"
        assert spawner.thread_id is not None
        assert task_cgroup(spawner.thread_id) == task_cgroup(threading.get_native_id())
    finally:
        spawner.close()
        cg.remove()


@needs_v1
def test_child_killed_when_thread_was_moved_out(stack: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    support = detect("auto")
    spawner = ThreadSpawner(support.mounts)
    cg = support.create(stack, "moved-1", 0.0, 0)
    reads: list[str] = []
    real_read = threadspawn._read_self

    def read_self() -> str:  # the check after the spawn sees the thread back home
        reads.append(real_read())
        return reads[0]

    monkeypatch.setattr(threadspawn, "_read_self", read_self)
    launched: list[subprocess.Popen[bytes]] = []

    def launch() -> subprocess.Popen[bytes]:
        launched.append(subprocess.Popen(["/bin/sleep", "30"], start_new_session=True))
        return launched[0]

    try:
        assert spawner.spawn(cg, launch) is None
        assert launched[0].returncode == -signal.SIGKILL
        assert spawner.thread_id is not None
        assert task_cgroup(spawner.thread_id) == task_cgroup(threading.get_native_id())
    finally:
        spawner.close()
        cg.remove()


@needs_v1
def test_control_plane_never_listed_nor_signalled(stack: str) -> None:
    """While the spawner thread is inside an instance cgroup, cgroup.procs lists the
    control plane: pids(), signal() and kill() leave it out."""
    support = detect("auto")
    cg = support.create(stack, "visit-1", 0.0, 0)
    inside, leave = threading.Event(), threading.Event()
    home = member_dirs(support.mounts, task_cgroup(threading.get_native_id()))
    assert home is not None

    def visit() -> None:
        for path in cg.paths:
            threadspawn._join(path)
        inside.set()
        leave.wait(10)
        for path in home:
            threadspawn._join(path)

    t = threading.Thread(target=visit)
    t.start()
    try:
        assert inside.wait(10)
        procs = Path(cg.paths[0], "cgroup.procs").read_text().split()
        assert procs == [str(os.getpid())]
        assert cg.pids() == set() and cg.empty()
        assert cg.signal(signal.SIGKILL) == set()
        cg.kill()  # freezes and thaws the visiting thread, signals nobody
    finally:
        leave.set()
        t.join(10)
    assert not t.is_alive()
    assert cg.remove()


# -- pieces -------------------------------------------------------------------------------
def test_member_dirs() -> None:
    mounts = [Mount("/", "/sys/fs/cgroup/cpu,cpuacct", "cgroup", frozenset({"rw", "cpu",
                                                                            "cpuacct"})),
              Mount("/docker/abc", "/sys/fs/cgroup/memory", "cgroup",
                    frozenset({"rw", "memory"}))]
    text = "5:memory:/docker/abc/x\n3:cpu,cpuacct:/user/1\n0::/\n"
    assert member_dirs(mounts, text) == ["/sys/fs/cgroup/cpu,cpuacct/user/1",
                                         "/sys/fs/cgroup/memory/x"]
    assert member_dirs(mounts, "5:memory:/docker/abc\n3:cpu,cpuacct:/\n") == [
        "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/memory"]
    assert member_dirs(mounts, "5:memory:/other\n3:cpu,cpuacct:/\n") is None  # not mounted
    assert member_dirs(mounts, "5:memory:/docker/abcd\n3:cpu:/\n") is None
    assert member_dirs(mounts, "3:cpu,cpuacct:/\n") is None  # no memory line
    assert member_dirs(mounts[:1], "3:cpu,cpuacct:/../x\n") is None  # outside namespace


def test_thread_join_only_on_v1() -> None:
    assert ProcessRuntime(cgroups="off")._spawner is None
    assert ProcessRuntime(thread_join=False)._spawner is None
    rt = ProcessRuntime()
    assert (rt._spawner is not None) == (rt.cgroup_support.version == 1)
