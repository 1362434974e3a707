"""The process runtime with real processes: launch checks, exit codes, environment, logs,
stop escalation, nothing left behind (cgroups v1, the v2 hierarchy where mounted, and
without cgroups), OOM reporting, adoption after a control-plane restart."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from shipyard.errors import RuntimeLaunchError
from shipyard.runtime.base import Handle, LaunchSpec
from shipyard.runtime.cgroups import InstanceCgroup, detect
from shipyard.runtime.process import ProcessRuntime
from tests.conftest import PYTHON, pids_alive

IS_ROOT = os.geteuid() == 0
CGROUPS = detect("auto").enabled
needs_cgroups = pytest.mark.skipif(not CGROUPS, reason="no permission to create cgroups")
V1_MEMORY = CGROUPS and detect("auto").version == 1 and "memory" in detect("auto").limits

# Forks; the grandchild daemonizes (setsid + double fork), ignores SIGTERM and writes
# its pid; the child itself ignores SIGTERM too when asked.
DAEMONIZER = textwrap.dedent("""
    import os, signal, sys, time
    pidfile = sys.argv[1]
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            with open(pidfile + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(pidfile + ".tmp", pidfile)
            time.sleep(120)
        os._exit(0)
    if len(sys.argv) > 2:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("parent ready", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def stack() -> str:
    return f"t-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def rt(stack: str) -> AsyncIterator[ProcessRuntime]:
    runtime = ProcessRuntime()
    yield runtime
    await _cleanup(runtime, stack)


async def _cleanup(runtime: ProcessRuntime, stack: str) -> None:
    for path in runtime.orphan_cgroups(stack):
        await runtime.kill_cgroup(path)
    for d in runtime.cgroup_support.stack_dirs(stack):
        if os.path.isdir(d):
            os.rmdir(d)
    await runtime.close()


def make_spec(tmp_path: Path, stack: str, argv: list[str], instance: str = "app-1",
              **kw: object) -> LaunchSpec:
    fields: dict[str, object] = {
        "env": {"PATH": os.environ.get("PATH", os.defpath)},
        "workdir": str(tmp_path),
        "log_path": str(tmp_path / "logs" / f"{instance}.log"),
    }
    fields.update(kw)
    return LaunchSpec(stack=stack, service="app", instance=instance, argv=argv,
                      **fields)  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def read_pid(path: Path) -> int:
    return int(path.read_text())


# -- launching ----------------------------------------------------------------------------
async def test_exit_codes(rt: ProcessRuntime, stack: str, tmp_path: Path) -> None:
    ok = await rt.start(make_spec(tmp_path, stack, ["true"], "a-1"))
    bad = await rt.start(make_spec(tmp_path, stack, [PYTHON, "-c", "raise SystemExit(3)"],
                                   "a-2"))
    killed = await rt.start(make_spec(
        tmp_path, stack, [PYTHON, "-c", "import os, signal; os.kill(os.getpid(), 15)"], "a-3"))
    assert [await rt.wait(h) for h in (ok, bad, killed)] == [0, 3, -signal.SIGTERM]
    assert ok.pgid == ok.pid
    assert rt.exit_reason(bad) is None
    assert await rt.wait(bad) == 3  # asking again still answers
    assert not rt.adopt(ok)


async def test_env_cwd_and_logs(rt: ProcessRuntime, stack: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {"ONLY": "this", "PATH": "/usr/bin:/bin"}
    spec = make_spec(tmp_path, stack, ["/bin/sh", "-c", "env; pwd; echo oops >&2; cat"],
                     env=env, workdir=str(work))
    h = await rt.start(spec)
    assert await rt.wait(h) == 0  # `cat` sees /dev/null: stdin is not ours
    out = Path(spec.log_path).read_text().splitlines()
    assert str(work) in out and "oops" in out
    printed = {line.split("=", 1)[0] for line in out if "=" in line}
    assert printed - {"PWD", "SHLVL", "_"} == set(env)  # (sh adds its own)
    h = await rt.start(make_spec(tmp_path, stack, ["echo", "again"], env=env,
                                 workdir=str(work)))
    await rt.wait(h)
    lines = Path(spec.log_path).read_text().splitlines()
    assert lines[: len(out)] == out and lines[-1] == "again"  # appended


async def test_launch_errors(rt: ProcessRuntime, stack: str, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    cases = {
        "nope-xyz-cmd": "service app: command 'nope-xyz-cmd' not found (PATH=/usr/bin:/bin)",
        "./missing": "service app: command './missing' not found",
        "./script.sh": "service app: command './script.sh' is not executable",
        str(tmp_path): "is not executable",
    }
    for cmd, message in cases.items():
        spec = make_spec(tmp_path, stack, [cmd], env={"PATH": "/usr/bin:/bin"})
        with pytest.raises(RuntimeLaunchError) as err:
            await rt.start(spec)
        assert message in err.value.message, (cmd, err.value.message)
    with pytest.raises(RuntimeLaunchError, match="is not executable"):
        await rt.start(make_spec(tmp_path, stack, ["script.sh"],
                                 env={"PATH": str(tmp_path)}))
    with pytest.raises(RuntimeLaunchError) as err:
        await rt.start(make_spec(tmp_path, stack, ["true"], workdir="/nonexistent/x"))
    assert err.value.message == "service app: workdir /nonexistent/x does not exist"
    with pytest.raises(RuntimeLaunchError, match="is not a directory"):
        await rt.start(make_spec(tmp_path, stack, ["true"], workdir=str(script)))
    with pytest.raises(RuntimeLaunchError, match="empty command"):
        await rt.start(make_spec(tmp_path, stack, []))
    # A relative command is found from the workdir, and PATH comes from spec.env.
    script.chmod(0o755)
    h = await rt.start(make_spec(tmp_path, stack, ["./script.sh"]))
    assert await rt.wait(h) == 0
    h = await rt.start(make_spec(tmp_path, stack, ["script.sh"],
                                 env={"PATH": f"/usr/bin:/bin:{tmp_path}"}))
    assert await rt.wait(h) == 0
    assert rt.orphan_cgroups(stack) == []  # failed launches leave no cgroup behind


# -- stopping -----------------------------------------------------------------------------
async def test_stop_graceful(rt: ProcessRuntime, stack: str, tmp_path: Path) -> None:
    h = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "60"]))
    started = time.monotonic()
    await rt.stop(h, "SIGTERM", 5.0)
    assert time.monotonic() - started < 1.0
    assert await rt.wait(h) == -signal.SIGTERM
    assert pids_alive([h.pid]) == []
    if h.cgroup:
        assert not InstanceCgroup.parse(h.cgroup).exists()


async def test_stop_escalates_to_sigkill(rt: ProcessRuntime, stack: str,
                                         tmp_path: Path) -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); time.sleep(60)")
    spec = make_spec(tmp_path, stack, [PYTHON, "-c", code])
    h = await rt.start(spec)
    await until(lambda: "ready" in Path(spec.log_path).read_text())
    started = time.monotonic()
    await rt.stop(h, "TERM", 1.0)
    elapsed = time.monotonic() - started
    assert 0.95 <= elapsed < 1.6, elapsed
    assert await rt.wait(h) == -signal.SIGKILL
    assert rt.exit_reason(h) is None  # killed by us, not by the OOM killer


async def _daemon_left_nothing(runtime: ProcessRuntime, spec: LaunchSpec,
                               pidfile: Path) -> Handle:
    h = await runtime.start(spec)
    await until(lambda: pidfile.exists() and "ready" in Path(spec.log_path).read_text())
    daemon = read_pid(pidfile)
    assert pids_alive([h.pid, daemon]) == [h.pid, daemon]
    started = time.monotonic()
    await runtime.stop(h, "SIGTERM", 0.5)
    assert time.monotonic() - started < 3
    assert pids_alive([h.pid, daemon]) == []
    assert await runtime.wait(h) == -signal.SIGKILL  # the parent ignored SIGTERM too
    return h


@needs_cgroups
async def test_stop_kills_daemonized_grandchild_with_cgroup(
        rt: ProcessRuntime, stack: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    spec = make_spec(tmp_path, stack, [PYTHON, "-c", DAEMONIZER, str(pidfile), "ignore"])
    h = await _daemon_left_nothing(rt, spec, pidfile)
    assert h.cgroup and not InstanceCgroup.parse(h.cgroup).exists()


async def test_stop_kills_daemonized_grandchild_without_cgroup(
        stack: str, tmp_path: Path) -> None:
    runtime = ProcessRuntime(cgroups="off")
    assert not runtime.cgroups_enabled and runtime.warning
    assert "not enforced" in runtime.warning
    pidfile = tmp_path / "daemon.pid"
    env = {"PATH": "/usr/bin:/bin", "SHIPYARD_STACK": stack, "SHIPYARD_INSTANCE": "app-1"}
    spec = make_spec(tmp_path, stack, [PYTHON, "-c", DAEMONIZER, str(pidfile), "ignore"],
                     env=env)
    try:
        h = await _daemon_left_nothing(runtime, spec, pidfile)
        assert h.cgroup is None and "env_marker" in h.extra
    finally:
        await runtime.close()


@pytest.mark.skipif(not (IS_ROOT and os.path.isdir("/sys/fs/cgroup/unified")),
                    reason="needs a writable cgroup v2 hierarchy")
async def test_cgroup_v2_hierarchy(stack: str, tmp_path: Path) -> None:
    runtime = ProcessRuntime(cgroups="v2")
    if not runtime.cgroups_enabled:
        pytest.skip(f"cgroup v2 not usable: {runtime.warning}")
    assert runtime.cgroup_support.version == 2
    try:
        pidfile = tmp_path / "daemon.pid"
        spec = make_spec(tmp_path, stack, [PYTHON, "-c", DAEMONIZER, str(pidfile), "x"])
        h = await _daemon_left_nothing(runtime, spec, pidfile)
        assert h.cgroup and ":" not in h.cgroup
        assert not os.path.exists(h.cgroup)
    finally:
        await _cleanup(runtime, stack)


# -- cgroup limits ------------------------------------------------------------------------
@pytest.mark.skipif(not V1_MEMORY, reason="needs the cgroup v1 memory controller")
async def test_limits_applied_and_oom_reported(rt: ProcessRuntime, stack: str,
                                               tmp_path: Path) -> None:
    hog = ("import time\nblocks = []\nfor _ in range(64):\n"
           "    blocks.append(bytearray(8 * 2**20))\n    time.sleep(0.002)\n"
           "print('survived', flush=True)\n")
    spec = make_spec(tmp_path, stack, [PYTHON, "-c", hog], "hog-1",
                     memory_limit=64 * 2**20, cpu_limit=0.5)
    h = await rt.start(spec)
    assert h.cgroup
    cg = InstanceCgroup.parse(h.cgroup)
    quota = [p for p in cg.paths if os.path.exists(os.path.join(p, "cpu.cfs_quota_us"))]
    if quota:  # still running or not: read the limits while the directory exists
        with open(os.path.join(quota[0], "cpu.cfs_quota_us")) as f:
            assert int(f.read()) == 50_000
    assert await rt.wait(h) == -signal.SIGKILL
    assert rt.exit_reason(h) == "oom-killed"
    assert "survived" not in Path(spec.log_path).read_text()
    await rt.stop(h, "SIGTERM", 1.0)
    assert not cg.exists()
    # Within its limit the same program is fine.
    ok = await rt.start(make_spec(tmp_path, stack, [PYTHON, "-c", hog], "hog-2",
                                  memory_limit=1024 * 2**20))
    assert await rt.wait(ok) == 0 and rt.exit_reason(ok) is None


@needs_cgroups
async def test_memory_limit_written(rt: ProcessRuntime, stack: str, tmp_path: Path) -> None:
    h = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "30"],
                                 memory_limit=100 * 2**20, cpu_limit=1.5))
    try:
        assert h.cgroup
        cg = InstanceCgroup.parse(h.cgroup)
        assert h.pid in cg.pids()
        for path in cg.paths:
            for name, want in (("memory.limit_in_bytes", "104857600"),
                               ("memory.max", "104857600"),
                               ("cpu.cfs_quota_us", "150000"),
                               ("cpu.max", "150000 100000")):
                file = os.path.join(path, name)
                if os.path.exists(file):
                    with open(file) as f:
                        assert f.read().strip() == want
    finally:
        await rt.stop(h, "SIGTERM", 2.0)


# -- adoption -----------------------------------------------------------------------------
async def test_adopt_from_another_runtime(rt: ProcessRuntime, stack: str,
                                          tmp_path: Path) -> None:
    h = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "60"]))
    other = ProcessRuntime()
    try:
        saved = Handle(**json.loads(json.dumps(h.__dict__)))  # as the store keeps it
        assert other.adopt(saved)
        waiter = asyncio.create_task(other.wait(saved))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        os.kill(h.pid, signal.SIGKILL)  # killed by someone else
        assert await asyncio.wait_for(waiter, 2.0) is None  # not our child: code unknown
        assert not other.adopt(saved)
        await other.stop(saved, "SIGTERM", 1.0)  # cleans up what is left
    finally:
        await other.close()


async def test_adopt_rejects_reused_pid(rt: ProcessRuntime, stack: str,
                                        tmp_path: Path) -> None:
    h = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "60"]))
    try:
        assert rt.adopt(h)
        assert not rt.adopt(Handle(h.instance, h.pid, h.pgid, h.proc_start - 3.0))
        assert not rt.adopt(Handle(h.instance, h.pid, h.pgid, h.proc_start + 0.5))
        assert not rt.adopt(Handle("ghost", 2**22 + 7, 2**22 + 7, time.time()))
        # A wrong start time must not make wait() wait for the unrelated process.
        assert await asyncio.wait_for(
            rt.wait(Handle(h.instance, h.pid, h.pgid, h.proc_start - 3.0)), 1.0) is None
    finally:
        await rt.stop(h, "SIGTERM", 2.0)


CONTROL_PLANE = textwrap.dedent("""
    import asyncio, json, sys
    from shipyard.runtime.base import LaunchSpec
    from shipyard.runtime.process import ProcessRuntime

    async def main():
        rt = ProcessRuntime()
        spec = LaunchSpec(stack=sys.argv[1], service="app", instance="app-1",
                          argv=[sys.executable, "-c", sys.argv[2], sys.argv[3]],
                          env={"PATH": "/usr/bin:/bin"}, workdir=sys.argv[4],
                          log_path=sys.argv[5])
        h = await rt.start(spec)
        print(json.dumps(h.__dict__), flush=True)
        # exits without stopping anything: the control plane "crashes"

    asyncio.run(main())
""")


async def test_restarted_control_plane_adopts_and_stops(rt: ProcessRuntime, stack: str,
                                                        tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    log = tmp_path / "app.log"
    out = subprocess.run([PYTHON, "-c", CONTROL_PLANE, stack, DAEMONIZER, str(pidfile),
                          str(tmp_path), str(log)], capture_output=True, text=True,
                         check=True, timeout=20)
    h = Handle(**json.loads(out.stdout))
    await until(lambda: pidfile.exists() and "ready" in log.read_text())
    daemon = read_pid(pidfile)
    assert rt.adopt(h)
    waiter = asyncio.create_task(rt.wait(h))
    await rt.stop(h, "SIGTERM", 2.0)
    assert await asyncio.wait_for(waiter, 2.0) is None
    assert pids_alive([h.pid, daemon]) == []
    if h.cgroup:
        assert not InstanceCgroup.parse(h.cgroup).exists()


@needs_cgroups
async def test_kill_cgroup_and_leftovers(rt: ProcessRuntime, stack: str,
                                         tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    spec = make_spec(tmp_path, stack, [PYTHON, "-c", DAEMONIZER, str(pidfile)])
    h = await rt.start(spec)
    await until(pidfile.exists)
    daemon = read_pid(pidfile)
    os.kill(h.pid, signal.SIGKILL)  # the main process dies, its daemon stays behind
    assert await rt.wait(h) == -signal.SIGKILL
    assert pids_alive([daemon]) == [daemon]
    assert rt.orphan_cgroups(stack) == [h.cgroup]
    # A new start of the same instance first clears what the previous run left.
    pidfile.unlink()
    h2 = await rt.start(spec)
    assert pids_alive([daemon]) == []
    await until(pidfile.exists)
    daemon2 = read_pid(pidfile)
    # And a restarted control plane empties a recorded cgroup with kill_cgroup().
    other = ProcessRuntime()
    assert h2.cgroup
    await other.kill_cgroup(h2.cgroup)
    assert pids_alive([h2.pid, daemon2]) == []
    assert not InstanceCgroup.parse(h2.cgroup).exists()
    await other.kill_cgroup(h2.cgroup)  # idempotent
    await other.close()


# -- without permission -------------------------------------------------------------------
NON_ROOT = textwrap.dedent("""
    import asyncio, json, os, sys
    from shipyard.runtime.base import LaunchSpec
    from shipyard.runtime.process import ProcessRuntime

    async def main():
        rt = ProcessRuntime()
        d = sys.argv[1]
        pidfile = os.path.join(d, "daemon.pid")
        spec = LaunchSpec(stack="nonroot", service="app", instance="app-1",
                          argv=[sys.executable, "-c", sys.argv[2], pidfile],
                          env={"PATH": "/usr/bin:/bin", "SHIPYARD_STACK": "nonroot",
                               "SHIPYARD_INSTANCE": "app-1"},
                          workdir=d, log_path=os.path.join(d, "app.log"),
                          memory_limit=2**30)
        h = await rt.start(spec)
        while not os.path.exists(pidfile):
            await asyncio.sleep(0.02)
        daemon = int(open(pidfile).read())
        await rt.stop(h, "SIGTERM", 1.0)
        print(json.dumps({"uid": os.getuid(), "cgroups": rt.cgroups_enabled,
                          "warning": rt.warning, "cgroup": h.cgroup,
                          "pids": [h.pid, daemon], "code": await rt.wait(h)}))

    asyncio.run(main())
""")


@pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to become an unprivileged user")
def test_without_cgroup_permission(tmp_path: Path) -> None:
    work = Path("/tmp") / f"shipyard-nonroot-{uuid.uuid4().hex[:8]}"
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    try:
        # An unprivileged user that may still read the venv under /root.
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
               PYTHON, "-c", NON_ROOT, str(work), DAEMONIZER]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd="/tmp")
        if out.returncode != 0 and "setpriv" in out.stderr:
            pytest.skip(f"setpriv failed: {out.stderr.strip()}")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.splitlines()[-1])
        assert result["uid"] == 65534 and result["cgroups"] is False
        assert result["cgroup"] is None and result["code"] == -signal.SIGTERM
        assert "limits are not enforced" in result["warning"]
        assert "limits are not enforced" in out.stderr  # logged once, as a warning
        assert out.stderr.count("limits are not enforced") == 1
        assert pids_alive(result["pids"]) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_detect_parses_v1_and_v2(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "memory" / "user" / "me").mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"32 31 0:29 / {root}/memory rw,relatime - cgroup cgroup rw,memory\n"
        f"41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw\n")
    own = tmp_path / "cgroup"
    own.write_text("4:memory:/user/me\n0::/user/me\n")
    v1 = detect("auto", mountinfo=str(mountinfo), proc_cgroup=str(own))
    assert v1.version == 1
    assert v1.bases == [f"{root}/memory/user/me/shipyard"]
    assert v1.limits == frozenset({"memory"}) and v1.problem and "cpu" in v1.problem
    assert v1.instance_paths("my stack", "api/1") == [
        f"{root}/memory/user/me/shipyard/my_stack/api_1"]
    # Only a v2 mount: one directory (here a plain one, so no controllers).
    mountinfo.write_text(f"41 31 0:38 / {root}/unified rw - cgroup2 cgroup2 rw\n")
    v2 = detect("auto", "/", mountinfo=str(mountinfo), proc_cgroup=str(own))
    assert v2.version == 2 and v2.bases == [f"{root}/unified/shipyard"]
    assert v2.limits == frozenset()
    # Nothing we can create: disabled, with the reason.
    (root / "ro").write_text("a file, not a directory")
    mountinfo.write_text(f"41 31 0:38 / {root}/ro rw - cgroup2 cgroup2 rw\n")
    none = detect("auto", "/", mountinfo=str(mountinfo), proc_cgroup=str(own))
    assert not none.enabled and none.problem and "cannot create cgroups" in none.problem
    assert detect("off").problem == "cgroups disabled by configuration"
    assert sys.platform.startswith("linux")


@needs_cgroups
async def test_cleanup_orphans_keeps_adopted(rt: ProcessRuntime, stack: str,
                                             tmp_path: Path) -> None:
    kept = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "60"], "a-1"))
    orphan = await rt.start(make_spec(tmp_path, stack, ["/bin/sleep", "60"], "b-1"))
    restarted = ProcessRuntime()
    try:
        assert restarted.adopt(kept)
        assert await restarted.cleanup_orphans(stack, keep=[kept.cgroup or ""]) == [
            orphan.cgroup]
        assert pids_alive([kept.pid, orphan.pid]) == [kept.pid]
        assert await rt.wait(orphan) == -signal.SIGKILL
        assert restarted.orphan_cgroups(stack) == [kept.cgroup]
    finally:
        await restarted.stop(kept, "SIGTERM", 2.0)
        await restarted.close()
    assert pids_alive([kept.pid]) == []


def test_parse_signal() -> None:
    from shipyard.errors import InputError
    from shipyard.runtime.spawn import parse_signal

    assert parse_signal("SIGTERM") == parse_signal("term") == signal.SIGTERM
    assert parse_signal("9") == parse_signal(9) == signal.SIGKILL
    assert parse_signal(" sigint ") == signal.SIGINT
    for bad in ("SIGNOPE", "999", ""):
        with pytest.raises(InputError):
            parse_signal(bad)
