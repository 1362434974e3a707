"""Benchmark: placing 10,000 instances on 100 nodes (plan/placement.py, pure).

100 nodes of 8-64 cores and 16-256 GiB in 3 zones; 500 services of 20 replicas with
random CPU and memory requests, a third constrained to a zone, preferred anti-affinity.
Reported: the time of `place()` and, as the baseline, the same best-fit (every node
scanned, the fullest feasible one taken) as a bare loop over lists doing only the CPU and
memory arithmetic (no labels, ports, disk, GPUs, anti-affinity or reasons), in the same
run. Median [min-max] of --reps.

    .venv/bin/python bench/bench_placement.py [--reps 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from shipyard.plan.placement import NodeInfo, Request, place

GI = 2**30


def cluster(seed: int) -> tuple[list[NodeInfo], list[Request]]:
    rng = random.Random(seed)
    nodes = [NodeInfo(f"node{i:03d}", cpu=rng.choice([8, 16, 32, 64]),
                      memory=rng.choice([16, 32, 64, 128, 256]) * GI,
                      labels={"zone": f"z{i % 3}"}, overcommit={"cpu": 1.5, "memory": 1.2})
             for i in range(100)]
    requests = []
    for s in range(500):
        cpu = rng.choice([0.1, 0.25, 0.5])
        memory = rng.choice([64, 128, 256, 512, 1024]) * 2**20
        zone = {"zone": f"z{s % 3}"} if s % 3 == 0 else {}
        requests += [Request(f"s{s}-{r}", f"s{s}", cpu=cpu, memory=memory, constraints=zone)
                     for r in range(20)]
    return nodes, requests


def bare(nodes: list[NodeInfo], requests: list[Request]) -> int:
    limits = [(n.cpu * 1.5, n.memory * 1.2) for n in nodes]
    used = [[0.0, 0.0] for _ in nodes]
    placed = 0
    for r in sorted(requests, key=lambda r: (-r.cpu, -r.memory)):
        best, best_full = -1, -1.0
        for i, ((cpu, mem), u) in enumerate(zip(limits, used, strict=True)):
            if u[0] + r.cpu <= cpu and u[1] + r.memory <= mem:
                full = max((u[0] + r.cpu) / cpu, (u[1] + r.memory) / mem)
                if full > best_full:
                    best, best_full = i, full
        if best >= 0:
            used[best][0] += r.cpu
            used[best][1] += r.memory
            placed += 1
    return placed


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ours, base, placed = [], [], 0
    for rep in range(args.reps):
        nodes, requests = cluster(rep)
        t0 = time.perf_counter()
        result = place(requests, nodes)
        ours.append(time.perf_counter() - t0)
        placed = len(result.placed)
        t0 = time.perf_counter()
        bare(nodes, requests)
        base.append(time.perf_counter() - t0)
    ratio = [o / b for o, b in zip(ours, base, strict=True)]
    if args.json:
        print(json.dumps({"place_s": ours, "bare_s": base, "ratio": ratio}))
        return
    print(f"10,000 instances on 100 nodes ({placed} placed in the last run)")
    print(f"place(): {med(ours)} s; bare best-fit: {med(base)} s; ratio {med(ratio)}")


if __name__ == "__main__":
    main()
