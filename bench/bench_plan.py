"""Benchmark of the plan layer (pure code, no processes).

    python bench/bench_plan.py [--seed N] [--reps-1k N] [--reps-10k N]

(c) planning a random DAG of 1,000 and 10,000 services: graph build with cycle check,
    phases, remaining_chain and a full hybrid scheduler run where every service settles at
    once; median/min/max over repetitions, in ms. When networkx is importable, the same
    graph through a bare `networkx.topological_generations` gives a baseline ratio.
(d-sim) the simulated hybrid makespan of a random 50-service DAG with known durations,
    divided by its critical path: 1.00 means no time lost to ordering or slots.

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from shipyard.plan.graph import DependencyGraph
from shipyard.plan.schedule import DeployScheduler, Milestone, simulate
from shipyard.spec.models import Condition, Strategy

try:
    import networkx
except ImportError:  # the ratio is optional
    networkx = None

Edges = dict[str, dict[str, Condition]]


def random_dag(n: int, rng: random.Random, max_deps: int = 3) -> Edges:
    """`n` services, each depending on 0..max_deps random earlier ones; names shuffled so
    that name order says nothing about dependency order."""
    names = [f"svc-{i:05d}" for i in range(n)]
    rng.shuffle(names)
    conditions = [Condition.HEALTHY, Condition.HEALTHY, Condition.COMPLETED, Condition.STARTED]
    edges: Edges = {}
    for i, name in enumerate(names):
        picks = rng.sample(range(i), min(i, rng.randint(0, max_deps)))
        edges[name] = {names[j]: rng.choice(conditions) for j in picks}
    return edges


def plan_once(edges: Edges) -> int:
    """Everything `shipyard up` computes before and while it deploys, minus the I/O."""
    graph = DependencyGraph(edges)
    graph.phases()
    graph.remaining_chain()
    sched = DeployScheduler(graph, Strategy.HYBRID, 10)
    launched = 0
    while not sched.done:
        for name in sched.next_to_start():
            sched.mark_launched(name)
            sched.mark(name, Milestone.COMPLETED)
            launched += 1
    return launched


def networkx_once(edges: Edges) -> int:
    graph = networkx.DiGraph()
    graph.add_nodes_from(edges)
    graph.add_edges_from((dep, name) for name, deps in edges.items() for dep in deps)
    return len(list(networkx.topological_generations(graph)))


def timed(fn: Callable[[], Any], reps: int) -> dict[str, float]:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples),
            "max_ms": max(samples), "reps": reps}


def bench_planning(n: int, reps: int, seed: int) -> dict[str, Any]:
    edges = random_dag(n, random.Random(seed))
    graph = DependencyGraph(edges)
    assert plan_once(edges) == n
    out: dict[str, Any] = {
        "services": n,
        "edges": sum(len(d) for d in edges.values()),
        "phases": len(graph.phases()),
        "width": max(len(level) for level in graph.phases()),
        "plan": timed(lambda: plan_once(edges), reps),
        "parts": {
            "graph_build": timed(lambda: DependencyGraph(edges), reps)["median_ms"],
            "phases": timed(graph.phases, reps)["median_ms"],
            "remaining_chain": timed(graph.remaining_chain, reps)["median_ms"],
            "scheduler_run": timed(lambda: _schedule_only(graph), reps)["median_ms"],
        },
    }
    if networkx is not None:
        out["networkx_generations"] = timed(lambda: networkx_once(edges), reps)
        out["ratio_vs_networkx"] = (
            out["plan"]["median_ms"] / out["networkx_generations"]["median_ms"]
        )
    return out


def _schedule_only(graph: DependencyGraph) -> None:
    sched = DeployScheduler(graph, Strategy.HYBRID, 10)
    while not sched.done:
        for name in sched.next_to_start():
            sched.mark_launched(name)
            sched.mark(name, Milestone.COMPLETED)


def bench_makespan(seed: int, n: int = 50) -> dict[str, Any]:
    rng = random.Random(seed)
    names = [f"svc-{i:02d}" for i in range(n)]
    rng.shuffle(names)
    edges: Edges = {}
    for i, name in enumerate(names):  # `started` waits would beat the critical path: none
        picks = rng.sample(range(i), min(i, rng.randint(0, 3)))
        edges[name] = {names[j]: Condition.HEALTHY for j in picks}
    graph = DependencyGraph(edges)
    durations = {name: float(rng.randint(1, 10)) for name in names}
    critical, path = graph.longest_chain(durations)
    width = max(len(level) for level in graph.phases())
    out: dict[str, Any] = {
        "services": n, "width": width, "critical_path_s": critical,
        "critical_path_services": len(path), "sum_s": sum(durations.values()), "runs": {},
    }
    for strategy in Strategy:
        for slots in (n, 10):
            makespan = simulate(graph, strategy, slots, durations)
            out["runs"][f"{strategy.value}/max_parallel={slots}"] = {
                "makespan_s": makespan, "ratio_to_critical_path": makespan / critical,
            }
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = ["| benchmark | median ms | min ms | max ms | reps | vs networkx |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["planning"]:
        p = row["plan"]
        ratio = f"{row['ratio_vs_networkx']:.2f}x" if "ratio_vs_networkx" in row else "n/a"
        lines.append(
            f"| plan {row['services']:,} services ({row['edges']:,} edges, "
            f"{row['phases']} phases) | {p['median_ms']:.2f} | {p['min_ms']:.2f} | "
            f"{p['max_ms']:.2f} | {p['reps']} | {ratio} |"
        )
        if "networkx_generations" in row:
            nx = row["networkx_generations"]
            lines.append(
                f"| networkx topological_generations, {row['services']:,} | "
                f"{nx['median_ms']:.2f} | {nx['min_ms']:.2f} | {nx['max_ms']:.2f} | "
                f"{nx['reps']} | 1.00x |"
            )
    lines += ["", "| plan part (median ms) | " + " | ".join(
        f"{row['services']:,}" for row in report["planning"]) + " |",
        "| --- |" + " ---: |" * len(report["planning"])]
    for part in report["planning"][0]["parts"]:
        lines.append(f"| {part} | " + " | ".join(
            f"{row['parts'][part]:.2f}" for row in report["planning"]) + " |")
    sim = report["makespan"]
    lines += ["", f"Simulated deploy of {sim['services']} services (width {sim['width']}, "
              f"critical path {sim['critical_path_s']:g}s over "
              f"{sim['critical_path_services']} services, sum {sim['sum_s']:g}s):", "",
              "| strategy | makespan s | / critical path |", "| --- | ---: | ---: |"]
    for name, run in sim["runs"].items():
        lines.append(f"| {name} | {run['makespan_s']:g} | {run['ratio_to_critical_path']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--reps-1k", type=int, default=30)
    parser.add_argument("--reps-10k", type=int, default=9)
    args = parser.parse_args()
    report = {
        "python": sys.version.split()[0],
        "networkx": getattr(networkx, "__version__", None),
        "planning": [bench_planning(1_000, args.reps_1k, args.seed),
                     bench_planning(10_000, args.reps_10k, args.seed)],
        "makespan": bench_makespan(args.seed),
    }
    print(markdown(report))
    print()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
