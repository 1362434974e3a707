"""Engine-level deploy benchmarks, with real processes:

(d) deploy makespan of a 50-service random DAG whose services take known start-up times
    (each becomes ready `t` seconds after it starts), divided by the critical-path lower
    bound (the longest chain of start-up times). Aim: <= 1.10.
(e) `Engine.apply` of 100 instances to running (no readiness probe: ready = running),
    durable state included, as a ratio to a bare asyncio loop spawning the same 100
    processes in the same run.

Python children come from the interpreter running this script (the project's venv), which
starts in ~10 ms; the machine's base python3 starts in ~100 ms.

    .venv/bin/python bench/bench_deploy.py [--reps 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shipyard import Engine, EngineConfig
from shipyard.plan.graph import DependencyGraph
from shipyard.spec.models import Stack

SVC = str(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "svc.py")
PY = sys.executable


def random_dag(n: int, seed: int, max_deps: int = 3) -> dict[str, list[str]]:
    rng = random.Random(seed)
    names = [f"s{i:02d}" for i in range(n)]
    deps: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        k = rng.randint(0, min(max_deps, i))
        window = names[max(0, i - 12):i]  # recent services: chains grow long, as in real stacks
        deps[name] = sorted(rng.sample(window, min(k, len(window))))
    return deps


def makespan_stack(deps: dict[str, list[str]], times: dict[str, float], port_low: int) -> Stack:
    services: dict[str, Any] = {}
    for name, ds in deps.items():
        services[name] = {
            "command": [PY, SVC, "--port", "${PORT}", "--ready-after", str(times[name])],
            "ports": {"http": "auto"},
            "depends_on": {d: "healthy" for d in ds},
            "health": {"readiness": {"http": "/ready", "interval": "20ms", "timeout": "1s",
                                     "failure_threshold": 1}},
            "stop": {"timeout": "2s"},
        }
    return Stack.model_validate({
        "name": "bench-dag", "ports": {"range": f"{port_low}-{port_low + 999}"},
        "deploy": {"strategy": "hybrid", "max_parallel": 50, "timeout": "5m"},
        "services": services, "base_dir": tempfile.gettempdir()})


async def bench_makespan(reps: int) -> dict[str, Any]:
    ratios, spans, bounds = [], [], []
    for rep in range(reps):
        deps = random_dag(50, seed=rep)
        rng = random.Random(100 + rep)
        times = {name: round(rng.uniform(0.5, 1.5), 2) for name in deps}
        graph = DependencyGraph({n: dict.fromkeys(ds, "healthy") for n, ds in deps.items()})
        bound, _ = graph.longest_chain(times)
        with tempfile.TemporaryDirectory() as home:
            async with Engine(EngineConfig(home=Path(home), stop_on_exit=True)) as engine:
                result = await engine.apply(makespan_stack(deps, times, 43000))
                assert result.ok, result
        spans.append(result.duration)
        bounds.append(bound)
        ratios.append(result.duration / bound)
    return {"makespan_s": spans, "critical_path_s": bounds, "ratio": ratios}


async def bare_spawn(argv: list[str], n: int) -> float:
    t0 = time.perf_counter()
    procs = [await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL) for _ in range(n)]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.kill()
    await asyncio.gather(*(p.wait() for p in procs))
    return elapsed


async def engine_spawn(argv: list[str], n: int) -> float:
    stack = Stack.model_validate({
        "name": "bench-spawn", "services": {"svc": {"command": argv, "replicas": n,
                                                     "stop": {"timeout": "2s"}}},
        "base_dir": tempfile.gettempdir()})
    with tempfile.TemporaryDirectory() as home:
        async with Engine(EngineConfig(home=Path(home), stop_on_exit=True)) as engine:
            t0 = time.perf_counter()
            result = await engine.apply(stack)
            elapsed = time.perf_counter() - t0
            assert result.ok, result
    return elapsed


async def bench_spawn(reps: int, n: int = 100) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, argv in (("/bin/sleep", ["/bin/sleep", "60"]),
                        ("venv python", [PY, "-c", "import time; time.sleep(60)"])):
        bare, eng = [], []
        for _ in range(reps):  # alternate, so drift affects both alike
            bare.append(await bare_spawn(argv, n))
            eng.append(await engine_spawn(argv, n))
        out[label] = {"bare_s": bare, "engine_s": eng,
                      "ratio": [e / b for e, b in zip(eng, bare, strict=True)]}
    return out


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    makespan = await bench_makespan(args.reps)
    spawn = await bench_spawn(args.reps)
    if args.json:
        print(json.dumps({"makespan": makespan, "spawn": spawn}, indent=2))
        return
    print("(d) 50-service DAG, hybrid, start-up times 0.5-1.5 s, readiness probe every 20 ms")
    print(f"    makespan s: {med(makespan['makespan_s'])}")
    print(f"    critical path s: {med(makespan['critical_path_s'])}")
    print(f"    makespan / critical path: {med(makespan['ratio'])}")
    print("(e) 100 instances to running: Engine.apply vs bare asyncio spawn (same run)")
    for label, row in spawn.items():
        print(f"    {label}: engine s {med(row['engine_s'])}, bare s {med(row['bare_s'])}, "
              f"ratio {med(row['ratio'])}")


if __name__ == "__main__":
    asyncio.run(main())
