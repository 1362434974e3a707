"""What carrying instance output through the log relay costs.

- throughput: a child writes N MiB to stdout (`head -c N /dev/zero` in 4 KiB lines
  from `yes`-like output); time until the whole of it is in the log file, with the child's
  stdout being the log file itself (the baseline: what the kernel does alone) and being a
  relay pipe (runtime/logpipe.py); and the relay's CPU per MiB;
- making an instance's output: `open_log` alone (the baseline) vs `open_log` + a pipe
  attached to the relay, per instance, over 300 instances.

    .venv/bin/python bench/bench_logs.py [--mib 200] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from shipyard.runtime.logpipe import LogPipes

LINE = b"x" * 99 + b"\n"


def writer_argv(mib: int) -> list[str]:
    # `yes` writes full pipe/file blocks of its line; head stops it at the size
    return ["/bin/sh", "-c", f"yes {LINE[:-1].decode()} | head -c {mib * 2**20}"]


async def wait_size(path: Path, size: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= size:
            return
        await asyncio.sleep(0.001)
    raise TimeoutError(f"{path} did not reach {size} bytes")


async def direct(tmp: Path, mib: int) -> float:
    log = tmp / "direct.log"
    log.unlink(missing_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    t0 = time.perf_counter()
    proc = subprocess.Popen(writer_argv(mib), stdout=fd, stderr=fd)
    os.close(fd)
    await asyncio.to_thread(proc.wait)
    await wait_size(log, mib * 2**20)
    return time.perf_counter() - t0


async def relayed(tmp: Path, pipes: LogPipes, mib: int, n: int) -> tuple[float, float]:
    log = tmp / f"relay-{n}.log"
    fd, _ = await pipes.open(f"bench.w{n}", str(log), 0, 0, f"bench/w{n}")
    relay = psutil.Process(pipes.relay_pid) if pipes.relay_pid else None
    cpu0 = sum(relay.cpu_times()[:2]) if relay else 0.0
    t0 = time.perf_counter()
    proc = subprocess.Popen(writer_argv(mib), stdout=fd, stderr=fd)
    os.close(fd)
    await asyncio.to_thread(proc.wait)
    await wait_size(log, mib * 2**20)
    took = time.perf_counter() - t0
    cpu = (sum(relay.cpu_times()[:2]) - cpu0) if relay else float("nan")
    log.unlink()
    return took, cpu


async def per_instance(tmp: Path, pipes: LogPipes | None, count: int) -> float:
    """Seconds per instance to make its output (file, and pipe when `pipes`)."""
    t0 = time.perf_counter()
    fds = []
    for i in range(count):
        log = tmp / "many" / f"i{i}.log"
        log.parent.mkdir(exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if pipes is not None:
            os.close(fd)
            fd, _ = await pipes.open(f"bench.m{i}", str(log), 0, 0, f"bench/m{i}")
        fds.append(fd)
    took = (time.perf_counter() - t0) / count
    for fd in fds:
        os.close(fd)
    return took


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pipes = LogPipes(tmp / "home")
        d_times, r_times, r_cpu = [], [], []
        await relayed(tmp, pipes, 1, -1)  # start the relay outside the measurement
        for rep in range(args.reps):
            d_times.append(await direct(tmp, args.mib))
            took, cpu = await relayed(tmp, pipes, args.mib, rep)
            r_times.append(took)
            r_cpu.append(cpu)
        med_d, med_r = statistics.median(d_times), statistics.median(r_times)
        print(f"{args.mib} MiB of output, median of {args.reps} [min-max]:")
        print(f"  direct to the log file (baseline): {med_d * 1000:8.1f} ms "
              f"[{min(d_times) * 1000:.1f}-{max(d_times) * 1000:.1f}]  "
              f"{args.mib / med_d:7.0f} MiB/s")
        print(f"  through the relay:                 {med_r * 1000:8.1f} ms "
              f"[{min(r_times) * 1000:.1f}-{max(r_times) * 1000:.1f}]  "
              f"{args.mib / med_r:7.0f} MiB/s  ratio {med_r / med_d:.2f}x")
        print(f"  relay CPU: {statistics.median(r_cpu) / args.mib * 1e6:.0f} µs per MiB")
        base = statistics.median([await per_instance(tmp, None, 300) for _ in range(3)])
        piped = statistics.median([await per_instance(tmp, pipes, 300) for _ in range(3)])
        print(f"making an instance's output, 300 instances: log file only {base * 1e6:.0f} µs,"
              f" with a relay pipe {piped * 1e6:.0f} µs each ({piped / base:.1f}x; "
              f"+{(piped - base) * 1e6:.0f} µs)")
        await asyncio.sleep(0.5)  # let the relay acknowledge every pipe
        await pipes.close()


if __name__ == "__main__":
    asyncio.run(main())
