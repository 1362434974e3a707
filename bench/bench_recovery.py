"""Reliability benchmarks (issue 3), each beside a baseline measured in the same run:

1. recovery from kill -9 of an instance to a replacement ready (HTTP probe every 20 ms,
   restart backoff 10 ms), p50 / p95 over 20 kills; baseline: a bare asyncio loop that
   respawns the same child and polls its port the same way.
2. re-adoption of 200 running instances by a new engine on the same store (the control
   plane restarted); baseline: reading /proc/<pid>/stat of the same 200 pids.
3. operation-queue throughput: 1,000 no-op operations through the durable queue;
   baseline: 1,000 concurrent single durable writes (put_operation) without the queue.

Children are `/bin/sleep` and the venv's Python (tests/fixtures/svc.py), which starts in
~10 ms (the machine's base python3 takes ~100 ms).

    .venv/bin/python bench/bench_recovery.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shipyard import Engine, EngineConfig
from shipyard.spec.models import Stack
from shipyard.state.base import InstanceState, OperationRecord

SVC = str(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "svc.py")
PY = sys.executable


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.02)


async def bare_recovery(kills: int) -> list[float]:
    port = free_port()
    times = []
    for _ in range(kills):
        proc = await asyncio.create_subprocess_exec(PY, SVC, "--port", str(port),
                                                    stdout=asyncio.subprocess.DEVNULL)
        await wait_port(port)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await asyncio.sleep(0.01)  # the same backoff as Shipyard's
        proc = await asyncio.create_subprocess_exec(PY, SVC, "--port", str(port),
                                                    stdout=asyncio.subprocess.DEVNULL)
        await wait_port(port)
        times.append(time.perf_counter() - t0)
        proc.kill()
        await proc.wait()
    return times


async def shipyard_recovery(kills: int, home: Path) -> list[float]:
    stack = Stack.model_validate({
        "name": "rec", "ports": {"range": "46000-46999"}, "base_dir": str(home),
        "services": {"a": {
            "command": [PY, SVC, "--port", "${PORT}"], "ports": {"http": "auto"},
            "health": {"readiness": {"http": "/ready", "interval": "20ms",
                                     "failure_threshold": 1}},
            "restart": {"policy": "always", "initial": "10ms", "max": "10ms", "jitter": 0,
                        "max_restarts": None},
            "circuit_breaker": {"enabled": False}}}})
    times = []
    async with Engine(EngineConfig(home=home, stop_on_exit=True)) as engine:
        assert (await engine.apply(stack)).ok
        for _ in range(kills):
            old = (await engine.instances("rec"))[0].pid  # records are live: copy the pid
            assert old is not None
            t0 = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            while True:
                now = (await engine.instances("rec"))[0]
                if now.pid != old and now.state is InstanceState.READY:
                    break
                await engine.changed(0.5)
            times.append(time.perf_counter() - t0)
    return times


async def readoption(n: int, home: Path) -> dict[str, float]:
    stack = Stack.model_validate({
        "name": "adopt", "base_dir": str(home),
        "services": {"s": {"command": ["/bin/sleep", "600"], "replicas": n}}})
    async with Engine(EngineConfig(home=home)) as engine:
        assert (await engine.apply(stack)).ok
        pids = [r.pid for r in await engine.instances("adopt")]
    t0 = time.perf_counter()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            f.read()
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(home=home, stop_on_exit=True))
    await engine.start()
    adopted = time.perf_counter() - t0
    after = [r.pid for r in await engine.instances("adopt")]
    assert sorted(after) == sorted(pids), "re-adoption restarted something"
    await engine.close()
    return {"engine_s": adopted, "bare_proc_read_s": bare}


async def queue_throughput(n: int, home: Path) -> dict[str, float]:
    async with Engine(EngineConfig(home=home)) as engine:
        async def noop(op: OperationRecord) -> dict[str, Any]:
            return {"ok": True}

        engine.ops.register("noop", noop, resumable=True)
        engine.ops.max_queued = n * 2
        t0 = time.perf_counter()
        ops = [await engine.ops.submit(OperationRecord("noop", "q", service=f"s{i}"))
               for i in range(n)]
        await asyncio.gather(*(engine.ops.wait(o.id or 0) for o in ops))
        queued = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.gather(*(engine.store.put_operation(OperationRecord("noop", "b"))
                               for _ in range(n)))
        bare = time.perf_counter() - t0
    return {"queue_s": queued, "bare_writes_s": bare}


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bare = await bare_recovery(20)
        ours = await shipyard_recovery(20, root / "r")
        print("1. kill -9 of an instance -> replacement ready, 20 kills")
        print(f"   shipyard  p50 {statistics.median(ours) * 1000:6.1f} ms  "
              f"p95 {pct(ours, 0.95) * 1000:6.1f} ms")
        print(f"   bare      p50 {statistics.median(bare) * 1000:6.1f} ms  "
              f"p95 {pct(bare, 0.95) * 1000:6.1f} ms   "
              f"ratio p50 {statistics.median(ours) / statistics.median(bare):.2f}")
        adopt = await readoption(200, root / "a")
        print("2. re-adoption of 200 running instances by a new engine")
        print(f"   shipyard {adopt['engine_s'] * 1000:.1f} ms (store open + recover + "
              f"supervisors); bare /proc read of 200 pids {adopt['bare_proc_read_s'] * 1000:.2f}"
              f" ms; ratio {adopt['engine_s'] / adopt['bare_proc_read_s']:.0f}")
        q = await queue_throughput(1000, root / "q")
        print("3. operation queue, 1,000 no-op operations")
        print(f"   shipyard {1000 / q['queue_s']:.0f} ops/s ({q['queue_s'] * 1000:.0f} ms); "
              f"bare durable writes {1000 / q['bare_writes_s']:.0f}/s; "
              f"ratio {q['queue_s'] / q['bare_writes_s']:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
