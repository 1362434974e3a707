"""Health probes: one check of an instance, http, tcp or exec, bounded by the probe's timeout.

`run_probe` never raises for a failing instance: every outcome is a `ProbeResult` whose
message says what happened ("GET http://127.0.0.1:30001/ready → 503", "connect
127.0.0.1:30001 refused", "exec exited 1: <stderr>", "... timed out after 1s").

The http probe is a minimal HTTP/1.1 client on a non-blocking socket and the event loop's
`sock_*` calls: a 500-instance stack probed every 2 s makes 250 probes a second, and this
costs a fraction of what a general client does per request (no pool, no transport or
stream objects, no header models); see bench/bench_resources.py. It sends one
`Connection: close` GET, reads the status line and headers, drains a bounded amount of
body (so the server does not see a reset while writing), and does not follow redirects:
200-399 is success, as in Kubernetes. https uses asyncio streams with TLS, without
certificate verification (the probe checks liveness, not identity).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

from shipyard.spec.models import Probe
from shipyard.spec.units import format_duration

_MAX_HEAD = 16 * 1024  # status line and headers
_MAX_BODY = 10 * 1024  # body drained before closing, like Kubernetes
_ssl_context: ssl.SSLContext | None = None


@dataclass
class ProbeResult:
    ok: bool
    latency: float  # seconds the probe took
    message: str


class _ProbeFailed(Exception):
    """A probe failed for a reason already phrased as its message."""


def resolve_port(port: str | int | None, ports: Mapping[str, int]) -> int:
    """A probe's port: a name of `ports`, a number, or (None) the first declared port."""
    if port is None:
        if not ports:
            raise _ProbeFailed("no port to probe: the service declares none")
        return next(iter(ports.values()))
    if isinstance(port, int):
        return port
    if port in ports:
        return ports[port]
    if port.isdigit():
        return int(port)
    known = ", ".join(ports) or "none"
    raise _ProbeFailed(f"probe port {port!r} is not a port of the service (ports: {known})")


async def run_probe(
    probe: Probe,
    ports: Mapping[str, int],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> ProbeResult:
    """Run `probe` once against an instance whose ports are `ports` (name → number).

    `env` is the complete environment of an exec probe (None: inherit ours); `cwd` its
    working directory."""
    start = time.perf_counter()
    try:
        if probe.exec is not None:
            message = await _exec(probe.exec, probe.timeout, env, cwd)
        else:
            target = probe.tcp if probe.tcp is not None else probe.port
            port = resolve_port(target, ports)
            if probe.http is not None:
                message = await _http(probe, port)
            else:
                message = await _tcp(probe.host, port, probe.timeout)
    except _ProbeFailed as exc:
        return ProbeResult(False, time.perf_counter() - start, str(exc))
    return ProbeResult(True, time.perf_counter() - start, message)


def _timed_out(what: str, timeout: float) -> _ProbeFailed:
    return _ProbeFailed(f"{what} timed out after {format_duration(timeout)}")


def _connect_failed(host: str, port: int, exc: OSError) -> _ProbeFailed:
    address = _address(host, port)
    if isinstance(exc, ConnectionRefusedError):
        return _ProbeFailed(f"connect {address} refused")
    return _ProbeFailed(f"connect {address} failed: {exc.strerror or exc}")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _open_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket (raises OSError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not host.replace(".", "").isdigit() and ":" not in host:  # a name: resolve it
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        host = sockaddr[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


# -- tcp ------------------------------------------------------------------------------


async def _tcp(host: str, port: int, timeout: float) -> str:
    try:
        async with asyncio.timeout(timeout):
            sock = await _open_socket(host, port)
    except TimeoutError:
        raise _timed_out(f"connect {_address(host, port)}", timeout) from None
    except OSError as exc:
        raise _connect_failed(host, port, exc) from None
    sock.close()
    return f"connect {_address(host, port)} ok"


# -- http -----------------------------------------------------------------------------


async def _http(probe: Probe, port: int) -> str:
    host, path = probe.host, probe.http or "/"
    url = f"{probe.scheme}://{_address(host, port)}{path}"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {_address(host, port)}\r\n"
        "User-Agent: shipyard-probe/1\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    try:
        async with asyncio.timeout(probe.timeout):
            if probe.scheme == "https":
                status = await _exchange_tls(host, port, request)
            else:
                status = await _exchange(host, port, request)
    except TimeoutError:
        raise _timed_out(f"GET {url}", probe.timeout) from None
    except _ProbeFailed as exc:
        raise _ProbeFailed(f"GET {url}: {exc}") from None
    except OSError as exc:
        if isinstance(exc, ConnectionRefusedError):
            raise _ProbeFailed(f"connect {_address(host, port)} refused") from None
        raise _ProbeFailed(f"GET {url}: {exc.strerror or exc}") from None
    if 200 <= status < 400:
        return f"GET {url} → {status}"
    raise _ProbeFailed(f"GET {url} → {status}")


async def _exchange(host: str, port: int, request: bytes) -> int:
    loop = asyncio.get_running_loop()
    sock = await _open_socket(host, port)
    try:
        await loop.sock_sendall(sock, request)
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise _ProbeFailed("response headers too large")
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                if not buf:
                    raise _ProbeFailed("connection closed without a response")
                break  # headers cut short: judge by the status line
            buf += chunk
        status, length = _parse_head(buf if end < 0 else buf[:end])
        body = len(buf) - end - 4 if end >= 0 else 0
        want = _MAX_BODY if length is None else min(length, _MAX_BODY)
        while body < want:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                break
            body += len(chunk)
        return status
    finally:
        sock.close()


async def _exchange_tls(host: str, port: int, request: bytes) -> int:
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
        _ssl_context.check_hostname = False
        _ssl_context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        host, port, ssl=_ssl_context, server_hostname=host or None)
    try:
        writer.write(request)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _ProbeFailed("connection closed without a response") from None
            head = exc.partial
        except asyncio.LimitOverrunError:
            raise _ProbeFailed("response headers too large") from None
        status, length = _parse_head(head.rstrip(b"\r\n"))
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.read(_MAX_BODY if length is None else min(length, _MAX_BODY))
        return status
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def _parse_head(head: bytes) -> tuple[int, int | None]:
    """The status code and Content-Length (None if absent) of a response head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        shown = lines[0][:60].decode("latin-1", "replace")
        raise _ProbeFailed(f"not an HTTP response: {shown!r}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    return int(parts[1]), length


# -- exec -----------------------------------------------------------------------------


async def _exec(argv: list[str], timeout: float, env: Mapping[str, str] | None,
                cwd: str | None) -> str:
    """Run argv (never through a shell) in its own process group; exit 0 is success. On
    timeout the whole group is killed, so a probe's children cannot outlive it."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=dict(env) if env is not None else None,
            cwd=cwd, start_new_session=True,
        )
    except FileNotFoundError:
        raise _ProbeFailed(f"exec: command {argv[0]!r} not found") from None
    except PermissionError:
        raise _ProbeFailed(f"exec: command {argv[0]!r} is not executable") from None
    except OSError as exc:
        raise _ProbeFailed(f"exec: cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        raise _timed_out("exec", timeout) from None
    finally:
        if proc.returncode is None:
            await _kill_group(proc)
    code = proc.returncode
    if code == 0:
        return "exec exited 0"
    detail = _first_line(err) or _first_line(out)
    if code is not None and code < 0:
        what = f"exec killed by {signal.Signals(-code).name}"
    else:
        what = f"exec exited {code}"
    raise _ProbeFailed(f"{what}: {detail}" if detail else what)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    # The pipes are closed by the kill; wait() reaps the child and cannot hang.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await proc.wait()


def _first_line(data: bytes | None) -> str:
    if not data:
        return ""
    for line in data.decode("utf-8", "replace").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""
