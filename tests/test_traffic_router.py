"""The router with real sockets on 127.0.0.1, in front of small real HTTP backends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from shipyard.traffic import Backend, Router, RouterCollector


class HttpBackend:
    """A tiny keep-alive HTTP/1.1 server that answers with its own name.

    `/status/NNN` answers NNN, `?ms=N` waits N ms first, `/chunked` answers chunked.
    Each request's arrival (loop time) is recorded, for "who served what, when".
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.arrivals: list[float] = []
        self.handlers: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> HttpBackend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def backend(self, revision: str = "r1", **kw: object) -> Backend:
        return Backend(self.name, "127.0.0.1", self.port, revision=revision, **kw)  # type: ignore[arg-type]

    @property
    def open_connections(self) -> int:
        return len(self.handlers)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.arrivals.append(asyncio.get_running_loop().time())
                line, *headers = head.decode().split("\r\n")
                method, target, _ = line.split(" ")
                length = 0
                for h in headers:
                    if h.lower().startswith("content-length:"):
                        length = int(h.split(":")[1])
                if length:
                    await reader.readexactly(length)
                url = urlsplit(target)
                ms = int(parse_qs(url.query).get("ms", ["0"])[0])
                if ms:
                    await asyncio.sleep(ms / 1000)
                status = int(url.path.split("/")[2]) if url.path.startswith("/status/") else 200
                body = self.name.encode()
                if url.path == "/chunked":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                    )
                else:
                    writer.write(
                        b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, len(body))
                        + (b"" if method == "HEAD" else body)
                    )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the helper ends quietly, even when stopped mid-request
        finally:
            self.handlers.discard(task)
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


class Client:
    """A keep-alive HTTP/1.1 client over one connection, reading Content-Length/chunked."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str = "/", close: bool = False) -> tuple[int, str]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        conn = b"Connection: close\r\n" if close else b""
        self.writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path.encode(), conn))
        result = await self.read_response()
        if close:
            await self.aclose()
        return result

    async def read_response(self) -> tuple[int, str]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        if any(h.lower() == "transfer-encoding: chunked" for h in lines):
            body = b""
            while size := int((await self.reader.readline()).strip(), 16):
                body += await self.reader.readexactly(size + 2)
            await self.reader.readline()
            return status, body[:-2].decode()
        length = next(int(h.split(":")[1]) for h in lines if h.lower().startswith("content-len"))
        return status, (await self.reader.readexactly(length)).decode()

    async def aclose(self) -> None:
        if self.writer is not None:
            writer, self.reader, self.writer = self.writer, None, None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def one(port: int, path: str = "/") -> str:
    """A request on a connection of its own: which backend answered."""
    client = Client(port)
    try:
        status, body = await client.get(path, close=True)
    finally:
        await client.aclose()
    assert status == 200
    return body


@pytest.fixture
async def backends() -> AsyncIterator[list[HttpBackend]]:
    started = [await HttpBackend(name).start() for name in ("a", "b", "c", "d")]
    yield started
    for b in started:
        await b.stop()


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    r = Router(0, service="api")
    await r.start()
    yield r
    await r.close()


async def test_round_robin_spreads_connections_evenly(router, backends) -> None:
    router.set_backends([b.backend() for b in backends[:3]])
    served = Counter([await one(router.port) for _ in range(30)])
    assert served == {"a": 10, "b": 10, "c": 10}


async def test_least_conn_avoids_the_busy_backend(backends) -> None:
    async with Router(0, balance="least_conn") as router:
        router.set_backends([b.backend() for b in backends[:2]])
        slow = asyncio.create_task(one(router.port, "/?ms=500"))
        await asyncio.sleep(0.1)  # the slow request holds one backend
        quick = []
        for _ in range(6):
            quick.append(await one(router.port))
            await asyncio.sleep(0.01)  # the router sees the client's close
        busy = await slow
        assert busy not in quick and len(set(quick)) == 1


async def test_not_ready_backend_gets_no_new_connections(router, backends) -> None:
    router.set_backends([b.backend() for b in backends[:2]])
    router.set_ready("a", False)
    assert {await one(router.port) for _ in range(6)} == {"b"}
    router.set_ready("a", True)
    assert {await one(router.port) for _ in range(6)} == {"a", "b"}
    assert router.set_ready("gone", False) is False  # a late probe result is harmless


async def test_refused_connect_is_retried_on_another_backend(router, backends) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    router.set_backends(
        [
            Backend("dead1", "127.0.0.1", dead),
            backends[0].backend(),
            Backend("dead2", "127.0.0.1", dead),
        ]
    )
    assert [await one(router.port) for _ in range(20)] == ["a"] * 20
    stats = router.stats()["backends"]
    assert stats["dead1"]["connect_failures"] + stats["dead2"]["connect_failures"] >= 13
    assert router.unrouted == 0


async def test_no_backend_closes_the_client(router) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    assert await reader.read() == b""
    writer.close()
    assert router.unrouted == 1


async def test_swap_under_load_loses_nothing_and_old_set_gets_nothing_after(router, backends):
    blue, green = backends[:2], backends[2:]
    router.set_backends([b.backend("blue") for b in blue])
    loop = asyncio.get_running_loop()
    swapped_at: list[float] = []
    results: list[tuple[float, int, str]] = []

    async def client() -> None:
        c = Client(router.port)
        for _ in range(200):
            sent = loop.time()
            status, body = await c.get("/")
            results.append((sent, status, body))
        await c.aclose()

    async def swap() -> None:
        while len(results) < 400:
            await asyncio.sleep(0.001)
        router.set_backends([b.backend("green") for b in green])
        swapped_at.append(loop.time())

    await asyncio.gather(*(client() for _ in range(5)), swap())
    assert len(results) == 1000 and all(status == 200 for _, status, _ in results)
    after = [body for sent, _, body in results if sent > swapped_at[0]]
    assert len(after) > 300 and set(after) <= {"c", "d"}
    assert await router.wait_drained(timeout=2)
    assert all(b.open_connections == 0 for b in blue)
    # (requests sent a moment before the swap may reach green too)
    assert router.stats()["revisions"]["green"]["requests"] >= len(after)


async def test_removed_backend_finishes_its_long_request(router, backends) -> None:
    router.set_backends([backends[0].backend()])
    long = asyncio.create_task(one(router.port, "/?ms=600"))
    await asyncio.sleep(0.1)
    router.set_backends([backends[1].backend()])
    assert await one(router.port) == "b"  # new traffic goes to the new set at once
    assert await long == "a"  # while the old one finishes
    assert await router.wait_drained(timeout=2)
    assert router.stats()["backends"]["a"]["active"] == 0


async def test_backend_re_added_while_draining_drains_its_old_connection(router, backends):
    router.set_backends([backends[0].backend()])
    long = asyncio.create_task(one(router.port, "/?ms=400"))
    await asyncio.sleep(0.1)
    router.remove_backend("a")
    router.add_backend(backends[0].backend())  # same instance back (e.g. ready again)
    assert await one(router.port) == "a"
    assert await router.wait_drained(timeout=2)
    assert await long == "a"
    assert router.stats()["backends"]["a"]["active"] == 0


async def test_drain_timeout_closes_what_does_not_finish(backends) -> None:
    async with Router(0, drain_timeout=0.2) as router:
        router.set_backends([backends[0].backend()])
        long = asyncio.create_task(one(router.port, "/?ms=5000"))
        await asyncio.sleep(0.1)
        router.remove_backend("a")
        with pytest.raises(asyncio.IncompleteReadError):
            await asyncio.wait_for(long, 2)
        assert await router.wait_drained(timeout=1)


async def test_weights_split_new_connections(router, backends) -> None:
    router.set_backends([backends[0].backend("stable"), backends[1].backend("canary")])
    router.set_weights({"stable": 90, "canary": 10})
    served = [await one(router.port) for _ in range(1000)]
    counts = Counter(served)
    assert abs(counts["b"] - 100) <= 10  # smooth weighting makes it exact in practice
    # ... and spread out, not bunched: every window of 100 has its ~10.
    assert all(5 <= served[i : i + 100].count("b") <= 15 for i in range(0, 900, 100))


async def test_http_stats_and_metrics(router, backends) -> None:
    router.set_backends([backends[0].backend("r7")])
    c = Client(router.port)
    for path in ["/", "/", "/status/404", "/status/503", "/status/302", "/chunked"]:
        await c.get(path)
    await c.aclose()
    await asyncio.sleep(0.05)
    stats = router.stats()
    rev = stats["revisions"]["r7"]
    assert rev["codes"] == {"1xx": 0, "2xx": 3, "3xx": 1, "4xx": 1, "5xx": 1}
    assert rev["latency"]["count"] == 6 and rev["latency"]["p99"] > 0
    a = stats["backends"]["a"]
    assert a["total"] == 1 and a["active"] == 0 and a["http"]["requests"] == 6
    assert a["bytes_in"] > 6 * 16 and a["bytes_out"] > 6 * 20

    registry = CollectorRegistry()
    registry.register(RouterCollector(lambda: [router]))
    text = generate_latest(registry).decode()
    assert 'shipyard_router_connections_total{backend="a",revision="r7",service="api"} 1.0' in text
    assert 'shipyard_router_requests_total{code="5xx",revision="r7",service="api"} 1.0' in text
    assert 'shipyard_router_request_duration_seconds_count{revision="r7",service="api"} 6.0' in text
    assert 'shipyard_router_bytes_total{backend="a",direction="out"' in text


async def test_pipelined_requests_keep_their_order(router, backends) -> None:
    router.set_backends([backends[0].backend()])
    c = Client(router.port)
    c.reader, c.writer = await asyncio.open_connection("127.0.0.1", router.port)
    c.writer.write(
        b"GET /?ms=50 HTTP/1.1\r\n\r\nGET /status/404 HTTP/1.1\r\n\r\n"
        b"HEAD / HTTP/1.1\r\n\r\nGET /chunked HTTP/1.1\r\n\r\n"
    )
    assert await c.read_response() == (200, "a")
    assert await c.read_response() == (404, "a")
    assert (await c.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")  # HEAD: no body
    assert await c.read_response() == (200, "a")
    await c.aclose()
    assert router.stats()["revisions"]["r1"]["requests"] == 4


async def test_plain_tcp_is_proxied_and_counted(router) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    router.set_backends([Backend("echo", "127.0.0.1", server.sockets[0].getsockname()[1])])
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(b"\x00\x01binary")
    assert await reader.read() == b"\x00\x01binary"
    writer.close()
    server.close()
    await asyncio.sleep(0.05)
    echo_stats = router.stats()["backends"]["echo"]
    assert echo_stats["bytes_in"] == echo_stats["bytes_out"] == 8
    assert echo_stats["http"]["requests"] == 0


async def test_close_leaves_no_task_or_socket(backends) -> None:
    router = Router(0)
    await router.start()
    router.set_backends([backends[0].backend()])
    idle = Client(router.port)
    await idle.get("/")  # an idle keep-alive connection
    busy = asyncio.create_task(one(router.port, "/?ms=2000"))
    router.set_backends([backends[1].backend()])  # "a" is draining now
    await asyncio.sleep(0.1)
    before = asyncio.all_tasks()
    await router.close()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await busy
    await asyncio.sleep(0.05)
    left = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert not [t for t in asyncio.all_tasks() if "traffic" in repr(t.get_coro())]
    assert not left
    upstream = {b.port for b in backends}
    mine = psutil.Process().net_connections(kind="tcp")
    assert not [c for c in mine if c.laddr.port == router.port]  # listener, accepted
    assert not [c for c in mine if c.raddr and c.raddr.port in upstream]  # to backends
    await idle.aclose()
