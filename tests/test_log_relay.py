"""Instance output through the log relay (runtime/logrelay.py, runtime/logpipe.py): a full
log disk drops output without touching the instance, the relay and the control plane can
each die without the instance noticing, and nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard import Engine, EngineConfig
from shipyard.runtime.logpipe import LogPipes, pipes_dir
from shipyard.spec.models import Stack
from tests.conftest import PYTHON, pids_alive, port_range

# Prints a numbered line of ~1 KiB every 5 ms, flushing each: a Python program whose
# print() raises on a full disk if its output were the log file itself.
CHATTY = """
import sys, time
n = 0
while True:
    n += 1
    print(f"line {n} " + "x" * 1000, flush=True)
    time.sleep(0.005)
"""


def make_stack(tmp_path: Path, services: dict[str, Any]) -> Stack:
    doc = {"name": "t", "ports": {"range": port_range()}, "deploy": {"timeout": "20s"},
           "services": services}
    return Stack.model_validate(doc | {"base_dir": str(tmp_path)})


def chatty(tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY)
    return {"command": [PYTHON, str(script)], "stop": {"timeout": "2s"},
            "restart": {"policy": "on-failure", "initial": "100ms", "max": "200ms"}}


async def until(check: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}")


async def events(engine: Engine, kind: str) -> list[Any]:
    return [e for e in await engine.store.list_events(stack="t") if e.kind == kind]


def holders(path: str) -> list[int]:
    """The pids that have `path` open (from /proc/*/fd)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                        found.append(int(pid))
                        break
    return found


def relay_pids(home: Path) -> list[int]:
    """Relays started for `home` (their error log is home/logs/relay.log)."""
    return [p for p in holders(str(home / "logs" / "relay.log")) if pids_alive([p])]


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Whatever a failed test left running from its tmp_path (chatty.py) is killed."""
    yield
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(tmp_path) in arg for arg in proc.info["cmdline"] or []):
                proc.kill()


@pytest.fixture
def small_logs(tmp_path: Path) -> Iterator[Path]:
    """home/logs on a 256 KiB tmpfs of its own (mounting needs root: skipped without)."""
    logs = tmp_path / "home" / "logs"
    logs.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                           str(logs)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield logs
    finally:
        subprocess.run(["umount", "-l", str(logs)], check=False)


async def test_a_full_log_disk_drops_output_and_the_service_keeps_running(
        tmp_path: Path, small_logs: Path) -> None:
    home = tmp_path / "home"
    async with Engine(EngineConfig(home=home, stop_on_exit=True)) as engine:
        result = await engine.apply(make_stack(tmp_path, {"chatty": chatty(tmp_path)}))
        assert result.ok, result
        [inst] = await engine.instances("t")
        pid = inst.pid
        dropped = await until(lambda: events(engine, "instance.output_dropped"),
                              what="an output_dropped event")
        assert dropped[0].instance == "chatty-1" and dropped[0].service == "chatty"
        assert "No space left on device" in dropped[0].message, dropped[0].message
        await asyncio.sleep(0.5)  # it goes on printing into a full disk
        [inst] = await engine.instances("t")
        assert inst.pid == pid and inst.restarts == 0 and inst.state.value == "ready"
        assert pids_alive([pid]) == [pid]

        log = small_logs / "t" / "chatty-1.log"
        os.truncate(log, 0)  # room again
        resumed = await until(lambda: events(engine, "instance.output_resumed"),
                              what="an output_resumed event")
        lost = resumed[0].data["dropped"]
        assert lost > 0
        text = await until(lambda: "\nline " in log.read_text() and log.read_text(),
                           what="new lines in the log")
        assert text.startswith(f"[shipyard] {lost} bytes of output dropped: No space left")
        [inst] = await engine.instances("t")
        assert inst.pid == pid and inst.restarts == 0
        await engine.down("t")
    assert pids_alive([pid]) == []
    await until(lambda: not relay_pids(home), what="the relay to exit")


async def test_output_of_an_instance_that_exits_at_once_is_kept(tmp_path: Path) -> None:
    async with Engine(EngineConfig(home=tmp_path / "home", stop_on_exit=True)) as engine:
        stack = make_stack(tmp_path, {"quick": {
            "command": ["/bin/sh", "-c", "echo said-before-exit; exit 3"], "restart": "no"}})
        await engine.apply(stack)
        log = engine.config.log_path("t", "quick-1")

        async def exited() -> bool:
            return any(e.kind == "instance.failed" and "exited 3" in e.message
                       for e in await engine.store.list_events(stack="t"))

        await until(exited, what="the instance to exit")  # (not stopped before its echo)
    # the control plane closed at once: still the line is there, and the relay is gone
    await until(lambda: log.exists() and "said-before-exit" in log.read_text(),
                what="the line in the log")
    await until(lambda: not relay_pids(tmp_path / "home"), what="the relay to exit")


async def test_a_pipe_with_no_writer_left_is_finished_at_once(tmp_path: Path) -> None:
    """A pipe re-attached after its instance and every holder are gone (epoll never
    reports the hang-up of writers a reader did not see): the relay does not keep it,
    and exits."""
    home = tmp_path / "home"
    pipes = LogPipes(home)
    pipes.pipes_dir.mkdir(parents=True, exist_ok=True)
    fifo = str(pipes.pipes_dir / "t.gone-1.0.fifo")
    os.mkfifo(fifo, 0o600)
    fd, live = await pipes.open("t.live-1", str(tmp_path / "live.log"), 0, 0, "t/live-1")
    assert await pipes.adopt(fifo, str(tmp_path / "gone.log"), 0, 0, "t/gone-1")
    await until(lambda: not os.path.exists(fifo), what="the dead pipe to be finished")
    os.write(fd, b"still here\n")
    os.close(fd)
    pipes.forget(live)
    await pipes.close()
    await until(lambda: not relay_pids(home), what="the relay to exit")
    assert (tmp_path / "live.log").read_text() == "still here\n"


async def test_the_relay_killed_is_replaced_and_output_keeps_flowing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with Engine(EngineConfig(home=home, stop_on_exit=True)) as engine:
        assert (await engine.apply(make_stack(tmp_path, {"chatty": chatty(tmp_path)}))).ok
        [inst] = await engine.instances("t")
        fifo = inst.runtime["log_fifo"]
        log = engine.config.log_path("t", "chatty-1")
        await until(lambda: log.exists() and log.stat().st_size > 0, what="output")
        [relay] = relay_pids(home)
        os.kill(relay, signal.SIGKILL)
        await until(lambda: relay_pids(home) and relay_pids(home) != [relay],
                    what="a new relay")
        size = log.stat().st_size
        await until(lambda: log.stat().st_size > size + 10_000, what="output to go on")
        [after] = await engine.instances("t")
        assert after.pid == inst.pid and after.restarts == 0
        # the instance never had a pipe without a reader for long: its lines are whole
        numbers = [int(line.split()[1]) for line in log.read_text().splitlines()
                   if line.startswith("line ")]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        await engine.down("t")
    await until(lambda: not relay_pids(home) and not os.path.exists(fifo),
                what="the relay to exit and the pipe to go")


async def test_output_flows_while_no_control_plane_runs(tmp_path: Path) -> None:
    """A control plane that leaves its instances running: their output still reaches the
    log; the next one re-attaches the same pipe."""
    home = tmp_path / "home"
    stack = make_stack(tmp_path, {"chatty": chatty(tmp_path)})
    async with Engine(EngineConfig(home=home)) as first:
        assert (await first.apply(stack)).ok
        [inst] = await first.instances("t")
        log = first.config.log_path("t", "chatty-1")
    try:
        size = log.stat().st_size
        # ~200 lines a second of 1 KiB: several times a pipe's 64 KiB with no one connected
        await until(lambda: log.stat().st_size > size + 300_000,
                    what="output without a control plane")
        [relay] = relay_pids(home)
        async with Engine(EngineConfig(home=home, stop_on_exit=True)) as second:
            [again] = await second.instances("t")
            assert again.pid == inst.pid
            assert again.runtime["log_fifo"] == inst.runtime["log_fifo"]
            size = log.stat().st_size
            await until(lambda: log.stat().st_size > size + 10_000, what="output to go on")
            assert relay_pids(home) == [relay]
            await second.down("t")
        assert pids_alive([inst.pid]) == []
    finally:  # a failure above must not leave the instance running
        if inst.pid is not None and pids_alive([inst.pid]):
            os.kill(inst.pid, signal.SIGKILL)
    await until(lambda: not relay_pids(home), what="the relay to exit")
    assert not pipes_dir(home).exists()  # the relay removed the directory on its way out


async def test_the_relay_rotates_the_logs_it_writes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = EngineConfig(home=home, stop_on_exit=True, log_max_bytes=50_000, log_backups=2)
    async with Engine(config) as engine:
        assert (await engine.apply(make_stack(tmp_path, {"chatty": chatty(tmp_path)}))).ok
        log = engine.config.log_path("t", "chatty-1")
        await until(lambda: Path(f"{log}.2").exists(), what="two rotations")
        await engine.down("t")
    assert not Path(f"{log}.3").exists()
    for path in (Path(f"{log}.1"), Path(f"{log}.2")):
        assert 50_000 < path.stat().st_size < 50_000 + 2_000
    # no line is lost or cut across a rotation
    lines = "".join(Path(p).read_text() for p in (f"{log}.2", f"{log}.1", log)).splitlines()
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_the_sink_drops_on_a_full_disk_and_says_how_much(small_logs: Path) -> None:
    """The writer the relay and the container output threads share."""
    from shipyard.runtime.logrelay import Sink

    sink = Sink("", -1, str(small_logs / "out.log"), 0, 0, "t/x-1")
    notices: list[dict[str, Any]] = []
    chunk = b"y" * 4095 + b"\n"
    for _ in range(100):  # 400 KiB into 256 KiB
        notices += sink.write(chunk)
    assert [n["ev"] for n in notices] == ["dropped"]
    assert notices[0]["error"] == "No space left on device" and notices[0]["key"] == "t/x-1"
    lost = sink.dropped
    assert 100 * 4096 - lost == os.stat(small_logs / "out.log").st_size
    os.truncate(small_logs / "out.log", 0)
    notices = sink.write(b"back\n")
    assert notices == [{"ev": "resumed", "key": "t/x-1", "log": str(small_logs / "out.log"),
                        "dropped": lost}]
    assert (small_logs / "out.log").read_text() == (
        f"[shipyard] {lost} bytes of output dropped: No space left on device\nback\n")
    sink.close()


ENGINE_SCRIPT = """
import asyncio, sys
from shipyard import Engine, EngineConfig, load_stack

async def main():
    async with Engine(EngineConfig(home=sys.argv[1])) as engine:
        result = await engine.apply(load_stack(sys.argv[2]))
        print("ok" if result.ok else result, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_output_keeps_flowing_across_a_kill_9_of_the_control_plane(
        tmp_path: Path) -> None:
    import yaml

    home = tmp_path / "home"
    chatty(tmp_path)
    stack_file = tmp_path / "shipyard.yaml"
    stack_file.write_text(yaml.safe_dump({
        "name": "t", "ports": {"range": port_range()},
        "services": {"chatty": chatty(tmp_path)}}))
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    proc = subprocess.Popen([PYTHON, str(script), str(home), str(stack_file)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == "ok", line
        log = EngineConfig(home=home).log_path("t", "chatty-1")
        await until(lambda: log.exists() and log.stat().st_size > 0, what="output")
        proc.kill()  # kill -9 of the control plane
        proc.wait()
        size = log.stat().st_size
        await until(lambda: log.stat().st_size > size + 100_000, what="output without a "
                    "control plane")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    async with Engine(EngineConfig(home=home, stop_on_exit=True)) as engine:
        [inst] = await engine.instances("t")
        assert inst.restarts == 0 and pids_alive([inst.pid]) == [inst.pid]
        size = log.stat().st_size
        await until(lambda: log.stat().st_size > size + 10_000, what="output to go on")
        await engine.down("t")
    numbers = [int(line.split()[1]) for line in log.read_text().splitlines()
               if line.startswith("line ")]
    assert numbers == list(range(1, len(numbers) + 1))  # not a line lost
    await until(lambda: not relay_pids(home), what="the relay to exit")


async def test_a_launch_that_fails_leaves_no_pipe(tmp_path: Path) -> None:
    garbage = tmp_path / "not-a-program"  # executable bit, but no format exec knows
    garbage.write_bytes(b"\x00\x01\x02\x03")
    garbage.chmod(0o755)
    home = tmp_path / "home"
    async with Engine(EngineConfig(home=home, stop_on_exit=True)) as engine:
        result = await engine.apply(make_stack(tmp_path, {"b": {
            "command": [str(garbage)], "restart": "no"}}))
        assert not result.ok and "Exec format error" in result.failed["b"]
        assert not pipes_dir(home).exists() or os.listdir(pipes_dir(home)) == []
