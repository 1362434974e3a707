"""Benchmark: what the traffic router costs against a direct connection to the backend.

    .venv/bin/python bench/bench_router.py [--seconds 5] [--concurrency 1 10 100] [--json]

Three processes on 127.0.0.1: a minimal keep-alive HTTP/1.1 backend, the router in
front of it, and this load generator. For each concurrency (keep-alive connections, each
sending one request at a time) it runs the same bounded load (--seconds) straight at the
backend and through the router, and reports requests/s, p50/p99 latency, the ratios and
the latency the router adds; for reference, the same load through a naive streams-based
proxy (the design not taken). Then the blue-green swap: how long `set_backends` takes with
100 idle keep-alive clients on the old set, and how long until the old set is drained.

Note: all three processes share the machine's cores, so at high concurrency the router
competes with the load generator and the backend for CPU; figures are relative.
Prints a markdown table, then (with --json) one JSON document, to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from shipyard.traffic import Backend, Router

BODY = b"hello from the backend\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


class _BackendProtocol(asyncio.Protocol):
    """Answers every request head with the same response (no bodies are sent to it)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = buf.count(b"\r\n\r\n")
        if n:
            self.transport.write(RESPONSE * n)
            buf = buf[buf.rfind(b"\r\n\r\n") + 4 :]
        self.buf = buf


async def serve_backend() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_BackendProtocol, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


async def serve_router(backend_port: int) -> None:
    router = Router(0, service="bench")
    await router.start()
    router.set_backends([Backend("b1", "127.0.0.1", backend_port)])
    print(router.port, flush=True)
    await asyncio.Event().wait()


async def serve_streams_proxy(backend_port: int) -> None:
    """The obvious alternative design (streams, two copy loops per connection), to
    show what the Protocol-based data path buys."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


class _ClientProtocol(asyncio.Protocol):
    """One keep-alive connection: one request in flight, latency per response."""

    def __init__(self, latencies: list[float], deadline: float) -> None:
        self.latencies = latencies
        self.deadline = deadline
        self.done = asyncio.get_running_loop().create_future()
        self.pending = 0
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        self.sent_at = time.perf_counter()
        self.pending = len(RESPONSE)
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.pending -= len(data)
        if self.pending <= 0:
            now = time.perf_counter()
            self.latencies.append(now - self.sent_at)
            if now < self.deadline:
                self._send()
            elif not self.done.done():
                self.done.set_result(None)
                if self.deadline:  # deadline 0: one request, then stay open (idle)
                    self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def load(port: int, concurrency: int, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    conns = [
        (
            await loop.create_connection(
                lambda: _ClientProtocol(latencies, deadline), "127.0.0.1", port
            )
        )[1]
        for _ in range(concurrency)
    ]
    await asyncio.gather(*(c.done for c in conns))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "requests": len(latencies),
    }


def spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


async def swap_time(backend_port: int, clients: int = 100, repeat: int = 20) -> dict[str, Any]:
    """set_backends with `clients` idle keep-alive connections on the outgoing set."""
    router = Router(0, service="bench")
    await router.start()
    loop = asyncio.get_running_loop()
    swaps, drains = [], []
    try:
        blue = [Backend(f"blue{i}", "127.0.0.1", backend_port, "blue") for i in range(10)]
        green = [Backend(f"green{i}", "127.0.0.1", backend_port, "green") for i in range(10)]
        for n in range(repeat):
            old, new = (blue, green) if n % 2 == 0 else (green, blue)
            router.set_backends(old)
            await router.wait_drained()
            lat: list[float] = []
            conns = [
                (
                    await loop.create_connection(
                        lambda lat=lat: _ClientProtocol(lat, 0.0), "127.0.0.1", router.port
                    )
                )[1]
                for _ in range(clients)
            ]
            await asyncio.gather(*(c.done for c in conns))  # one request each, now idle
            t0 = time.perf_counter()
            router.set_backends(new)
            swaps.append(time.perf_counter() - t0)
            await router.wait_drained()
            drains.append(time.perf_counter() - t0)
            assert router.stats()["clients"] == clients  # clients kept, moved at next request
            for c in conns:
                c.transport.close()
    finally:
        await router.close()
    return {
        "clients": clients,
        "backends": 10,
        "set_backends_ms": statistics.median(swaps) * 1e3,
        "until_drained_ms": statistics.median(drains) * 1e3,
    }


async def bench(seconds: float, levels: list[int]) -> dict[str, Any]:
    backend, backend_port = spawn("--serve-backend")
    router, router_port = spawn("--serve-router", str(backend_port))
    streams, streams_port = spawn("--serve-streams-proxy", str(backend_port))
    rows = []
    try:
        await load(router_port, 1, 0.5)  # warm-up
        for c in levels:
            direct = await load(backend_port, c, seconds)
            routed = await load(router_port, c, seconds)
            naive = await load(streams_port, c, seconds)
            rows.append(
                {
                    "concurrency": c,
                    "direct": direct,
                    "router": routed,
                    "streams_proxy": naive,
                    "throughput_ratio": routed["rps"] / direct["rps"],
                    "p50_ratio": routed["p50_ms"] / direct["p50_ms"],
                    "p99_ratio": routed["p99_ms"] / direct["p99_ms"],
                    "added_p50_ms": routed["p50_ms"] - direct["p50_ms"],
                    "added_p99_ms": routed["p99_ms"] - direct["p99_ms"],
                }
            )
        swap = await swap_time(backend_port)
    finally:
        for proc in (streams, router, backend):
            proc.terminate()
            proc.wait(5)
    return {"python": sys.version.split()[0], "cpus": os.cpu_count(), "rows": rows, "swap": swap}


def table(report: dict[str, Any]) -> str:
    out = [
        "| conns | direct req/s | router req/s | ratio | direct p50/p99 ms "
        "| router p50/p99 ms | added p50/p99 ms | streams-proxy req/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        d, t = r["direct"], r["router"]
        out.append(
            f"| {r['concurrency']} | {d['rps']:,.0f} | {t['rps']:,.0f} "
            f"| {r['throughput_ratio']:.2f} | {d['p50_ms']:.3f} / {d['p99_ms']:.3f} "
            f"| {t['p50_ms']:.3f} / {t['p99_ms']:.3f} "
            f"| {r['added_p50_ms']:.3f} / {r['added_p99_ms']:.3f} "
            f"| {r['streams_proxy']['rps']:,.0f} |"
        )
    s = report["swap"]
    out.append(
        f"\nswap ({s['backends']} -> {s['backends']} backends, {s['clients']} idle keep-alive "
        f"clients): set_backends {s['set_backends_ms']:.3f} ms, "
        f"drained {s['until_drained_ms']:.3f} ms"
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-backend", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-router", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-streams-proxy", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        asyncio.run(serve_backend())
    elif args.serve_router:
        asyncio.run(serve_router(args.serve_router))
    elif args.serve_streams_proxy:
        asyncio.run(serve_streams_proxy(args.serve_streams_proxy))
    else:
        report = asyncio.run(bench(args.seconds, args.concurrency))
        print(table(report))
        if args.json:
            print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
