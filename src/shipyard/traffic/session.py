"""One proxied client connection: the data path between a client and a backend.

Protocols rather than streams: bytes go from `data_received` straight to the other
transport's `write`, and pause/resume callbacks carry backpressure both ways.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from shipyard.traffic.balance import Backend
from shipyard.traffic.http import HttpParseError, HttpTracker, looks_like_http
from shipyard.traffic.stats import BackendStats

if TYPE_CHECKING:
    from shipyard.traffic.router import Router


class Slot:
    """A backend in the router's set, with its live counters."""

    __slots__ = ("active", "backend", "drained", "ready", "removed", "sessions", "stats")

    def __init__(self, backend: Backend, stats: BackendStats) -> None:
        self.backend = backend
        self.ready = backend.ready
        self.active = 0  # this slot's own connections (stats may outlive a re-added id)
        self.removed = False
        self.stats = stats
        self.sessions: set[Session] = set()
        self.drained = asyncio.Event()

    @property
    def id(self) -> str:
        return self.backend.id

    @property
    def revision(self) -> str:
        return self.backend.revision

    @property
    def weight(self) -> int:
        return self.backend.weight

    def acquire(self) -> None:
        self.active += 1
        self.stats.active += 1

    def release(self) -> None:
        self.active -= 1
        self.stats.active -= 1
        if self.removed and self.active == 0:
            self.drained.set()


class _Upstream(asyncio.Protocol):
    """The router's connection to a backend; forwards everything to its session."""

    __slots__ = ("released", "session", "slot", "transport")

    def __init__(self, session: Session, slot: Slot) -> None:
        self.session = session
        self.slot = slot
        self.transport: asyncio.Transport | None = None
        self.released = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.session.from_upstream(self, data)

    def eof_received(self) -> bool:
        return False  # the backend is done sending: close, and let the client side finish

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.upstream_lost(self)

    def pause_writing(self) -> None:
        if self.session.up is self:
            self.session.client.pause_reading()

    def resume_writing(self) -> None:
        if self.session.up is self:
            self.session.client.resume_reading()


class Session(asyncio.Protocol):
    """One client connection and the backend connection serving it right now."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.client: asyncio.Transport = None  # type: ignore[assignment]
        self.up: _Upstream | None = None
        self.tracker: HttpTracker | None = None
        self.first = True
        self.closed = False
        self.client_eof = False
        self.buffered: list[bytes] = []
        self.task: asyncio.Task[None] | None = None

    # client side ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport  # type: ignore[assignment]
        self.router._sessions.add(self)
        transport.pause_reading()  # type: ignore[attr-defined]
        self._attach()

    def data_received(self, data: bytes) -> None:
        if self.first:
            self.first = False
            if looks_like_http(data):
                self.tracker = HttpTracker(self._record)
        tracker, up = self.tracker, self.up
        if tracker is not None and tracker.idle and self.task is None:
            if up is not None and up.slot.removed:
                self._detach()
                up = None
            if up is None:  # between requests with no backend: take a fresh one
                self.buffered.append(data)
                self.client.pause_reading()
                self._attach()
                return
        if up is None:
            self.buffered.append(data)
            return
        self._forward(up, data)

    def eof_received(self) -> bool:
        self.client_eof = True
        up = self.up
        if up is not None and self.idle_on(up.slot):
            self._detach()  # between requests: the backend owes this client nothing
            return False
        if up is not None and self.task is None:
            if up.transport.can_write_eof():  # type: ignore[union-attr]
                up.transport.write_eof()  # type: ignore[union-attr]
            return True
        return self.task is not None  # mid-attach: flush first; idle and detached: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.router._sessions.discard(self)
        if self.task is not None:
            self.task.cancel()
        if self.up is not None:
            self._detach()

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.transport.resume_reading()  # type: ignore[union-attr]

    # data path --------------------------------------------------------------------
    def _forward(self, up: _Upstream, data: bytes) -> None:
        up.slot.stats.bytes_in += len(data)
        tracker = self.tracker
        if tracker is not None:
            try:
                tracker.client_data(data, self.router._loop.time())
            except HttpParseError:
                self.tracker = None
        up.transport.write(data)  # type: ignore[union-attr]

    def from_upstream(self, up: _Upstream, data: bytes) -> None:
        if up is not self.up:
            return
        self.first = False  # the server spoke first: not HTTP
        up.slot.stats.bytes_out += len(data)
        self.client.write(data)
        tracker = self.tracker
        if tracker is not None:
            try:
                tracker.upstream_data(data, self.router._loop.time())
            except HttpParseError:
                self.tracker = None
                return
            if up.slot.removed and tracker.idle:
                self._detach()  # drained: the next request goes to the current set
                if self.client_eof:
                    self.client.close()

    def upstream_lost(self, up: _Upstream) -> None:
        self._release(up)
        if up is not self.up:
            return
        if self.tracker is not None:
            self.tracker.upstream_closed(self.router._loop.time())
        self.up = None
        self.client.close()  # flushes what the backend sent, then closes

    def _record(self, status: int, seconds: float) -> None:
        up = self.up
        if up is not None:
            up.slot.stats.http.record(status, seconds)
            self.router._revision(up.slot.revision).record(status, seconds)

    # backends ---------------------------------------------------------------------
    def _attach(self) -> None:
        self.task = self.router._loop.create_task(self._connect())

    async def _connect(self) -> None:
        router = self.router
        tried: set[str] = set()
        while True:
            slot = router._pick(tried)
            if slot is None:
                router.unrouted += 1
                self.task = None
                self.client.close()
                return
            tried.add(slot.id)
            slot.acquire()  # counts for least_conn while connecting
            up = _Upstream(self, slot)
            try:
                await asyncio.wait_for(
                    router._loop.create_connection(lambda up=up: up, *slot.backend.address),
                    router.connect_timeout,
                )
            except (OSError, TimeoutError):
                slot.release()
                slot.stats.connect_failures += 1
                continue
            except asyncio.CancelledError:
                up.released = True
                slot.release()
                if up.transport is not None:
                    up.transport.abort()
                raise
            slot.stats.total += 1
            slot.sessions.add(self)
            if slot.removed or self.closed:  # swapped out (or client gone) while connecting
                self._release(up)
                up.transport.close()  # type: ignore[union-attr]
                if self.closed:
                    return
                # not the backend's fault: a backend re-added under the same id (its
                # revision relabelled, say) is a new slot and may be picked
                tried.discard(slot.id)
                continue
            break
        self.up, self.task = up, None
        buffered, self.buffered = self.buffered, []
        for data in buffered:
            self._forward(up, data)
        if self.client_eof and up.transport.can_write_eof():  # type: ignore[union-attr]
            up.transport.write_eof()  # type: ignore[union-attr]
        self.client.resume_reading()

    def _detach(self) -> None:
        up, self.up = self.up, None
        if up is not None:
            self._release(up)
            if up.transport is not None:
                up.transport.close()

    def _release(self, up: _Upstream) -> None:
        if up.released:
            return
        up.released = True
        up.slot.sessions.discard(self)
        up.slot.release()

    def idle_on(self, slot: Slot) -> bool:
        """HTTP between requests on `slot`: it can move without anyone noticing."""
        tracker, up = self.tracker, self.up
        return tracker is not None and tracker.idle and up is not None and up.slot is slot

    def abort(self) -> None:
        """Close both sides now (drain timeout, router closing)."""
        if self.task is not None:
            self.task.cancel()
        if self.up is not None and self.up.transport is not None:
            self.up.transport.abort()
        self.client.abort()
