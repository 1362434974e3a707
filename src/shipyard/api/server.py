"""Running the control plane: uvicorn on the unix socket in `$SHIPYARD_HOME` (owner-only,
or owner and one group), plus an optional TCP listener with TLS.

One server per home: a lock file held for the server's lifetime guards the store against a
second engine, and a socket that still answers is never taken over. Every connection is
described to the app by `IdentifyingH11Protocol` (the unix peer's uid, the TLS client
certificate), and the app authenticates every request. The TCP listener refuses to start
without TLS (`shipyard tls init`), and still only on loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import ipaddress
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from shipyard.api.app import close_streams, create_app
from shipyard.api.ha import ha_enabled, serve_ha
from shipyard.errors import InputError, ShipyardError
from shipyard.security.config import SecurityConfig, TlsFiles
from shipyard.security.guard import Security
from shipyard.security.peercred import IdentifyingH11Protocol
from shipyard.security.tls import server_context

if TYPE_CHECKING:
    from fastapi import FastAPI

    from shipyard.engine.engine import Engine, EngineConfig

log = logging.getLogger("shipyard.api")

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
    """`HOST:PORT`, `:PORT` or `PORT` (host defaults to 127.0.0.1); only loopback
    addresses are accepted for now."""
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
            f"refusing to listen on {host}:{port}: TCP is only allowed on a loopback "
            "address for now",
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


def open_listeners(socket_path: Path, tcp: str | None = None, *,
                   group: str | None = None) -> Listeners:
    """Take the home's server lock, then bind the unix socket (mode 0600; 0660 and owned by
    `group` when one is given) and the optional TCP listener. Raises `ServerRunning` if
    another server holds the home."""
    socket_path = Path(socket_path)
    if len(os.fsencode(socket_path)) > MAX_UNIX_PATH:
        raise InputError(f"socket path {socket_path} is too long for a unix socket "
                         f"(at most {MAX_UNIX_PATH} bytes)", hint="use a shorter SHIPYARD_HOME")
    tcp_address = parse_tcp(tcp) if tcp else None
    gid = _group_id(group) if group else None
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
            if gid is not None:
                os.chown(socket_path, -1, gid)
                os.chmod(socket_path, 0o660)
                _check_traversable(socket_path.parent, group or "")
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


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise InputError(f"security.yaml: unix.group: no group named {group}") from None


def _check_traversable(home: Path, group: str) -> None:
    mode = os.stat(home).st_mode
    if not mode & stat.S_IXGRP:
        log.warning("the group %s cannot reach the socket: %s is not group-searchable "
                    "(chmod g+x it)", group, home)


def tls_for_tcp(config: SecurityConfig) -> TlsFiles:
    """The TLS files a TCP listener needs; refuses (exit code 2) without them."""
    files = config.tls_files()
    if files is None:
        raise InputError("refusing to listen on TCP without TLS: there is no server "
                         f"certificate in {config.tls_dir}",
                         hint="create one with `shipyard tls init`, or set tls.cert and "
                              "tls.key in security.yaml")
    return files


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
    # proto IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio only turns Nagle
    # off (TCP_NODELAY) on sockets that say they are TCP; without it every TLS answer
    # (headers and body in two records) waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
                handle_signals: bool = True, security: Security | None = None,
                configure: Callable[[FastAPI], None] | None = None) -> None:
    """Serve the API for `engine` until SIGTERM/SIGINT (when `handle_signals`, in the main
    thread) or until `stop` is set; then end open streams and shut down gracefully.

    Pass `listeners` already opened by `open_listeners` (before the engine starts) or a
    `socket_path` (and `tcp`) to open them here; either way they are closed on return.
    `security` defaults to the one of the engine's home (security.yaml, tokens, audit)."""
    own_security = security is None
    if security is None:
        security = Security.for_home(engine.config.home)
    try:
        if listeners is None:
            if tcp:
                tls_for_tcp(security.config)
            if socket_path is None:
                socket_path = engine.config.socket_path
            listeners = open_listeners(socket_path, tcp, group=security.config.unix.group)
        try:
            await _serve(engine, listeners, stop or asyncio.Event(), on_ready,
                         handle_signals, security, configure)
        finally:
            listeners.close()
    finally:
        if own_security:
            security.close()


def _config(app: FastAPI) -> uvicorn.Config:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=int(GRACE), proxy_headers=False,
                            server_header=False,
                            http=IdentifyingH11Protocol)
    config.load()
    return config


async def _serve(engine: Engine, listeners: Listeners, stop: asyncio.Event,
                 on_ready: Callable[[Listeners], None] | None, handle_signals: bool,
                 security: Security, configure: Callable[[FastAPI], None] | None = None
                 ) -> None:
    app = create_app(engine, security)
    if configure is not None:  # e.g. high availability (api/ha.py)
        configure(app)
    # Two uvicorn servers over one app: the unix socket in clear, TCP with TLS.
    servers: list[tuple[_Server, list[socket.socket]]] = [
        (_Server(_config(app)), [listeners.unix])]
    if listeners.tcp is not None:
        files = tls_for_tcp(security.config)
        tcp_config = _config(app)
        tcp_config.ssl = server_context(files.cert, files.key, files.client_ca,
                                        files.require_client_cert)
        servers.append((_Server(tcp_config), [listeners.tcp]))
    tasks = [asyncio.create_task(server.serve(sockets=socks), name="uvicorn")
             for server, socks in servers]
    stopper = asyncio.create_task(stop.wait())
    try:
        with stop_on_signals(stop, handle_signals):
            while (not all(server.started for server, _ in servers)
                   and not any(task.done() for task in tasks)):
                await asyncio.sleep(0.01)
            if all(server.started for server, _ in servers) and on_ready is not None:
                on_ready(listeners)
            await asyncio.wait({*tasks, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        close_streams(app)
        for server, _ in servers:
            server.should_exit = True
        stopper.cancel()
        failed = False
        for task in tasks:
            try:
                await task
            except SystemExit:  # uvicorn exits like this when its startup fails
                failed = True
        if failed:
            raise ShipyardError("the API server failed to start")


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
                     handle_signals: bool = True, ha: bool | None = None,
                     lease_ttl: int = 5) -> None:
    """The whole control plane: read security.yaml and claim the home and bind the sockets
    first (so a second server, or a bad configuration, fails before touching the store),
    then run the engine and serve its API. With `ha` (the default on an etcd store) the
    engine runs under the leader election (api/ha.py, engine/leadership.py)."""
    from shipyard.engine.engine import Engine

    security_config = SecurityConfig.load(config.home)
    if tcp:
        tls_for_tcp(security_config)
    listeners = open_listeners(config.socket_path, tcp, group=security_config.unix.group)
    stop = stop or asyncio.Event()
    security: Security | None = None
    try:
        security = Security(security_config)
        with stop_on_signals(stop, handle_signals):
            if ha_enabled(config, ha):  # several servers on one etcd, one of them leads
                await serve_ha(config, listeners, stop=stop, on_ready=on_ready,
                               security=security, ttl=lease_ttl)
                return
            async with Engine(config) as engine:
                await serve(engine, listeners=listeners, stop=stop, on_ready=on_ready,
                            handle_signals=False, security=security)
    finally:
        listeners.close()
        if security is not None:
            security.close()


def describe_tcp(listeners: Listeners) -> str | None:
    """The line announcing the TCP listener, if there is one."""
    if listeners.tcp_address is None:
        return None
    host, port = listeners.tcp_address
    shown = f"[{host}]" if ":" in host else host
    return (f"also listening on https://{shown}:{port} (TLS; bearer tokens or client "
            "certificates)")
