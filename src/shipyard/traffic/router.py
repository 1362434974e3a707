"""The traffic router: one stable TCP address per service, proxied to its instances.

Built on asyncio Protocols (no per-connection read loops): bytes are forwarded from
`data_received` straight to the other transport, with pause/resume for backpressure.
Backend-set changes are synchronous methods, so a swap is atomic for the event loop:
every connection accepted after `set_backends` returns goes to the new set. HTTP/1.x
keep-alive connections pinned to a removed backend move to the new set at the next
request boundary, so no request reaches the old set after a swap, and the old backend's
in-flight requests finish (drain) before its connections are closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from shipyard.traffic.balance import Backend, Balance, Selector
from shipyard.traffic.session import Session, Slot
from shipyard.traffic.stats import BackendStats, RequestStats


class Router:
    """A TCP proxy on one stable port for one service, balancing over its backends."""

    def __init__(
        self,
        listen_port: int,
        *,
        host: str = "127.0.0.1",
        service: str = "",
        balance: Balance = "round_robin",
        connect_timeout: float = 1.0,
        drain_timeout: float = 30.0,
    ) -> None:
        self.listen_port = listen_port
        self.host = host
        self.service = service
        self.connect_timeout = connect_timeout
        self.drain_timeout = drain_timeout
        self.unrouted = 0
        self._selector = Selector(balance)
        self._slots: dict[str, Slot] = {}
        self._order: list[Slot] = []
        self._weights: dict[str, int] = {}
        self._draining: set[Slot] = set()
        self._drain_tasks: set[asyncio.Task[None]] = set()
        self._sessions: set[Session] = set()
        self._stats: dict[tuple[str, str], BackendStats] = {}
        self._revisions: dict[str, RequestStats] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    # lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Listen; connections are accepted even before backends exist (and closed)."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: Session(self), self.host, self.listen_port, reuse_address=True
        )
        self.listen_port = self._server.sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        """The port actually listened on (useful with listen_port=0)."""
        return self.listen_port

    async def close(self) -> None:
        """Stop listening and drop every connection and background task."""
        if self._server is not None:
            self._server.close()
        for task in self._drain_tasks:
            task.cancel()
        for session in list(self._sessions):
            session.abort()
        tasks = [*self._drain_tasks, *(s.task for s in self._sessions if s.task)]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        for _ in range(3):  # let aborted transports run their connection_lost callbacks
            await asyncio.sleep(0)

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # backend set ------------------------------------------------------------------
    def set_backends(self, backends: Iterable[Backend]) -> None:
        """Replace the whole set at once (blue-green): removed backends are drained."""
        new: dict[str, Slot] = {}
        for b in backends:
            if b.id in new:
                raise ValueError(f"duplicate backend id {b.id!r}")
            old = self._slots.get(b.id)
            if old is not None and old.backend == b:
                new[b.id] = old
            elif old is not None and _same_target(old.backend, b):
                old.backend, old.ready = b, b.ready  # weight or readiness changed only
                new[b.id] = old
            else:
                new[b.id] = Slot(b, self._stats_for(b))
        gone = [s for i, s in self._slots.items() if new.get(i) is not s]
        self._slots = new
        self._order = list(new.values())
        self._selector.reset()
        for slot in gone:
            self._retire(slot, drain=True)

    def add_backend(self, backend: Backend) -> None:
        """Add one backend (or replace the one with the same id)."""
        self.set_backends([*(s.backend for s in self._order if s.id != backend.id), backend])

    def remove_backend(self, backend_id: str, drain: bool = True) -> None:
        """Stop sending it new connections; drain (or close) the ones it has."""
        slot = self._slots.pop(backend_id, None)
        if slot is None:
            return
        self._order = list(self._slots.values())
        self._selector.reset()
        self._retire(slot, drain=drain)

    def set_ready(self, backend_id: str, ready: bool) -> bool:
        """A backend that is not ready keeps its connections but gets no new ones.

        Returns False for an id not in the set (a probe result that arrived late).
        """
        slot = self._slots.get(backend_id)
        if slot is None:
            return False
        slot.ready = ready
        return True

    def set_weights(self, weights: Mapping[str, int] | None) -> None:
        """Split new connections between revisions in this ratio; None or {} = no split."""
        if weights and any(w < 0 for w in weights.values()):
            raise ValueError("weights must be >= 0")
        self._weights = dict(weights or {})
        self._selector.reset()

    @property
    def backends(self) -> list[Backend]:
        return [s.backend for s in self._order]

    async def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait until removed backends have no connections left; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while self._draining:
                    await asyncio.gather(*(s.drained.wait() for s in list(self._draining)))
                    self._draining = {s for s in self._draining if not s.drained.is_set()}
        except TimeoutError:
            return False
        return True

    def _retire(self, slot: Slot, *, drain: bool) -> None:
        slot.removed = True
        self._selector.forget([slot.id])
        for session in list(slot.sessions):
            if not drain:
                session.abort()
            elif session.idle_on(slot):
                session._detach()  # idle keep-alive: nothing to wait for
        if slot.active == 0:
            slot.drained.set()
            return
        self._draining.add(slot)
        task = self._loop.create_task(self._drain(slot))
        self._drain_tasks.add(task)
        task.add_done_callback(self._drain_tasks.discard)

    async def _drain(self, slot: Slot) -> None:
        try:
            await asyncio.wait_for(slot.drained.wait(), self.drain_timeout)
        except TimeoutError:
            for session in list(slot.sessions):
                session.abort()
            slot.drained.set()
        self._draining.discard(slot)

    def _pick(self, exclude: set[str]) -> Slot | None:
        return self._selector.pick(self._order, self._weights, exclude)  # type: ignore[return-value]

    # counters ---------------------------------------------------------------------
    def _stats_for(self, b: Backend) -> BackendStats:
        key = (b.id, b.revision)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = BackendStats(b.id, b.revision)
        return stats

    def _revision(self, revision: str) -> RequestStats:
        stats = self._revisions.get(revision)
        if stats is None:
            stats = self._revisions[revision] = RequestStats()
        return stats

    def backend_stats(self) -> list[BackendStats]:
        return list(self._stats.values())

    def revision_stats(self) -> dict[str, RequestStats]:
        return dict(self._revisions)

    def stats(self) -> dict[str, Any]:
        """A plain-data snapshot: per backend, per revision, and router totals."""
        current = set(self._slots)
        return {
            "service": self.service,
            "port": self.listen_port,
            "weights": dict(self._weights),
            "unrouted": self.unrouted,
            "clients": len(self._sessions),
            "backends": {
                b.backend: {
                    **b.snapshot(),
                    "in_set": b.backend in current,
                    "ready": b.backend in current and self._slots[b.backend].ready,
                }
                for b in self._stats.values()
            },
            "revisions": {rev: r.snapshot() for rev, r in self._revisions.items()},
        }


def _same_target(a: Backend, b: Backend) -> bool:
    return a.address == b.address and a.revision == b.revision
