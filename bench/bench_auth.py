"""Benchmark: what authentication costs per request.

    python bench/bench_auth.py [--requests N] [--cold N]

A real control plane (`shipyard server --listen 127.0.0.1:PORT`, in its own process, TLS
from `shipyard tls init`) answers `GET /healthz` — the cheapest route, so that what is
measured is the authentication path and not the route — over one kept-alive connection:

- the baseline: the same app on a unix socket, served without the peer-credentials
  protocol, so that no request is authenticated (a second process);
- the unix socket as shipped: SO_PEERCRED identifies the local user;
- TCP + TLS 1.3 with a bearer token, verified once (Argon2id) then from the cache;
- TCP + TLS 1.3 with a client certificate (mutual TLS);
- the first request of each of `--cold` new tokens: the slow hash itself.

Prints p50 / p99 per request (client-side, microseconds) and the ratio to the baseline as
a markdown table, then one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import httpx

SHIPYARD = [sys.executable, "-m", "shipyard.cli.main"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_us": statistics.median(ordered) * 1e6,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
            "n": len(ordered)}


def timed(client: httpx.Client, n: int, warmup: int = 100) -> dict[str, float]:
    for _ in range(warmup):
        client.get("/healthz").raise_for_status()
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        response = client.get("/healthz")
        samples.append(clock() - start)
        response.raise_for_status()
    return percentiles(samples)


def serve_baseline(home: Path, sock: Path) -> None:
    """The app on a unix socket with uvicorn's own protocol: no connection is described to
    it, so the app (built for in-process use) authenticates nobody."""
    import uvicorn

    from shipyard import Engine, EngineConfig
    from shipyard.api.app import create_app
    from shipyard.security.guard import Security

    async def main() -> None:
        async with Engine(EngineConfig(home=home)) as engine:
            app = create_app(engine, Security.for_home(home, trust_in_process=True))
            config = uvicorn.Config(app, uds=str(sock), log_level="warning",
                                    access_log=False, lifespan="off")
            await uvicorn.Server(config).serve()

    asyncio.run(main())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from shipyard.security.tls import client_context

    work = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    home, base_home = work / "home", work / "base"
    env = os.environ | {"SHIPYARD_HOME": str(home)}
    subprocess.run([*SHIPYARD, "tls", "init"], env=env, check=True, capture_output=True)
    subprocess.run([*SHIPYARD, "tls", "client", "bench", "--role", "viewer", "--out",
                    str(work)], env=env, check=True, capture_output=True)
    port = free_port()
    procs = [subprocess.Popen([*SHIPYARD, "server", "--listen", f"127.0.0.1:{port}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, __file__, "--baseline-server", str(base_home)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    results: dict[str, dict[str, float]] = {}
    try:
        sock, base_sock = home / "shipyard.sock", base_home / "base.sock"
        unix = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                            base_url="http://shipyard")
        base = httpx.Client(transport=httpx.HTTPTransport(uds=str(base_sock)),
                            base_url="http://shipyard")
        wait_until(lambda: unix.get("/healthz").status_code == 200, "the server")
        wait_until(lambda: base.get("/healthz").status_code == 200, "the baseline server")

        def new_token() -> str:
            made = unix.post("/v1/tokens", json={"role": "viewer", "ttl": "1h"})
            made.raise_for_status()
            token: str = made.json()["token"]
            return token

        ca = home / "tls" / "ca.crt"
        url = f"https://127.0.0.1:{port}"
        warm = new_token()
        token = httpx.Client(base_url=url, verify=client_context(ca),
                             headers={"authorization": f"Bearer {warm}"})
        cert = httpx.Client(base_url=url, verify=client_context(
            ca, cert=work / "bench.crt", key=work / "bench.key"))
        try:
            # interleaved rounds, so that a noisy moment hits every case alike
            rounds: dict[str, list[dict[str, float]]] = {k: [] for k in (
                "baseline", "unix", "token", "cert")}
            per_round = max(1, args.requests // args.rounds)
            for _ in range(args.rounds):
                for name, client in (("baseline", base), ("unix", unix), ("token", token),
                                     ("cert", cert)):
                    rounds[name].append(timed(client, per_round))
            for name, found in rounds.items():
                results[name] = {key: statistics.median(r[key] for r in found)
                                 for key in ("p50_us", "p99_us")} | {
                    "n": sum(r["n"] for r in found)}
            cold = []
            for _ in range(args.cold):
                fresh = new_token()
                with httpx.Client(base_url=url, verify=client_context(ca)) as once:
                    once.get("/healthz",  # connect (TLS handshake) with a cached token
                             headers={"authorization": f"Bearer {warm}"}).raise_for_status()
                    start = time.perf_counter()
                    once.get("/healthz",
                             headers={"authorization": f"Bearer {fresh}"}).raise_for_status()
                    cold.append(time.perf_counter() - start)
            results["token_cold"] = percentiles(cold)
        finally:
            for client in (unix, base, token, cert):
                client.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    base_p50, base_p99 = results["baseline"]["p50_us"], results["baseline"]["p99_us"]
    for row in results.values():
        row["ratio_p50"] = row["p50_us"] / base_p50
        row["ratio_p99"] = row["p99_us"] / base_p99
    return {"requests": args.requests, "rounds": args.rounds, "cold": args.cold,
            "results": results}


LABELS = {
    "baseline": "unix socket, no authentication (baseline)",
    "unix": "unix socket, peer credentials (default)",
    "token": "TCP + TLS, bearer token (verified, then cached)",
    "cert": "TCP + TLS, client certificate",
    "token_cold": "TCP + TLS, a token's first request (Argon2id)",
}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| GET /healthz, one kept-alive connection | p50 | p99 | p50 ÷ baseline | "
             "p99 ÷ baseline |", "| --- | --- | --- | --- | --- |"]
    for key, label in LABELS.items():
        row = report["results"][key]
        lines.append(f"| {label} | {row['p50_us']:,.0f} µs | {row['p99_us']:,.0f} µs | "
                     f"{row['ratio_p50']:.2f}\u00d7 | {row['ratio_p99']:.2f}\u00d7 |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000,
                        help="requests per case (in --rounds interleaved rounds)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cold", type=int, default=20, help="fresh tokens, one request each")
    parser.add_argument("--baseline-server", metavar="HOME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        home = Path(args.baseline_server)
        home.mkdir(parents=True, exist_ok=True)
        serve_baseline(home, home / "base.sock")
        return
    report = run(args)
    print(markdown(report))
    print()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
