"""Benchmark: port and resource allocation, and the cost of health probes.

    .venv/bin/python bench/bench_resources.py [--ops 10000] [--probes 2000]

(a) Port allocation (PortAllocator.allocate, with a host check by bind) and resource
    allocation (ResourceLedger.allocate), p50/p99 over --ops operations, against a bare
    socket bind+close as the baseline. References to beat: ~100 us and ~500 us.
(b) Probes: http and tcp probes per second against a local asyncio server running in a
    separate process (so the CPU time measured here is the prober's alone), with a bare
    asyncio.open_connection as the baseline, and httpx / asyncio streams as the
    alternatives the design rejected. CPU % for 500 instances probed every 2 s is
    estimated from the CPU time per probe.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

from shipyard.errors import ResourceError
from shipyard.health.monitor import ProbeMonitor
from shipyard.health.probes import ProbeResult, run_probe
from shipyard.resources.capacity import HostCapacity, ResourceLedger, check_fit
from shipyard.resources.ports import PortAllocator
from shipyard.spec.models import Probe, Stack

SERVER = r"""
import asyncio, sys

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if b"close" in head.lower():
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[int], object], n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        start = clock()
        fn(i)
        out.append((clock() - start) / 1000)  # us
    return out


def line(name: str, samples: list[float], base: float | None = None) -> str:
    p50, p99 = pct(samples, 0.5), pct(samples, 0.99)
    ratio = f"  x{p50 / base:5.2f} of baseline" if base else ""
    return f"  {name:<34} p50 {p50:8.1f} us   p99 {p99:8.1f} us{ratio}"


def bench_allocation(ops: int) -> None:
    print(f"(a) allocation, {ops} operations")

    def bare(i: int) -> None:
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 20000 + i % 1000))
        except OSError:
            pass
        finally:
            sock.close()

    base = timed(bare, ops)
    base50 = pct(base, 0.5)
    print(line("bare socket bind+close (baseline)", base))

    ports = PortAllocator(30000, 32767)
    keep = 100  # instances alive at a time; the oldest is released as a new one comes

    def allocate(i: int) -> None:
        ports.allocate(f"demo/api-{i}")

    samples = []
    clock = time.perf_counter_ns
    for i in range(ops):
        if i >= keep:
            ports.release(f"demo/api-{i - keep}")
        start = clock()
        allocate(i)
        samples.append((clock() - start) / 1000)
    print(line("PortAllocator.allocate", samples, base50))
    busy = PortAllocator(30000, 32767)
    for p in range(30000, 32000):
        busy.reserve(p, "other")

    def allocate_busy(i: int) -> None:
        busy._cursor = 30000  # worst case: scan past all 2000 reserved ports
        busy.allocate(f"x{i}")
        busy.release(f"x{i}")

    print(line("  ... scanning 2000 reserved ports", timed(allocate_busy, min(ops, 2000)),
               base50))

    ledger = ResourceLedger(HostCapacity(cpu=10_000, memory=2**50, disk=2**50, gpu=10_000))
    keep = 1000
    samples = []
    for i in range(ops):
        if i >= keep:
            ledger.release(f"api-{i - keep}")
        start = clock()
        ledger.allocate(f"api-{i}", cpu=0.5, memory=256 * 2**20, disk=2**30, gpu=0)
        samples.append((clock() - start) / 1000)
    print(line("ResourceLedger.allocate", samples, base50))
    full = ResourceLedger(HostCapacity(cpu=1, memory=2**30, disk=0, gpu=0))
    full.allocate("hog", cpu=1)

    def refused(i: int) -> None:
        with contextlib.suppress(ResourceError):
            full.allocate(f"x{i}", cpu=0.5)

    print(line("  ... refused (message built)", timed(refused, min(ops, 2000)), base50))
    stack = Stack.model_validate({"name": "big", "services": {
        f"svc{i}": {"command": ["true"], "replicas": 2,
                    "resources": {"cpu": "100m", "memory": "64Mi"}} for i in range(250)}})
    host = HostCapacity(cpu=64, memory=2**40, disk=2**40, gpu=0)
    print(line("check_fit (250 services x 2)", timed(lambda i: check_fit(stack, host), 200)))


async def measure(name: str, fn: Callable[[], Awaitable[object]], n: int,
                  base_cpu: float | None = None) -> float:
    for _ in range(50):
        await fn()  # warm up
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await fn()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    per = cpu / n * 1e6
    ratio = f"  x{per / base_cpu:5.2f} of baseline" if base_cpu else ""
    share = per * 1e-6 * 250 * 100  # 500 instances every 2 s = 250 probes/s
    print(f"  {name:<30} {n / wall:8.0f}/s sequential   CPU {per:6.1f} us/probe"
          f"   500 inst @2s: {share:5.2f}% of a core{ratio}")
    return per


async def concurrent(name: str, fn: Callable[[], Awaitable[object]], n: int) -> None:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n // 500):
        await asyncio.gather(*(fn() for _ in range(500)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"  {name:<30} {n / wall:8.0f}/s in bursts of 500 (CPU {cpu / n * 1e6:6.1f} us/probe)")


async def bench_probes(n: int) -> None:
    import httpx

    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        ports = {"http": port}
        print(f"(b) probes against an asyncio server in another process, {n} each")

        async def bare() -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()

        http_probe, tcp_probe = Probe(http="/ready"), Probe(tcp="http")

        async def shipyard_http() -> None:
            result = await run_probe(http_probe, ports)
            assert result.ok, result.message

        async def shipyard_tcp() -> None:
            assert (await run_probe(tcp_probe, ports)).ok

        request = (f"GET /ready HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   "Connection: close\r\n\r\n").encode()

        async def streams_http() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await reader.readuntil(b"\r\n\r\n")
            await reader.read()
            writer.close()
            await writer.wait_closed()

        base = await measure("bare open_connection (baseline)", bare, n)
        await measure("shipyard tcp probe", shipyard_tcp, n, base)
        await measure("shipyard http probe", shipyard_http, n, base)
        await measure("asyncio-streams http client", streams_http, n, base)
        async with httpx.AsyncClient() as shared:
            url = f"http://127.0.0.1:{port}/ready"

            async def httpx_keepalive() -> None:
                (await shared.get(url)).raise_for_status()

            async def httpx_close() -> None:
                (await shared.get(url, headers={"Connection": "close"})).raise_for_status()

            await measure("httpx shared client, keep-alive", httpx_keepalive, n, base)
            await measure("httpx shared client, close", httpx_close, n, base)
        await concurrent("shipyard http probe", shipyard_http, max(n, 500))
    finally:
        server.kill()
        server.wait()


async def bench_monitors(seconds: float) -> None:
    """500 ProbeMonitors with an http probe every 2 s, as in a 500-instance stack; the CPU
    this process uses over `seconds` is the real cost of the health layer."""
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        results: list[ProbeResult] = []

        async def on_change(passing: bool, result: ProbeResult) -> None:
            pass

        probe = Probe(http="/ready", interval=2)
        monitors = [ProbeMonitor(probe, {"http": port}, on_change, on_result=results.append)
                    for _ in range(500)]
        for i, monitor in enumerate(monitors):  # instances start spread over the interval
            monitor.start()
            if i % 50 == 49:
                await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        results.clear()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await asyncio.gather(*(m.stop() for m in monitors))
        ok = sum(r.ok for r in results)
        lat = [r.latency * 1e6 for r in results]
        print(f"(c) 500 ProbeMonitors, http every 2 s, measured over {wall:.1f} s: "
              f"{len(results) / wall:.0f} probes/s ({ok} ok of {len(results)}), "
              f"CPU {cpu / wall * 100:.2f}% of a core, latency p50 {pct(lat, 0.5):.0f} us "
              f"p99 {pct(lat, 0.99):.0f} us")
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--monitor-seconds", type=float, default=10.0,
                        help="run 500 real ProbeMonitors (every 2 s) this long; 0 to skip")
    args = parser.parse_args()
    bench_allocation(args.ops)
    asyncio.run(bench_probes(args.probes))
    if args.monitor_seconds > 0:
        asyncio.run(bench_monitors(args.monitor_seconds))


if __name__ == "__main__":
    main()
