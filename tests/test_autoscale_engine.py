"""Autoscaling end to end: real processes, real CPU load through the real router; the
manual count and its suspension survive a restart of the engine."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shipyard import Engine, EngineConfig
from shipyard.engine.sampling import json_path, number_of
from shipyard.spec.models import Stack
from tests.conftest import port_range
from tests.loadgen import Load
from tests.test_engine import svc
from tests.test_rollout import free_port


def stack_of(tmp_path: Path, autoscale: dict[str, Any] | None, *extra: str,
             replicas: int = 1, expose: int | None = None) -> Stack:
    api = svc(*extra, replicas=replicas)
    if expose:
        api["expose"] = expose
    if autoscale:
        api["autoscale"] = autoscale
    return Stack.model_validate({"name": "as", "ports": {"range": port_range()},
                                 "deploy": {"timeout": "30s"}, "services": {"api": api},
                                 "base_dir": str(tmp_path)})


async def counts(engine: Engine) -> int:
    return len([i for i in await engine.instances("as", "api") if i.state.alive])


def test_json_path_and_numbers() -> None:
    doc = {"queues": [{"depth": 7}], "odd key": {"n": "2.5"}}
    assert json_path(doc, "$.queues[0].depth") == 7
    assert json_path(doc, "$['odd key'].n") == "2.5"
    assert number_of('{"a": {"b": 3}}', "$.a.b") == 3.0 and number_of(" 42\n", None) == 42.0
    with pytest.raises(ValueError):
        number_of("true", "$")


async def test_cpu_bound_service_scales_up_under_load_and_back_down(tmp_path: Path) -> None:
    port = free_port()
    policy = {"min": 1, "max": 3, "metrics": [{"cpu": "40%"}], "interval": "300ms",
              "up_stabilization": "0s", "down_stabilization": "2s"}
    async with Engine(EngineConfig(home=tmp_path / "home", stop_on_exit=True)) as engine:
        assert (await engine.apply(stack_of(tmp_path, policy, "--work", "0.02",
                                            expose=port))).ok
        async with Load(port, workers=3, pause=0.0, timeout=10) as load:
            for _ in range(200):
                if await counts(engine) >= 2:
                    break
                await asyncio.sleep(0.1)
            grown = await counts(engine)
            await load.settle(20)
        assert grown >= 2, engine.autoscaler.decisions
        assert load.failures == [], load.failures[:5]
        events = [e for e in await engine.store.list_events(stack="as")
                  if e.kind == "autoscale.decision"]
        assert events and "cpu" in events[0].message and "vs target 40%" in events[0].message
        assert events[0].data["inputs"][0]["name"] == "cpu"
        for _ in range(200):  # no load: back to min after the down window
            if await counts(engine) == 1:
                break
            await asyncio.sleep(0.1)
        assert await counts(engine) == 1
        top = await engine.top("as")
        assert top["api"]["autoscale"]["min"] == 1 and top["api"]["instances"]


async def test_manual_scale_suspends_autoscaling_across_restarts(tmp_path: Path) -> None:
    policy = {"min": 1, "max": 4, "metrics": [{"cpu": "50%"}], "interval": "200ms",
              "down_stabilization": "0s"}
    home = tmp_path / "home"
    async with Engine(EngineConfig(home=home, stop_on_exit=False)) as engine:
        assert (await engine.apply(stack_of(tmp_path, policy))).ok
        result = await engine.scale("as", "api", 3)
        assert result["added"] == 2
        await asyncio.sleep(1.0)  # idle: autoscaling would go to 1, but it is suspended
        assert await counts(engine) == 3
        # applying the file again keeps the manual count (the file says 1)
        assert (await engine.apply(stack_of(tmp_path, policy))).ok
        assert await counts(engine) == 3
    async with Engine(EngineConfig(home=home, stop_on_exit=True)) as engine:
        assert ("as", "api") in engine.autoscaler.suspended
        await asyncio.sleep(0.6)
        assert await counts(engine) == 3
        await engine.resume_autoscale("as", "api")
        for _ in range(100):
            if await counts(engine) == 1:
                break
            await asyncio.sleep(0.1)
        assert await counts(engine) == 1
        kinds = [e.kind for e in await engine.store.list_events(stack="as")]
        assert "autoscale.resumed" in kinds and "autoscale.decision" in kinds


async def test_custom_metric_from_http_drives_the_count(tmp_path: Path) -> None:
    """The queue endpoint is a tiny HTTP server of the test's own (a real socket), standing
    in for an application's metrics endpoint."""
    depth = {"value": 100}

    class Queue(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"queue": {"pending": depth["value"]}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Queue)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    policy = {"min": 1, "max": 5, "interval": "200ms", "down_stabilization": "0s",
              "metrics": [{"custom": {"name": "pending", "url": url,
                                      "json_path": "$.queue.pending", "target": 40}}]}
    try:
        async with Engine(EngineConfig(home=tmp_path / "home", stop_on_exit=True)) as eng:
            assert (await eng.apply(stack_of(tmp_path, policy))).ok
            for _ in range(100):  # 100 pending / 40 per instance → 3
                if await counts(eng) == 3:
                    break
                await asyncio.sleep(0.1)
            assert await counts(eng) == 3
            depth["value"] = 10
            for _ in range(100):
                if await counts(eng) == 1:
                    break
                await asyncio.sleep(0.1)
            assert await counts(eng) == 1
    finally:
        server.shutdown()


async def test_prometheus_query_drives_the_count(tmp_path: Path) -> None:
    """No Prometheus server can be installed for the tests, so a small HTTP server of the
    test's own answers `/api/v1/query` the way Prometheus's HTTP API does (an emulator);
    the sampler's request and its reading of the answer are real."""
    queries: list[str] = []
    value = {"now": "90"}

    class Prom(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            from urllib.parse import parse_qs, urlparse

            url = urlparse(self.path)
            queries.append(parse_qs(url.query)["query"][0])
            body = json.dumps({"status": "success", "data": {
                "resultType": "vector",
                "result": [{"metric": {}, "value": [1700000000.0, value["now"]]}]}}).encode()
            self.send_response(200 if url.path == "/api/v1/query" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Prom)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    query = 'sum(rate(http_requests_total{job="api"}[1m]))'
    policy = {"min": 1, "max": 4, "interval": "200ms", "down_stabilization": "0s",
              "metrics": [{"prometheus": {"query": query, "target": 30, "name": "rps"}}]}
    config = EngineConfig(home=tmp_path / "home", stop_on_exit=True,
                          prometheus_url=f"http://127.0.0.1:{server.server_address[1]}")
    try:
        async with Engine(config) as eng:
            assert (await eng.apply(stack_of(tmp_path, policy))).ok
            for _ in range(100):  # 90 over 1 instance vs 30 per instance → 3
                if await counts(eng) == 3:
                    break
                await asyncio.sleep(0.1)
            assert await counts(eng) == 3
            assert queries and queries[0] == query
            decision = next(e for e in await eng.store.list_events(stack="as")
                        if e.kind == "autoscale.decision")
            assert "rps 90 vs target 30" in decision.message, decision.message
    finally:
        server.shutdown()
