"""Benchmark of the autoscaling decision (pure code, no processes).

    python bench/bench_autoscale.py [--seed N] [--calls N] [--repeats N]

Decision latency of `plan.autoscale.decide` for 1, 5 and 20 metrics, both algorithms,
with a 5-minute history recorded every 15 s (20 past recommendations), a 1-minute up and
a 5-minute down stabilization window and step limits, so every stage runs. The baseline
is a bare function doing the same arithmetic on tuples of floats: no model, no
dataclasses, no reason text; the ratio says what the explanation and the types cost.
Both must agree on every decision. Median over repeats of the mean over `calls` calls, in
µs. Prints a markdown table, then one JSON document, to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from shipyard.plan.autoscale import MetricSample, PastRecommendation, decide
from shipyard.spec.autoscale import AutoscalePolicy

TICK = 15.0
HISTORY = 300.0  # five minutes of past recommendations
BUILTIN: list[dict[str, Any]] = [
    {"cpu": "70%"}, {"memory": "80%"}, {"requests_per_second": 100},
    {"latency_p99": "200ms"}, {"queue_length": 50},
]


def make_policy(metrics: int, algorithm: str) -> AutoscalePolicy:
    entries = BUILTIN[:metrics] + [
        {"custom": {"name": f"m{i}", "url": "http://127.0.0.1:9000/", "target": 10 + i}}
        for i in range(max(0, metrics - len(BUILTIN)))
    ]
    for i, entry in enumerate(entries):
        entry["weight"] = 1 + i % 3
    return AutoscalePolicy.model_validate({
        "min": 1, "max": 50, "algorithm": algorithm, "metrics": entries,
        "up_stabilization": "1m", "down_stabilization": "5m",
        "max_step_up": "100%", "max_step_down": 2,
    })


def baseline(
    targets: tuple[tuple[float, float], ...],  # (target, weight) per metric
    values: tuple[float, ...],
    current: int,
    history: list[tuple[float, int]],
    now: float,
    weighted: bool,
    limits: tuple[int, int, float, float, int, int],  # min, max, up, down window, steps
) -> tuple[int, int]:
    """The same arithmetic as `decide` with nothing around it: (desired, recommendation)."""
    low, high, up_window, down_window, step_up, step_down = limits
    if weighted:
        total = weights = 0.0
        for (target, weight), value in zip(targets, values, strict=True):
            total += weight * value / target
            weights += weight
        load = total / weights
        if load > 1.2:
            raw = max(current + 1, math.ceil(current * 1.5))
        elif load < 0.8:
            raw = max(0, min(current - 1, math.floor(current * 0.75)))
        else:
            raw = current
    else:
        raw = 0
        for (target, _), value in zip(targets, values, strict=True):
            ratio = value / target
            wanted = current if abs(ratio - 1.0) <= 0.1 else math.ceil(
                round(current * value / target, 9))
            raw = max(raw, wanted)
    rec = min(max(raw, low), high)
    up = down = rec
    for at, past in history:
        if at > now - up_window and past < up:
            up = past
        if at > now - down_window and past > down:
            down = past
    desired = min(max(current, up), down)
    if desired > current:
        desired = min(desired, current + max(1, math.ceil(current * step_up / 100 - 1e-9)))
    elif desired < current:
        desired = max(desired, current - step_down)
    return min(max(desired, low), high), rec


def scenarios(policy: AutoscalePolicy, rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Inputs for `count` decisions: a load level around the targets, a current count and a
    5-minute history."""
    now = 10_000.0
    out = []
    for _ in range(count):
        level = rng.choice([0.3, 0.9, 1.0, 1.1, 1.6, 3.0])
        values = tuple(m.target * level * rng.uniform(0.8, 1.2) for m in policy.metrics)
        history = [(now - HISTORY + TICK * (i + 1), rng.randint(1, 20))
                   for i in range(int(HISTORY / TICK))]
        out.append({
            "current": rng.randint(1, 20), "values": values, "history": history,
            "samples": [MetricSample(m.name, v, now) for m, v in zip(policy.metrics, values,
                                                                      strict=True)],
            "records": [PastRecommendation(at, r) for at, r in history], "now": now,
        })
    return out


def per_call_us(fn: Callable[[], None], calls: int, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    means = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter_ns() - start) / calls / 1000.0)
    return {"median_us": statistics.median(means), "min_us": min(means), "max_us": max(means)}


def bench(metrics: int, algorithm: str, seed: int, calls: int, repeats: int) -> dict[str, Any]:
    policy = make_policy(metrics, algorithm)
    cases = scenarios(policy, random.Random(seed), 64)
    targets = tuple((m.target, m.weight) for m in policy.metrics)
    step_down = policy.max_step_down.amount if policy.max_step_down else 0
    step_up = policy.max_step_up.amount if policy.max_step_up else 0
    limits = (policy.min, policy.max, policy.up_stabilization, policy.down_stabilization,
              step_up, int(step_down))
    weighted = algorithm == "weighted"
    for case in cases:  # the baseline must be the same computation
        got = decide(policy, case["current"], case["samples"], case["records"], case["now"])
        want = baseline(targets, case["values"], case["current"], case["history"],
                        case["now"], weighted, limits)
        assert (got.desired, got.recommendation) == want, (got, want)
    state = {"i": 0}

    def one_decide() -> None:
        case = cases[state["i"] & 63]
        state["i"] += 1
        decide(policy, case["current"], case["samples"], case["records"], case["now"])

    def one_baseline() -> None:
        case = cases[state["i"] & 63]
        state["i"] += 1
        baseline(targets, case["values"], case["current"], case["history"], case["now"],
                 weighted, limits)

    ours = per_call_us(one_decide, calls, repeats)
    bare = per_call_us(one_baseline, calls, repeats)
    return {"metrics": metrics, "algorithm": algorithm, "history": len(cases[0]["records"]),
            "decide": ours, "baseline": bare,
            "ratio": ours["median_us"] / bare["median_us"]}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| metrics | algorithm | decide µs (median) | min | max | bare µs | ratio |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        d, b = row["decide"], row["baseline"]
        lines.append(
            f"| {row['metrics']} | {row['algorithm']} | {d['median_us']:.1f} | "
            f"{d['min_us']:.1f} | {d['max_us']:.1f} | {b['median_us']:.1f} | "
            f"{row['ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rows = [bench(n, algorithm, args.seed, args.calls, args.repeats)
            for n in (1, 5, 20) for algorithm in ("proportional", "weighted")]
    print(markdown(rows))
    print()
    print(json.dumps({"python": sys.version.split()[0], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
