"""Benchmark: how long rollouts of 10 replicas take against the start-up times of the
instances they start, with real processes behind the real router.

For each strategy, a stack of 10 replicas (tests/fixtures/svc.py, ready 0.3 s after it
starts, readiness probe every 20 ms) is deployed, then changed; the rollout's duration
(the deploy result's) is divided by the sum of the start-up times of the new instances
(each one's `instance.started` → `instance.ready`, from the event log of the same run).
A rollout that starts one instance at a time cannot beat 1.0; one that starts them all at
once approaches 1/10. For blue-green, also the time from the last new instance's ready
to the swap of the router.

Python children come from the interpreter running this script (the project's venv, ~10 ms
to start; the machine's base python3 takes ~100 ms).

    .venv/bin/python bench/bench_rollout.py [--reps 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from shipyard import Engine, EngineConfig
from shipyard.spec.models import Stack

SVC = str(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "svc.py")
PY = sys.executable
REPLICAS = 10
# name: (update policy, behind a router)
STRATEGIES: dict[str, tuple[dict[str, Any], bool]] = {
    "rolling, max_surge 1": ({"max_surge": 1, "max_unavailable": 0}, True),
    "rolling, max_surge 25%": ({"max_surge": "25%", "max_unavailable": 0}, True),
    "rolling in place (no router), max_unavailable 1": ({"max_unavailable": 1}, False),
    "blue-green": ({"strategy": "blue-green", "keep_previous": "0s"}, True),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stack(version: str, update: dict[str, Any], expose: int | None) -> Stack:
    api: dict[str, Any] = {
        "command": [PY, SVC, "--port", "${PORT}", "--ready-after", "0.3",
                    "--version", version],
        "ports": {"http": "auto"}, "replicas": REPLICAS, "update": update,
        "health": {"readiness": {"http": "/ready", "interval": "20ms", "timeout": "1s",
                                 "failure_threshold": 1}},
        "stop": {"timeout": "2s"},
    }
    if expose is not None:
        api["expose"] = expose
    return Stack.model_validate({"name": "bench-rollout", "ports": {"range": "24000-24999"},
                                 "deploy": {"timeout": "5m"}, "services": {"api": api},
                                 "base_dir": tempfile.gettempdir()})


async def one(update: dict[str, Any], routed: bool) -> dict[str, float]:
    expose = free_port() if routed else None
    with tempfile.TemporaryDirectory() as home:
        async with Engine(EngineConfig(home=Path(home), stop_on_exit=True)) as engine:
            assert (await engine.apply(stack("v1", update, expose))).ok
            after = await engine.store.last_event_seq()
            result = await engine.apply(stack("v2", update, expose))
            assert result.ok, result
            events = [e for e in await engine.store.list_events(stack="bench-rollout")
                      if (e.seq or 0) > after]
    started = {e.instance: e.ts for e in events if e.kind == "instance.started"}
    ready = {e.instance: e.ts for e in events if e.kind == "instance.ready"}
    startups = [ready[i] - started[i] for i in started if i in ready]
    assert len(startups) == REPLICAS, (len(startups), sorted(started))
    out = {"duration_s": result.duration, "sum_startup_s": sum(startups),
           "ratio": result.duration / sum(startups)}
    swapped = [e.ts for e in events if e.kind == "rollout.swapped"]
    if swapped:
        out["ready_to_swap_ms"] = (swapped[0] - max(ready.values())) * 1000
    return out


def med(values: list[float], digits: int = 2) -> str:
    return (f"{statistics.median(values):.{digits}f} "
            f"[{min(values):.{digits}f}-{max(values):.{digits}f}]")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in STRATEGIES}
    for _ in range(args.reps):  # alternate strategies, so drift affects all alike
        for name, (update, routed) in STRATEGIES.items():
            results[name].append(await one(update, routed))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"| rollout of {REPLICAS} replicas | duration s | sum of start-ups s | ratio | "
          "ready → swap ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        swap = [r["ready_to_swap_ms"] for r in runs if "ready_to_swap_ms" in r]
        print(f"| {name} | {med([r['duration_s'] for r in runs])} | "
              f"{med([r['sum_startup_s'] for r in runs])} | "
              f"{med([r['ratio'] for r in runs])} | {med(swap, 1) if swap else '-'} |")


if __name__ == "__main__":
    asyncio.run(main())
