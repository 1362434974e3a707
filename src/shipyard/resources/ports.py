"""Ports for instances: `auto` ports handed out from the stack's range, fixed ports claimed.

The allocator remembers who owns which port, but it never trusts its memory alone: a port is
handed out only if the host agrees it is free, checked by binding it. The check sets
SO_REUSEADDR on purpose. On Linux a bind with SO_REUSEADDR still fails against any socket
in LISTEN state, and against any socket bound without the option, so every real holder is
seen; what it lets through is a port whose only remains are connections in TIME_WAIT,
which servers can bind because nearly all of them set SO_REUSEADDR too (asyncio,
uvicorn, nginx, Go's net package, Node). Without it, every port an instance served on
would look taken for a minute after the instance died. The round-robin cursor makes such
reuse rare anyway: a released port comes back only after the whole range has gone round.

The allocator is not thread-safe; it belongs to the engine's event loop.
"""

from __future__ import annotations

import errno
import socket

from shipyard.errors import ResourceError

# Where a server may bind: the wildcard address and loopback. Binding the wildcard fails
# on Linux when anyone holds the port on any IPv4 address; loopback is checked as well for
# systems (the BSDs, macOS) where a specific address may shadow a wildcard bind.
# The IPv6 wildcard (v6 only: v4 is checked above) catches a port held on ::1 or any other
# IPv6 address; a host without IPv6 skips it.
_CHECK_ADDRESSES = ("0.0.0.0", "127.0.0.1", "::")
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def port_is_free(port: int, hosts: tuple[str, ...] = _CHECK_ADDRESSES) -> bool:
    """Whether a TCP server could bind `port` now, on every one of `hosts`."""
    for host in hosts:
        v6 = ":" in host
        try:
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
                                 socket.SOCK_STREAM)
        except OSError as exc:
            if v6 and exc.errno in _NO_IPV6:
                continue
            raise
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
        except OSError as exc:
            if v6 and exc.errno in _NO_IPV6:
                continue
            return False
        finally:
            sock.close()
    return True


def find_port_holder(port: int) -> str | None:
    """Who holds TCP `port` on this host, as "nginx (pid 1234)", or None when it cannot
    be known (nobody does, or the holder belongs to a user whose sockets we cannot see)."""
    import psutil  # only here: a port taken by someone else is rare

    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    # A listener is the holder that matters; any other socket bound to the port is a
    # fallback (a client bound to it, a server not yet listening).
    best: int | None = None
    for conn in connections:
        if not conn.laddr or conn.laddr.port != port or conn.pid is None:
            continue
        if conn.status == psutil.CONN_LISTEN:
            best = conn.pid
            break
        if best is None:
            best = conn.pid
    if best is None:
        return None
    try:
        name = psutil.Process(best).name()
    except (psutil.Error, OSError):
        return f"pid {best}"
    return f"{name} (pid {best})"


class PortAllocator:
    """Hands out ports of `low`..`high` to owners (an owner is an instance, e.g.
    "demo/api-1"), round-robin, skipping ports reserved here or held by anyone on the host.
    """

    def __init__(self, low: int, high: int, *, host: str = "127.0.0.1") -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"invalid port range {low}-{high}")
        self.low = low
        self.high = high
        self.host = host
        self._hosts = tuple(dict.fromkeys(("0.0.0.0", host)))
        self._owner: dict[int, str] = {}
        self._by_owner: dict[str, set[int]] = {}
        self._taken = bytearray(high - low + 1)  # 1 where a port of the range is reserved
        self._cursor = low

    @property
    def range(self) -> str:
        return f"{self.low}-{self.high}"

    def reserve(self, port: int, owner: str) -> None:
        """Record `port` as `owner`'s without any check (re-loading recorded instances, or
        a fixed port already verified). The port may lie outside the range."""
        previous = self._owner.get(port)
        if previous is not None and previous != owner:
            self._by_owner[previous].discard(port)
        self._owner[port] = owner
        self._by_owner.setdefault(owner, set()).add(port)
        if self.low <= port <= self.high:
            self._taken[port - self.low] = 1

    def allocate(self, owner: str) -> int:
        """The next free port of the range for `owner`; ResourceError when none is."""
        taken, low, size = self._taken, self.low, len(self._taken)
        start = self._cursor - low
        held = 0
        # Scan [start, size) then [0, start); bytearray.find skips reserved ports in C.
        for lo, hi in ((start, size), (0, start)):
            i = taken.find(0, lo, hi)
            while i >= 0:
                port = low + i
                if port_is_free(port, self._hosts):
                    self._cursor = port + 1 if port < self.high else low
                    self.reserve(port, owner)
                    return port
                held += 1
                i = taken.find(0, i + 1, hi)
        ours = sum(taken)
        raise ResourceError(
            f"no free port in {self.range} for {owner}: {ours} allocated by shipyard, "
            f"{held} held by other processes",
            hint="widen `ports.range` in the stack file or stop something",
        )

    def claim_fixed(self, port: int, owner: str) -> None:
        """Take fixed `port` for `owner`, or raise ResourceError naming who has it."""
        current = self._owner.get(port)
        if current == owner:
            return
        if current is not None:
            raise ResourceError(f"port {port} for {owner} is already in use by {current}")
        if not port_is_free(port, self._hosts):
            holder = find_port_holder(port) or "another process"
            raise ResourceError(f"port {port} for {owner} is already in use by {holder}")
        self.reserve(port, owner)

    def release(self, owner: str) -> list[int]:
        """Give back every port of `owner`; the ports released, in order."""
        ports = self._by_owner.pop(owner, set())
        for port in ports:
            if self._owner.get(port) == owner:
                del self._owner[port]
                if self.low <= port <= self.high:
                    self._taken[port - self.low] = 0
        return sorted(ports)

    def owner_of(self, port: int) -> str | None:
        return self._owner.get(port)

    def ports_of(self, owner: str) -> list[int]:
        return sorted(self._by_owner.get(owner, ()))

    def __len__(self) -> int:
        """How many ports are reserved (inside the range or not)."""
        return len(self._owner)
