"""Probes against real servers on 127.0.0.1, and the monitor's threshold semantics."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shipyard.health.monitor import ProbeMonitor, ThresholdTracker
from shipyard.health.probes import ProbeResult, resolve_port, run_probe
from shipyard.spec.models import Probe

PY = sys.executable


@dataclass
class HttpServer:
    """A tiny HTTP/1.1 server: GET path → status from `routes` (404 otherwise).
    `/slow` never answers; `/garbage` answers something that is not HTTP."""

    routes: dict[str, int] = field(default_factory=dict)
    port: int = 0
    hits: int = 0
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            parts = request.split()
            path = parts[1].decode() if len(parts) > 1 else "/"
            self.hits += 1
            if path == "/slow":
                await asyncio.sleep(30)
            if path == "/garbage":
                writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            elif path == "/close":
                pass
            else:
                status = self.routes.get(path, 404)
                body = f"status {status}\n".encode()
                extra = "Location: /elsewhere\r\n" if 300 <= status < 400 else ""
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
                    + body)
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def http() -> AsyncIterator[HttpServer]:
    srv = HttpServer(routes={"/ready": 200, "/down": 503, "/moved": 302, "/gone": 404})
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    srv.server = server
    srv.port = server.sockets[0].getsockname()[1]
    yield srv
    server.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nobody takes it), not
    listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


# -- http -------------------------------------------------------------------------------


async def test_http_200_passes(http: HttpServer) -> None:
    result = await run_probe(Probe(http="/ready"), {"http": http.port})
    assert result.ok
    assert result.message == f"GET http://127.0.0.1:{http.port}/ready → 200"
    assert 0 < result.latency < 1


async def test_http_503_fails_with_status(http: HttpServer) -> None:
    result = await run_probe(Probe(http="/down"), {"http": http.port})
    assert not result.ok
    assert result.message == f"GET http://127.0.0.1:{http.port}/down → 503"


async def test_http_redirect_is_success_and_not_followed(http: HttpServer) -> None:
    result = await run_probe(Probe(http="/moved"), {"http": http.port})
    assert result.ok and result.message.endswith("→ 302")
    assert http.hits == 1


async def test_http_404_fails(http: HttpServer) -> None:
    assert not (await run_probe(Probe(http="/gone"), {"http": http.port})).ok


async def test_http_timeout(http: HttpServer) -> None:
    start = time.perf_counter()
    result = await run_probe(Probe(http="/slow", timeout="200ms"), {"http": http.port})
    assert not result.ok
    assert result.message.endswith("timed out after 200ms")
    assert 0.19 < time.perf_counter() - start < 1.5


async def test_http_timeout_in_seconds_message(http: HttpServer) -> None:
    result = await run_probe(Probe(http="/slow", timeout=1), {"http": http.port})
    assert result.message.endswith("timed out after 1s")


async def test_http_refused(closed_port: int) -> None:
    result = await run_probe(Probe(http="/ready"), {"http": closed_port})
    assert not result.ok
    assert result.message == f"connect 127.0.0.1:{closed_port} refused"


async def test_http_not_http_and_closed(http: HttpServer) -> None:
    garbage = await run_probe(Probe(http="/garbage"), {"http": http.port})
    assert not garbage.ok and "not an HTTP response" in garbage.message
    closed = await run_probe(Probe(http="/close"), {"http": http.port})
    assert not closed.ok and "closed without a response" in closed.message


async def test_http_port_by_name_number_and_default(http: HttpServer, closed_port: int) -> None:
    ports = {"admin": closed_port, "http": http.port}
    assert (await run_probe(Probe(http="/ready", port="http"), ports)).ok
    assert (await run_probe(Probe(http="/ready", port=http.port), ports)).ok
    assert (await run_probe(Probe(http="/ready", port=str(http.port)), {})).ok
    # default: the first declared port, which here refuses
    assert not (await run_probe(Probe(http="/ready"), ports)).ok


async def test_http_large_body_and_no_content_length() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(b"HTTP/1.0 200 OK\r\nX-Pad: " + b"a" * 3000 + b"\r\n\r\n" + b"x" * 200_000)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await run_probe(Probe(http="/"), {"p": port})
        assert result.ok, result.message
    finally:
        server.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool")
async def test_https_probe_without_certificate_verification(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    srv = HttpServer(routes={"/ready": 200, "/down": 503})
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await run_probe(Probe(http="/ready", scheme="https"), {"https": port})
        assert ok.ok and ok.message == f"GET https://127.0.0.1:{port}/ready → 200"
        down = await run_probe(Probe(http="/down", scheme="https"), {"https": port})
        assert not down.ok and down.message.endswith("→ 503")
    finally:
        server.close()


def test_resolve_port_errors() -> None:
    assert resolve_port(None, {"a": 1, "b": 2}) == 1
    assert resolve_port("b", {"a": 1, "b": 2}) == 2
    assert resolve_port(7, {}) == 7


async def test_unknown_port_name_and_no_ports() -> None:
    unknown = await run_probe(Probe(http="/", port="admin"), {"http": 1})
    assert not unknown.ok
    assert "'admin' is not a port of the service (ports: http)" in unknown.message
    none = await run_probe(Probe(http="/"), {})
    assert not none.ok and "no port to probe" in none.message


# -- tcp --------------------------------------------------------------------------------


async def test_tcp_ok_by_name_and_number(http: HttpServer) -> None:
    by_name = await run_probe(Probe(tcp="http"), {"http": http.port})
    assert by_name.ok and by_name.message == f"connect 127.0.0.1:{http.port} ok"
    assert (await run_probe(Probe(tcp=http.port), {})).ok


async def test_tcp_refused(closed_port: int) -> None:
    result = await run_probe(Probe(tcp=closed_port), {})
    assert not result.ok
    assert result.message == f"connect 127.0.0.1:{closed_port} refused"


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs")
async def test_tcp_timeout_when_backlog_is_full() -> None:
    # A listener that never accepts, with its queue full: Linux drops further SYNs, so
    # connecting hangs until the probe's timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.05)
        result = await run_probe(Probe(tcp=port, timeout="200ms"), {})
        assert not result.ok
        assert result.message == f"connect 127.0.0.1:{port} timed out after 200ms"
    finally:
        for s in fillers:
            s.close()
        listener.close()


# -- exec -------------------------------------------------------------------------------


async def test_exec_ok() -> None:
    result = await run_probe(Probe(exec=[PY, "-c", "pass"]), {})
    assert result.ok and result.message == "exec exited 0"


async def test_exec_fail_reports_first_stderr_line() -> None:
    code = "import sys; print('out'); sys.stderr.write('\\nnot ready yet\\nmore\\n'); sys.exit(3)"
    result = await run_probe(Probe(exec=[PY, "-c", code]), {})
    assert not result.ok
    assert result.message == "exec exited 3: not ready yet"


async def test_exec_fail_falls_back_to_stdout_and_bare_code() -> None:
    out = await run_probe(Probe(exec=[PY, "-c", "print('db down'); raise SystemExit(1)"]), {})
    assert out.message == "exec exited 1: db down"
    bare = await run_probe(Probe(exec=[PY, "-c", "raise SystemExit(2)"]), {})
    assert bare.message == "exec exited 2"


async def test_exec_never_uses_a_shell() -> None:
    # A shell would expand these; exec passes them through literally.
    code = "import sys; sys.exit(0 if sys.argv[1:] == ['$(false)', '*', ';exit 1'] else 1)"
    result = await run_probe(Probe(exec=[PY, "-c", code, "$(false)", "*", ";exit 1"]), {})
    assert result.ok, result.message


async def test_exec_timeout_kills_the_process_group(tmp_path: Path) -> None:
    # The probe starts a grandchild holding the pipes; both must be gone after the timeout.
    pidfile = tmp_path / "pids"
    code = (
        "import subprocess, sys, os, time\n"
        f"c = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(30)'])\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}')\n"
        "time.sleep(30)\n"
    )
    start = time.perf_counter()
    result = await run_probe(Probe(exec=[PY, "-c", code], timeout="500ms"), {})
    assert not result.ok and result.message == "exec timed out after 500ms"
    assert time.perf_counter() - start < 3
    pids = [int(p) for p in pidfile.read_text().split()]
    await asyncio.sleep(0.1)
    for pid in pids:
        assert not _alive(pid), f"pid {pid} survived the probe timeout"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_exec_env_and_cwd(tmp_path: Path) -> None:
    code = "import os, sys; sys.exit(0 if os.environ.get('PROBE_X') == '1' and os.getcwd() == sys.argv[1] else 1)"  # noqa: E501
    env = {**os.environ, "PROBE_X": "1"}
    ok = await run_probe(Probe(exec=[PY, "-c", code, str(tmp_path)]), {}, env=env,
                         cwd=str(tmp_path))
    assert ok.ok, ok.message
    missing = await run_probe(Probe(exec=[PY, "-c", code, str(tmp_path)]), {},
                              cwd=str(tmp_path))
    assert not missing.ok


async def test_exec_command_not_found_and_not_executable(tmp_path: Path) -> None:
    result = await run_probe(Probe(exec=["no-such-probe-command-x"]), {})
    assert not result.ok and "not found" in result.message
    script = tmp_path / "probe.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    result = await run_probe(Probe(exec=[str(script)]), {})
    assert not result.ok and "not executable" in result.message


# -- threshold tracker ------------------------------------------------------------------


def _reference_states(results: list[bool], s: int, f: int) -> list[bool | None]:
    """The state after each result, defined independently of the tracker: the kind of the
    most recent moment at which the last s results were all successes or the last f all
    failures."""
    states: list[bool | None] = []
    state: bool | None = None
    for i in range(len(results)):
        if i + 1 >= s and all(results[i + 1 - s:i + 1]):
            state = True
        if i + 1 >= f and not any(results[i + 1 - f:i + 1]):
            state = False
        states.append(state)
    return states


@pytest.mark.parametrize(("s", "f"), list(itertools.product(range(1, 5), range(1, 5))))
def test_threshold_tracker_exhaustive(s: int, f: int) -> None:
    for length in range(9):
        for results in itertools.product((True, False), repeat=length):
            tracker = ThresholdTracker(s, f)
            expected = _reference_states(list(results), s, f)
            previous: bool | None = None
            for ok, want in zip(results, expected, strict=True):
                change = tracker.feed(ok)
                assert tracker.state == want, (results, s, f)
                assert change == (want if want != previous else None), (results, s, f)
                previous = want


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 6), st.integers(1, 6))
def test_threshold_tracker_matches_reference(results: list[bool], s: int, f: int) -> None:
    tracker = ThresholdTracker(s, f)
    states = [(tracker.feed(ok), tracker.state)[1] for ok in results]
    assert states == _reference_states(results, s, f)


def test_threshold_tracker_examples() -> None:
    t = ThresholdTracker(success_threshold=2, failure_threshold=3)
    assert [t.feed(x) for x in (True, True, True)] == [None, True, None]
    assert [t.feed(x) for x in (False, False, True, False, False, False)] == [
        None, None, None, None, None, False]
    with pytest.raises(ValueError):
        ThresholdTracker(0, 1)


# -- monitor ----------------------------------------------------------------------------


@dataclass
class Recorder:
    results: list[ProbeResult] = field(default_factory=list)
    changes: list[tuple[bool, int]] = field(default_factory=list)  # (passing, results seen)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_change(self, passing: bool, result: ProbeResult) -> None:
        self.changes.append((passing, len(self.results)))
        self.event.set()

    def on_result(self, result: ProbeResult) -> None:
        self.results.append(result)

    async def wait_change(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.changes) < count:
                self.event.clear()
                await self.event.wait()


async def test_monitor_follows_a_toggled_server(http: HttpServer) -> None:
    http.routes["/toggle"] = 200
    probe = Probe(http="/toggle", interval="30ms", timeout="500ms",
                  success_threshold=2, failure_threshold=3)
    rec = Recorder()
    monitor = ProbeMonitor(probe, {"http": http.port}, rec.on_change, on_result=rec.on_result)
    assert monitor.passing is None
    monitor.start()
    try:
        await rec.wait_change(1)
        assert rec.changes == [(True, 2)] and monitor.passing is True
        http.routes["/toggle"] = 503
        seen = len(rec.results)
        await rec.wait_change(2)
        passing, at = rec.changes[1]
        assert not passing and monitor.passing is False
        assert [r.ok for r in rec.results[at - 3:at]] == [False] * 3
        assert at - seen <= 4  # the third failure after the switch (one may be in flight)
        assert rec.results[at - 1].message.endswith("→ 503")
        http.routes["/toggle"] = 200
        await rec.wait_change(3)
        passing, at = rec.changes[2]
        assert passing and [r.ok for r in rec.results[at - 2:at]] == [True, True]
    finally:
        await monitor.stop()
    assert not monitor.running
    count = len(rec.results)
    await asyncio.sleep(0.1)
    assert len(rec.results) == count  # nothing runs after stop()


async def test_monitor_first_failure_needs_the_threshold(closed_port: int) -> None:
    rec = Recorder()
    probe = Probe(tcp=closed_port, interval="20ms", failure_threshold=3)
    monitor = ProbeMonitor(probe, {}, rec.on_change, on_result=rec.on_result)
    monitor.start()
    try:
        await rec.wait_change(1)
    finally:
        await monitor.stop()
    assert rec.changes[0] == (False, 3)
    assert rec.results[0].message == f"connect 127.0.0.1:{closed_port} refused"


async def test_monitor_initial_delay_and_fixed_rate(http: HttpServer) -> None:
    rec = Recorder()
    probe = Probe(tcp="http", interval="100ms", initial_delay="300ms")
    monitor = ProbeMonitor(probe, {"http": http.port}, rec.on_change, on_result=rec.on_result)
    monitor.start()
    await asyncio.sleep(0.2)
    assert rec.results == []
    await asyncio.sleep(0.65)  # probes at ~0.3, 0.4, ... 0.8
    await monitor.stop()
    assert 4 <= len(rec.results) <= 7


async def test_monitor_stop_from_inside_on_change(http: HttpServer) -> None:
    calls: list[bool] = []
    monitor: ProbeMonitor

    async def on_change(passing: bool, result: ProbeResult) -> None:
        calls.append(passing)
        await monitor.stop()  # returns at once; the loop ends after this callback

    monitor = ProbeMonitor(Probe(tcp="http", interval="10ms"), {"http": http.port}, on_change)
    monitor.start()
    await asyncio.sleep(0.2)
    assert calls == [True]
    assert not monitor.running


async def test_monitor_stop_waits_for_a_running_callback(http: HttpServer) -> None:
    finished: list[bool] = []
    entered = asyncio.Event()

    async def on_change(passing: bool, result: ProbeResult) -> None:
        entered.set()
        await asyncio.sleep(0.1)
        finished.append(passing)

    monitor = ProbeMonitor(Probe(tcp="http", interval="10ms"), {"http": http.port}, on_change)
    monitor.start()
    await entered.wait()
    await monitor.stop()
    assert finished == [True]


async def test_monitor_survives_failing_callbacks(http: HttpServer) -> None:
    results: list[ProbeResult] = []

    async def on_change(passing: bool, result: ProbeResult) -> None:
        raise RuntimeError("callback bug")

    def on_result(result: ProbeResult) -> None:
        results.append(result)
        if len(results) == 1:
            raise RuntimeError("metrics bug")

    monitor = ProbeMonitor(Probe(tcp="http", interval="10ms"), {"http": http.port}, on_change,
                           on_result=on_result)
    monitor.start()
    await asyncio.sleep(0.15)
    assert monitor.running
    await monitor.stop()
    assert len(results) >= 3 and monitor.passing is True


async def test_monitor_exec_probe_with_env(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    code = "import os, sys; sys.exit(0 if os.path.exists(os.environ['FLAG']) else 1)"
    rec = Recorder()
    probe = Probe(exec=[PY, "-c", code], interval="30ms", failure_threshold=1)
    monitor = ProbeMonitor(probe, {}, rec.on_change, env={**os.environ, "FLAG": str(flag)},
                           cwd=str(tmp_path), on_result=rec.on_result)
    monitor.start()
    try:
        await rec.wait_change(1)
        flag.write_text("")
        await rec.wait_change(2)
    finally:
        await monitor.stop()
    assert [c[0] for c in rec.changes] == [False, True]


async def test_breaker_stops_probing_an_endpoint_that_hangs() -> None:
    """A real listener that accepts connections and never answers: three probes time out,
    the breaker opens, probes then fail at once without connecting; after the recovery
    timeout one trial probe connects again (and hangs again: the breaker re-opens)."""
    from shipyard.reliability.breaker import BreakerConfig, CircuitBreaker

    accepted: list[socket.socket] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()

    def accept() -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = listener.accept()
            accepted.append(conn)

    loop.add_reader(listener.fileno(), accept)
    probe = Probe(http="/", interval="20ms", timeout="100ms", failure_threshold=1)
    breaker = CircuitBreaker("probe:t/a-1/readiness",
                             BreakerConfig(window=0, consecutive_failures=3,
                                           recovery_timeout=0.4))
    rec = Recorder()
    monitor = ProbeMonitor(probe, {"http": listener.getsockname()[1]}, rec.on_change,
                           on_result=rec.on_result, breaker=breaker)
    monitor.start()
    try:
        await asyncio.sleep(0.9)
    finally:
        await monitor.stop()
        loop.remove_reader(listener.fileno())
        for conn in accepted:
            conn.close()
        listener.close()
    timed_out = [r for r in rec.results if r.message.startswith("GET ")]
    refused_fast = [r for r in rec.results if "is open after 3 consecutive" in r.message]
    assert len(timed_out) >= 4, rec.results  # 3 to open, then a trial after 0.4 s
    assert refused_fast and all(r.latency == 0.0 for r in refused_fast)
    # without the breaker, 0.9 s of 100 ms timeouts every 20 ms would be ~8 connections
    assert len(accepted) == len(timed_out) <= 6
