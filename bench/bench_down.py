"""Benchmark: `engine.down()` of N idle instances (issue 7's graceful stop), measured in
the engine process: wall time, the CPU time it spent (user, system), the SQLite
statements and commits it made, and its RSS with the N instances idle before the down.

Children: `/bin/sleep 3600` (`--kind sleep`), the same with a 64 MiB memory limit
(`--kind memlimit`: a memory cgroup too, on cgroup v1), or the interpreter running this
script with a SIGTERM handler (`--kind python`). Each repetition is a fresh engine (its
own home), applied, left idle one second, then brought down. The baseline, alternated with
it in the same run: the same N children started by `subprocess.Popen`, then SIGTERM to
each and `waitpid` of each (what stopping costs with no bookkeeping at all).

    .venv/bin/python bench/bench_down.py [--n 100] [--kind sleep] [--reps 7]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard import Engine, EngineConfig
from shipyard.spec.models import Stack

PYTHON_CHILD = ("import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
                "time.sleep(3600)\n")


@dataclass
class Sample:
    wall: float  # seconds
    user: float
    system: float
    statements: int
    commits: int
    rss: float  # MiB, before the down


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _service(n: int, kind: str) -> dict[str, Any]:
    argv = [sys.executable, "-c", PYTHON_CHILD] if kind == "python" else ["/bin/sleep",
                                                                        "3600"]
    service: dict[str, Any] = {"command": argv, "replicas": n,
                               "stop": {"signal": "SIGTERM", "timeout": "10s"},
                               "circuit_breaker": {"enabled": False}}
    if kind == "memlimit":
        service["resources"] = {"memory": "64Mi"}
    return service


async def once(n: int, kind: str) -> Sample:
    with tempfile.TemporaryDirectory() as d:
        stack = Stack.model_validate({
            "name": "bench", "ports": {"range": "41000-41999"}, "deploy": {"timeout": "5m"},
            "services": {"g": _service(n, kind)}, "base_dir": d})
        engine = Engine(EngineConfig(home=Path(d) / "home", stop_on_exit=True))
        await engine.start()
        try:
            result = await engine.apply(stack)
            if not result.ok:
                raise RuntimeError(f"apply failed: {result.failed}")
            await asyncio.sleep(1.0)
            rss = _rss_mib()
            statements: list[str] = []
            db = getattr(engine.store, "_db", None)  # the SQLite writer connection
            if db is not None:
                db.set_trace_callback(statements.append)
            before = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            await engine.down("bench")
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_SELF)
            if db is not None:
                db.set_trace_callback(None)
        finally:
            await engine.close()
    commits = sum(1 for s in statements if s.lstrip().upper().startswith("COMMIT"))
    return Sample(wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                  len(statements), commits, rss)


def bare(n: int, kind: str) -> float:
    """Seconds to SIGTERM and reap N children started with plain Popen."""
    argv = _service(n, kind)["command"]
    procs = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(n)]
    time.sleep(1.0)
    t0 = time.perf_counter()
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--kind", choices=("sleep", "memlimit", "python"), default="sleep")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    samples, baseline = [], []
    for _ in range(args.reps):
        baseline.append(bare(args.n, args.kind))
        samples.append(asyncio.run(once(args.n, args.kind)))

    def med(values: list[float]) -> float:
        return statistics.median(values) * 1000

    walls = sorted(s.wall * 1000 for s in samples)
    print(f"engine.down() of {args.n} x {args.kind}, {args.reps} repetitions")
    print(f"  wall      median {med([s.wall for s in samples]):7.1f} ms  "
          f"(min {walls[0]:.1f}, max {walls[-1]:.1f})")
    ratio = statistics.median(s.wall for s in samples) / statistics.median(baseline)
    print(f"  baseline  median {med(baseline):7.1f} ms  (SIGTERM + waitpid of plain Popen "
          f"children; engine ÷ baseline {ratio:.2f}x)")
    print(f"  CPU       median {med([s.user + s.system for s in samples]):7.1f} ms  "
          f"(user {med([s.user for s in samples]):.1f}, "
          f"system {med([s.system for s in samples]):.1f})")
    print(f"  SQLite    median {statistics.median(s.statements for s in samples):7.0f} "
          f"statements, {statistics.median(s.commits for s in samples):.0f} commits")
    print(f"  RSS       median {statistics.median(s.rss for s in samples):7.1f} MiB "
          f"with {args.n} idle instances")


if __name__ == "__main__":
    main()
