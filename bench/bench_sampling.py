"""Benchmark: what sampling metrics for autoscaling costs, for 500 instances.

500 instances of `/bin/sleep` run under a real engine, as one service with an `autoscale:`
policy on CPU and memory. One autoscaler evaluation samples every instance (CPU % and
resident memory with psutil), decides, and records the decision. Reported: the control
plane's CPU time per evaluation (process time, so other load on the machine does not
count), what that is as a share of one core at a 15 s and a 1 s sampling interval, and the
same ratio against a bare loop that reads the same two figures for the same 500 pids with
psutil (the physical limit of this approach). Median [min-max] of --reps rounds of
--calls evaluations each.

    .venv/bin/python bench/bench_sampling.py [--instances 500] [--reps 5] [--calls 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from shipyard import Engine, EngineConfig
from shipyard.spec.models import Stack


def bare(pids: list[int], procs: dict[int, psutil.Process]) -> None:
    for pid in pids:
        proc = procs.get(pid)
        if proc is None:
            proc = procs[pid] = psutil.Process(pid)
        proc.cpu_percent(None)
        proc.memory_info()


def med(values: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    stack = Stack.model_validate({
        "name": "bench-sampling", "deploy": {"timeout": "5m"},
        "services": {"idle": {
            "command": ["/bin/sleep", "3600"], "replicas": args.instances,
            "resources": {"memory": "32Mi"}, "stop": {"timeout": "2s"},
            "autoscale": {"min": args.instances, "max": args.instances,
                          "metrics": [{"cpu": "70%"}, {"memory": "80%"}],
                          "interval": "1h"}}},  # the loop stays out of the way
        "base_dir": tempfile.gettempdir()})
    with tempfile.TemporaryDirectory() as home:
        async with Engine(EngineConfig(home=Path(home), stop_on_exit=True)) as engine:
            assert (await engine.apply(stack)).ok
            state = engine.stacks_state["bench-sampling"]
            pids = [s.record.pid for s in state.instances_of("idle") if s.record.pid]
            assert len(pids) == args.instances
            await engine.autoscaler.evaluate(state, "idle")  # primes the CPU counters
            procs: dict[int, psutil.Process] = {}
            bare(pids, procs)
            ours, base = [], []
            for _ in range(args.reps):  # alternate, so drift affects both alike
                t0 = time.process_time()
                for _ in range(args.calls):
                    await engine.autoscaler.evaluate(state, "idle")
                ours.append((time.process_time() - t0) / args.calls)
                t0 = time.process_time()
                for _ in range(args.calls):
                    bare(pids, procs)
                base.append((time.process_time() - t0) / args.calls)
            decision = engine.autoscaler.decisions[("bench-sampling", "idle")]
    ratio = [o / b for o, b in zip(ours, base, strict=True)]
    print(f"{args.instances} instances, {args.reps} rounds of {args.calls} evaluations")
    print("| | CPU ms per evaluation | % of a core at 15 s | % of a core at 1 s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| autoscaler evaluation | {med([o * 1000 for o in ours], '.1f')} | "
          f"{med([o / 15 * 100 for o in ours], '.3f')} | "
          f"{med([o * 100 for o in ours], '.2f')} | {med(ratio)} |")
    print(f"| bare psutil loop | {med([b * 1000 for b in base], '.1f')} | "
          f"{med([b / 15 * 100 for b in base], '.3f')} | "
          f"{med([b * 100 for b in base], '.2f')} | 1 |")
    print(f"last decision: {decision.reason}")


if __name__ == "__main__":
    asyncio.run(main())
