"""Who is at the other end of a connection, as the kernel and TLS say — not as the request
claims.

uvicorn does not put the socket in the ASGI scope, so the server runs its HTTP protocol
through `IdentifyingH11Protocol`: when a connection is made it reads the peer's
credentials (SO_PEERCRED on the unix socket: pid, uid, gid) or its verified client
certificate (TLS), and every request on that connection carries them in
`scope["extensions"]["shipyard.connection"]`, where no client header can reach.
"""

from __future__ import annotations

import asyncio
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from shipyard.security.tls import PeerCert, peer_cert

SCOPE_KEY = "shipyard.connection"
_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid, uid_t uid, gid_t gid

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    user: str  # the uid's name, looked up once per connection (else the uid itself)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True)
class Connection:
    """One accepted connection: on the unix socket (with the peer's credentials) or on
    TCP (with its address and, over mutual TLS, its client certificate)."""

    transport: str  # "unix" | "tcp"
    creds: PeerCredentials | None = None
    address: tuple[str, int] | None = None
    cert: PeerCert | None = None
    tls: bool = False

    @property
    def source(self) -> str:
        """Where the request came from, for the audit trail."""
        if self.transport == "unix":
            if self.creds is None:
                return "unix:unknown-peer"
            return f"unix:pid={self.creds.pid},uid={self.creds.uid}"
        host, port = self.address or ("?", 0)
        return f"tcp:{host}:{port}"

    @property
    def rate_key(self) -> str:
        """What authentication failures are counted per: the uid, or the address."""
        if self.transport == "unix":
            return f"uid:{self.creds.uid}" if self.creds else "unix:unknown"
        return f"ip:{(self.address or ('?', 0))[0]}"


def peer_credentials(sock: Any) -> PeerCredentials | None:
    """SO_PEERCRED of a connected unix socket (Linux); None where it is not available."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None or sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid, user_name(uid))


def describe(transport: asyncio.BaseTransport) -> Connection:
    """The `Connection` of an asyncio transport (TLS, if any, already negotiated)."""
    sock = transport.get_extra_info("socket")
    ssl_object = transport.get_extra_info("ssl_object")
    family = getattr(sock, "family", None)
    if family == socket.AF_UNIX:
        return Connection("unix", creds=peer_credentials(sock))
    peer = transport.get_extra_info("peername")
    address = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
    return Connection("tcp", address=address, cert=peer_cert(ssl_object),
                      tls=ssl_object is not None)


def connection_of(scope: Scope) -> Connection | None:
    extensions = scope.get("extensions") or {}
    found = extensions.get(SCOPE_KEY)
    return found if isinstance(found, Connection) else None


def with_connection(app: ASGIApp, connection: Connection) -> ASGIApp:
    """`app`, with `connection` put into the scope of every request it serves."""

    async def connected(scope: Scope, receive: Receive, send: Send) -> None:
        scope["extensions"] = {**(scope.get("extensions") or {}), SCOPE_KEY: connection}
        await app(scope, receive, send)

    return connected


class IdentifyingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, telling the app who is connected."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = with_connection(self.app, describe(transport))
