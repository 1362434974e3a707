"""Benchmark (e): start 100 instances with the process runtime until all are running
(pid known), against a bare asyncio loop doing asyncio.create_subprocess_exec of the same
100 processes in the same run; with and without cgroups (on cgroup v1 both ways of
starting a child inside its cgroup: from a thread visiting the cgroup, the default, and
by a preexec_fn in a forked child, the fallback); then stop them all.

Children: `/bin/sleep 60`, and `python -c "import time; time.sleep(60)"` where python is
the interpreter running this script (the project's venv).

    .venv/bin/python bench/bench_runtime.py [--n 100] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

from shipyard.runtime.base import Handle, LaunchSpec
from shipyard.runtime.process import ProcessRuntime

Result = tuple[float, float]  # (start seconds, stop seconds)


async def bare_asyncio(argv: list[str], n: int) -> Result:
    t0 = time.perf_counter()
    procs = [await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL) for _ in range(n)]
    assert all(p.pid for p in procs)
    started = time.perf_counter() - t0
    t1 = time.perf_counter()
    for p in procs:
        p.terminate()
    await asyncio.gather(*(p.wait() for p in procs))
    return started, time.perf_counter() - t1


async def with_runtime(runtime: ProcessRuntime, argv: list[str], n: int, stack: str,
                       logdir: str) -> Result:
    specs = [LaunchSpec(stack=stack, service="svc", instance=f"svc-{i}", argv=argv,
                        env={"PATH": "/usr/bin:/bin"}, workdir=logdir,
                        log_path=os.path.join(logdir, f"svc-{i}.log")) for i in range(n)]
    t0 = time.perf_counter()
    handles: list[Handle] = [await runtime.start(spec) for spec in specs]
    assert all(h.pid for h in handles)
    started = time.perf_counter() - t0
    t1 = time.perf_counter()
    await asyncio.gather(*(runtime.stop(h, "SIGTERM", 10.0) for h in handles))
    return started, time.perf_counter() - t1


def fmt(values: list[float], unit: str = "ms", scale: float = 1000.0) -> str:
    med = statistics.median(values) * scale
    return f"{med:7.1f} {unit} [{min(values) * scale:.1f}-{max(values) * scale:.1f}]"


def fmt_ratio(values: list[float]) -> str:
    return f"x{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    cg_runtime = ProcessRuntime()
    preexec_runtime = ProcessRuntime(thread_join=False)
    plain_runtime = ProcessRuntime(cgroups="off")
    stack = f"bench-{os.getpid()}"
    logdir = tempfile.mkdtemp(prefix="shipyard-bench-")
    variants: dict[str, Callable[[list[str]], Awaitable[Result]]] = {
        "bare asyncio.create_subprocess_exec": lambda argv: bare_asyncio(argv, args.n),
        "process runtime, no cgroups": lambda argv: with_runtime(
            plain_runtime, argv, args.n, stack, logdir),
    }
    cg_label = None
    if cg_runtime.cgroups_enabled:
        cg_label = f"process runtime, cgroups v{cg_runtime.cgroup_support.version}"
        variants[cg_label] = lambda argv: with_runtime(cg_runtime, argv, args.n, stack, logdir)
        if cg_runtime.cgroup_support.version == 1:
            variants[f"{cg_label}, preexec_fn join"] = lambda argv: with_runtime(
                preexec_runtime, argv, args.n, stack, logdir)
    workloads = {
        "/bin/sleep 60": ["/bin/sleep", "60"],
        "venv python -c 'time.sleep(60)'": [sys.executable, "-c",
                                            "import time; time.sleep(60)"],
    }
    print(f"bench_runtime: start {args.n} instances until all have a pid, then stop them;"
          f" median [min-max] over {args.reps} repetitions")
    print(f"python children come from the project's venv: {sys.executable}")
    print(f"host: {os.cpu_count()} cpus, Python {sys.version.split()[0]};"
          f" cgroups: {cg_label or cg_runtime.warning}")
    try:
        for wname, argv in workloads.items():
            starts: dict[str, list[float]] = {k: [] for k in variants}
            stops: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.reps):
                for vname, run in variants.items():
                    start, stop = await run(argv)
                    starts[vname].append(start)
                    stops[vname].append(stop)
                    await asyncio.sleep(0.2)  # let the machine settle
            base = starts["bare asyncio.create_subprocess_exec"]
            print(f"\n{wname} x {args.n}")
            for vname in variants:
                ratios = [s / b for s, b in zip(starts[vname], base, strict=True)]
                print(f"  {vname:44s} start {fmt(starts[vname])}  ratio {fmt_ratio(ratios)}"
                      f"  stop-all {fmt(stops[vname])}")
    finally:
        await cg_runtime.close()
        await preexec_runtime.close()
        await plain_runtime.close()
        for d in cg_runtime.cgroup_support.stack_dirs(stack):
            if os.path.isdir(d):
                os.rmdir(d)
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
