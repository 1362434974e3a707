"""Benchmark of the Kubernetes target's pure half: render and strict schema validation.

    python bench/bench_k8s.py [--reps N] [--services N] [--seed N]

For the example platform (12 services) and a generated stack (500 services by default,
random dependencies, ports, probes, resources, env, autoscaling, one-shots):
- render: `render_stack` (stack → manifest dicts), median of --reps, in ms;
- validate: strict validation of every object against the schemas of two Kubernetes
  versions (1.25, 1.37); "cold" is the first run in the process (reads and compiles the
  schemas), "warm" the median of the others;
- baseline: `yaml.safe_dump_all` of the same manifests (what writing them out costs), so
  the ratios say how render and validation compare with merely serialising the result.

Prints a markdown table, then one JSON document, to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from shipyard.k8s.render import RenderOptions, render_stack
from shipyard.k8s.validate import DEFAULT_VERSIONS, problems
from shipyard.spec.loader import load_stack, parse_stack
from shipyard.spec.models import Stack

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "platform" / "shipyard.yaml"


def generated(n: int, rng: random.Random) -> Stack:
    services: dict[str, Any] = {}
    names = [f"svc-{i:04d}" for i in range(n)]
    one_shots = set()
    for i, name in enumerate(names):
        svc: dict[str, Any] = {
            "image": f"registry.example/{name}:1.{i}", "replicas": rng.randint(1, 4),
            "restart": "always", "ports": {"http": "auto", "metrics": "auto"},
            "env": {"LOG_LEVEL": "info", "SELF_URL": "http://self:${PORT}"},
            "resources": {"cpu": f"{rng.choice([100, 250, 500])}m", "memory": "128Mi"},
            "health": {"readiness": {"http": "/ready", "port": "http", "interval": "2s"},
                       "liveness": {"tcp": "http", "interval": "10s"}},
        }
        if rng.random() < 0.2:
            svc["autoscale"] = {"min": 1, "max": 10, "metrics": [{"cpu": "70%"}]}
        if rng.random() < 0.1:
            svc["resources"]["disk"] = "1Gi"
        picks = rng.sample(range(i), min(i, rng.randint(0, 3)))
        deps = {}
        for j in picks:
            if rng.random() < 0.1:
                deps[names[j]] = "completed"
                one_shots.add(names[j])
            else:
                deps[names[j]] = "healthy"
        if deps:
            svc["depends_on"] = deps
        services[name] = svc
    for name in one_shots:
        services[name]["restart"] = "on-failure"
    return parse_stack(yaml.safe_dump({"name": "bench", "services": services}))


def timed(fn: Callable[[], Any], reps: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return times, result


def measure(label: str, stack: Stack, reps: int, cold: bool) -> dict[str, Any]:
    options = RenderOptions(default_image="python:3.11-slim")
    render_times, manifests = timed(lambda: render_stack(stack, options), reps)
    objects = manifests.objects()
    validate_times, found = timed(lambda: problems(objects, DEFAULT_VERSIONS), reps + 1)
    assert found == [], found[:3]
    dump_times, _ = timed(lambda: yaml.safe_dump_all(objects, sort_keys=False), reps)
    n = len(stack.services)
    render_ms = statistics.median(render_times)
    warm_ms = statistics.median(validate_times[1:])
    dump_ms = statistics.median(dump_times)
    return {
        "stack": label, "services": n, "objects": len(objects),
        "render_ms": round(render_ms, 2), "render_ms_per_service": round(render_ms / n, 3),
        "validate_cold_ms": round(validate_times[0], 1) if cold else None,
        "validate_warm_ms": round(warm_ms, 2),
        "validate_ms_per_service": round(warm_ms / n, 3),
        "yaml_dump_ms": round(dump_ms, 2),
        "render_vs_dump": round(render_ms / dump_ms, 2),
        "validate_vs_dump": round(warm_ms / dump_ms, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rows = [measure("examples/platform", load_stack(EXAMPLE), args.reps, cold=True),
            measure(f"generated ({args.services})", generated(args.services,
                                                              random.Random(args.seed)),
                    args.reps, cold=False)]
    versions = " + ".join(DEFAULT_VERSIONS)
    print(f"| stack | services / objects | render | per service | validate ({versions}) "
          "| per service | yaml.safe_dump_all | render ÷ dump | validate ÷ dump |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cold = f" (cold: {r['validate_cold_ms']} ms)" if r["validate_cold_ms"] else ""
        print(f"| {r['stack']} | {r['services']} / {r['objects']} | {r['render_ms']} ms "
              f"| {r['render_ms_per_service']} ms | {r['validate_warm_ms']} ms{cold} "
              f"| {r['validate_ms_per_service']} ms | {r['yaml_dump_ms']} ms "
              f"| {r['render_vs_dump']}x | {r['validate_vs_dump']}x |")
    print(json.dumps({"reps": args.reps, "seed": args.seed, "rows": rows}))


if __name__ == "__main__":
    main()
