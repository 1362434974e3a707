"""The API of a highly available control plane (engine/leadership.py): who leads, and
requests that only the leader can answer, forwarded to it.

On a standby, the reads that the store answers (stacks, instances, events, operations)
are served locally; so are the routes of the home itself (whoami, tokens, audit) and
`GET /v1/leader`. Every other `/v1` route — every write, and the reads that need the
leader's memory or files (deploy results, revisions, logs, top) — is checked against the
caller's role *here* (the same `allow(...)` the route declares) and then forwarded to the
leader over its unix socket, recorded in the election (same machine), with its method,
path, query and body; the answer, streamed or not, comes back as the leader gave it. The
leader sees the standby's uid, the server's own user: it trusts the standby's check. A
forwarded request is never forwarded again (`X-Shipyard-Forwarded`), so two standbys with
stale views cannot bounce it between them. When the leader does not answer (it died, its
lease has not expired yet), the standby waits for the next leader — up to twice the lease
TTL — and sends the request there, or handles it itself if it has become the leader.

Cross-host forwarding would need the leader's TCP listener and a credential for the
server; it is not done (see docs/ha.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from shipyard.errors import Busy, ShipyardError
from shipyard.security.permissions import allow, authorize_request, permission_of

if TYPE_CHECKING:
    from shipyard.api.server import Listeners
    from shipyard.engine.config import EngineConfig
    from shipyard.engine.leadership import Leadership
    from shipyard.security.guard import Security

log = logging.getLogger("shipyard.api")

FORWARDED = "x-shipyard-forwarded"
# served by a standby from the store (or from its own home)
LOCAL = frozenset({
    ("GET", "/v1/stacks"), ("GET", "/v1/stacks/{name}"), ("GET", "/v1/instances"),
    ("GET", "/v1/events"), ("GET", "/v1/events/latest"), ("GET", "/v1/operations"),
    ("GET", "/v1/operations/{op_id}"), ("GET", "/v1/leader"),
})
HOME_ROUTES = ("/v1/whoami", "/v1/tokens", "/v1/audit")
_PASS_HEADERS = ("content-type", "accept", "x-request-id")
_BACK_HEADERS = ("content-type", "retry-after")


class NoLeader(Busy):
    """No control plane leads right now (an election is under way): retry shortly."""


class Forwarded(Exception):  # not an error: carries the leader's answer
    """Raised by `leader_gate` to answer with what the leader answered."""

    def __init__(self, response: Response) -> None:
        super().__init__("forwarded to the leader")
        self.response = response


def needs_leader(method: str, path: str) -> bool:
    """Whether a standby forwards this route to the leader."""
    if not path.startswith("/v1/") or (method, path) in LOCAL:
        return False
    return not path.startswith(HOME_ROUTES)


def leadership_of(app: FastAPI) -> Leadership | None:
    return getattr(app.state, "leadership", None)


async def leader_gate(request: Request) -> None:
    """The app-wide dependency: on a standby, answer a leader-only route by forwarding
    it (raises `Forwarded`); anywhere else, do nothing."""
    leadership = leadership_of(request.app)
    if leadership is None:
        return
    route = request.scope.get("route")
    if not needs_leader(request.method, getattr(route, "path", "")):
        return
    if leadership.leading and await leadership.wait_ready(leadership.ttl * 2):
        return
    permission = permission_of(route)
    if permission is not None:  # the caller's rights, checked before anything is sent
        await authorize_request(request, permission)
    response = await _forward(request, leadership)
    if response is not None:
        raise Forwarded(response)


class Forwarder:
    """HTTP clients to the leaders' unix sockets, one per address."""

    def __init__(self) -> None:
        self._clients: dict[str, httpx.AsyncClient] = {}

    def client(self, address: str) -> httpx.AsyncClient:
        client = self._clients.get(address)
        if client is None:
            client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=address), base_url="http://shipyard",
                timeout=httpx.Timeout(30.0, connect=5.0, read=None))
            self._clients[address] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()


async def _forward(request: Request, leadership: Leadership) -> Response | None:
    """The leader's answer to `request`; None when this server has become the leader
    meanwhile (the route then runs here)."""
    if request.headers.get(FORWARDED):
        raise NoLeader(f"{leadership.member} does not lead; a request forwarded to it by "
                       f"{request.headers[FORWARDED]} is not forwarded again",
                       hint="retry in a few seconds")
    forwarder: Forwarder = request.app.state.forwarder
    body = await request.body()
    deadline = time.monotonic() + leadership.ttl * 2 + 1
    dead: str | None = None  # an address that did not accept the connection
    while True:
        if leadership.leading:
            return None if await leadership.wait_ready(leadership.ttl * 2) else _no_leader(
                leadership)
        leader = leadership.leader
        address = leader.address if leader is not None else None
        if address is None or address in (dead, leadership.address):
            if time.monotonic() >= deadline:
                raise _no_leader(leadership)
            await asyncio.sleep(0.05)  # an election is under way
            continue
        try:
            return await _send(forwarder.client(address), request, body, leadership)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent
            log.info("the leader at %s does not answer (%s); waiting for the next", address,
                     exc)
            dead = address


async def _send(client: httpx.AsyncClient, request: Request, body: bytes,
                leadership: Leadership) -> Response:
    headers = {k: v for k, v in request.headers.items() if k in _PASS_HEADERS}
    headers[FORWARDED] = leadership.member
    url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    outgoing = client.build_request(request.method, url, content=body, headers=headers)
    answer = await client.send(outgoing, stream=True)
    back = {k: v for k, v in answer.headers.items() if k in _BACK_HEADERS}
    return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code,
                             headers=back, background=BackgroundTask(answer.aclose))


def _no_leader(leadership: Leadership) -> NoLeader:
    return NoLeader(f"no control plane leads right now ({leadership.member} is a standby)",
                    hint=f"a leader is elected within the lease TTL ({leadership.ttl}s); "
                         "retry shortly")


def status_of(app: FastAPI) -> dict[str, Any]:
    """This server's role, for `/healthz`: "single" without high availability."""
    leadership = leadership_of(app)
    if leadership is None:
        return {"role": "single"}
    leader = leadership.leader
    return {"role": leadership.role(), "leader": leader.address if leader else None}


def install(app: FastAPI) -> None:
    """`GET /v1/leader`, and the answer of a forwarded request."""
    router = APIRouter(prefix="/v1", tags=["meta"])

    @router.get("/leader", dependencies=[allow("system", "read")])
    async def leader(request: Request) -> dict[str, Any]:
        """Who leads the control planes of this store, and this server's role: leader,
        taking-over (elected, recovering) or standby; "single" without high availability
        (then this server is the leader)."""
        leadership = leadership_of(request.app)
        if leadership is None:
            return {"role": "single", "leader": None}
        return leadership.status()

    async def forwarded(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Forwarded)
        return exc.response

    app.include_router(router)
    app.add_exception_handler(Forwarded, forwarded)


def ha_enabled(config: EngineConfig, ha: bool | None) -> bool:
    """High availability is on by default with an etcd store."""
    if ha is None:
        return config.store_url.startswith("etcd://")
    return ha


async def serve_ha(config: EngineConfig, listeners: Listeners, *, stop: asyncio.Event,
                   on_ready: Callable[[Listeners], None] | None, security: Security,
                   ttl: int) -> None:
    """Run the engine under the leader election and serve its API (api/server.py)."""
    from shipyard.api.server import serve
    from shipyard.engine.leadership import Leadership

    if not config.store_url.startswith("etcd://"):
        raise ShipyardError("high availability needs an etcd store",
                            hint="run the servers with --store etcd://host:2379,... "
                                 "(or SHIPYARD_STORE)")
    leadership = Leadership(config, ttl=ttl)
    forwarder = Forwarder()

    def configure(app: FastAPI) -> None:
        app.state.leadership = leadership
        app.state.forwarder = forwarder

        def swap(engine: Any) -> None:
            app.state.api.engine = engine

        leadership.on_engine = swap

    try:
        engine = await leadership.start()
        await serve(engine, listeners=listeners, stop=stop, on_ready=on_ready,
                    handle_signals=False, security=security, configure=configure)
    finally:
        await leadership.close()
        await forwarder.aclose()

