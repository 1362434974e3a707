"""Running the control plane: uvicorn on the unix socket in `$SHIPYARD_HOME` (owner-only),
plus an optional TCP listener.

One server per home: a lock file held for the server's lifetime guards the store against a
second engine, and a socket that still answers is never taken over. TCP needs
authentication (a later issue), so for now it is refused anywhere but on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from shipyard.api.app import close_streams, create_app
from shipyard.errors import InputError, ShipyardError

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine, EngineConfig

MAX_UNIX_PATH = 107  # sun_path is 108 bytes with its terminating NUL
GRACE = 5.0  # seconds open requests get to finish once shutdown begins


class ServerRunning(ShipyardError):
    """Another control plane already serves this home."""


@dataclass
class Listeners:
    """The bound sockets of one server, and the lock that makes it the only one."""

    socket_path: Path
    unix: socket.socket
    lock_fd: int
    tcp: socket.socket | None = None
    tcp_address: tuple[str, int] | None = None
    _inode: int = field(default=0, repr=False)

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.unix] + ([self.tcp] if self.tcp is not None else [])

    def close(self) -> None:
        """Close the sockets, remove the socket file if it is still ours, drop the lock."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)
        self.lock_fd = -1


def parse_tcp(address: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `PORT` (host defaults to 127.0.0.1); only loopback is
    accepted while the API has no authentication."""
    host, sep, port_text = address.rpartition(":")
    if not sep:
        host, port_text = "", address
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise InputError(f"invalid TCP address {address!r}",
                         hint="expected HOST:PORT, e.g. 127.0.0.1:8600") from None
    if not 0 <= port <= 65535:
        raise InputError(f"invalid TCP port {port} in {address!r}")
    if not _is_loopback(host):
        raise InputError(
            f"refusing to listen on {host}:{port}: the API has no authentication yet, so "
            "TCP is only allowed on a loopback address",
            hint="use 127.0.0.1:PORT, or the unix socket")
    return host, port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def socket_answers(path: Path, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the unix socket `path`."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
        return True


def open_listeners(socket_path: Path, tcp: str | None = None) -> Listeners:
    """Take the home's server lock, then bind the unix socket (mode 0600) and the optional
    TCP listener. Raises `ServerRunning` if another server holds the home."""
    socket_path = Path(socket_path)
    if len(os.fsencode(socket_path)) > MAX_UNIX_PATH:
        raise InputError(f"socket path {socket_path} is too long for a unix socket "
                         f"(at most {MAX_UNIX_PATH} bytes)", hint="use a shorter SHIPYARD_HOME")
    tcp_address = parse_tcp(tcp) if tcp else None
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = _take_lock(socket_path.parent / "server.lock", socket_path)
    try:
        if socket_answers(socket_path):
            raise ServerRunning(f"a Shipyard server is already running at {socket_path}")
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(socket_path).st_mode):
                raise InputError(f"{socket_path} exists and is not a socket",
                                 hint="move it away and start again")
            os.unlink(socket_path)  # stale: left by a server that died
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unix.bind(os.fspath(socket_path))
            os.chmod(socket_path, 0o600)
            unix.listen(128)
            unix.setblocking(False)
        except BaseException:
            unix.close()
            raise
        listeners = Listeners(socket_path, unix, lock_fd,
                              _inode=os.stat(socket_path).st_ino)
        if tcp_address is not None:
            try:
                listeners.tcp = _bind_tcp(*tcp_address)
            except BaseException:
                listeners.close()
                raise
            host, port = listeners.tcp.getsockname()[:2]
            listeners.tcp_address = (host, port)
        return listeners
    except BaseException:
        if lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(lock_fd)
        raise


def _take_lock(path: Path, socket_path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ServerRunning(
                f"a Shipyard server is already running at {socket_path}",
                hint=f"its lock {path} is held") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ShipyardError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `serve()` decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


async def serve(engine: Engine, *, socket_path: Path | None = None, tcp: str | None = None,
                listeners: Listeners | None = None, stop: asyncio.Event | None = None,
                on_ready: Callable[[Listeners], None] | None = None,
                handle_signals: bool = True) -> None:
    """Serve the API for `engine` until SIGTERM/SIGINT (when `handle_signals`, in the main
    thread) or until `stop` is set; then end open streams and shut down gracefully.

    Pass `listeners` already opened by `open_listeners` (before the engine starts) or a
    `socket_path` (and `tcp`) to open them here; either way they are closed on return."""
    if listeners is None:
        if socket_path is None:
            socket_path = engine.config.socket_path
        listeners = open_listeners(socket_path, tcp)
    try:
        await _serve(engine, listeners, stop or asyncio.Event(), on_ready, handle_signals)
    finally:
        listeners.close()


async def _serve(engine: Engine, listeners: Listeners, stop: asyncio.Event,
                 on_ready: Callable[[Listeners], None] | None, handle_signals: bool) -> None:
    app = create_app(engine)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=int(GRACE), proxy_headers=False,
                            server_header=False)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=listeners.sockets), name="uvicorn")
    stopper = asyncio.create_task(stop.wait())
    try:
        with stop_on_signals(stop, handle_signals):
            while not server.started and not task.done():
                await asyncio.sleep(0.01)
            if server.started and on_ready is not None:
                on_ready(listeners)
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        close_streams(app)
        server.should_exit = True
        stopper.cancel()
        try:
            await task
        except SystemExit as exc:  # uvicorn exits like this when its startup fails
            raise ShipyardError("the API server failed to start") from exc


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event, enabled: bool = True) -> Iterator[None]:
    """Set `stop` on SIGTERM or SIGINT while inside (main thread only)."""
    loop = asyncio.get_running_loop()
    handled: list[int] = []
    if enabled and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def run_server(config: EngineConfig, *, tcp: str | None = None,
                     stop: asyncio.Event | None = None,
                     on_ready: Callable[[Listeners], None] | None = None,
                     handle_signals: bool = True) -> None:
    """The whole control plane: claim the home and bind the sockets first (so a second
    server fails before touching the store), then run the engine and serve its API."""
    from shipyard.engine.engine import Engine

    listeners = open_listeners(config.socket_path, tcp)
    stop = stop or asyncio.Event()
    try:
        with stop_on_signals(stop, handle_signals):
            async with Engine(config) as engine:
                await serve(engine, listeners=listeners, stop=stop, on_ready=on_ready,
                            handle_signals=False)
    finally:
        listeners.close()


def warn_unauthenticated(listeners: Listeners) -> None:
    if listeners.tcp_address is not None:
        host, port = listeners.tcp_address
        print(f"warning: the API on http://{host}:{port} is unauthenticated: any local user "
              "can control Shipyard through it", file=sys.stderr, flush=True)
