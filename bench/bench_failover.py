"""Leader failover of highly available control planes (issue 10), against the lease TTL.

Two `shipyard server` processes (each with its own home) on one etcd namespace; the first
leads and runs a stack of `--instances` sleeping processes. Then:

* kill -9 of the leader: time until the standby leads (its `GET /v1/leader` says so),
  and until a write sent to the standby *at the moment of the kill* (`scale` +1, held by
  the standby until it leads, then applied by it: it re-adopts the running instances and
  starts one more) is answered. The floor is the lease TTL: the key of a dead leader
  goes only when its lease expires (etcd checks expiry every ~0.5 s).
* SIGTERM of the leader (a clean shutdown: it resigns, revoking its lease): the same two
  times, which the TTL does not bound.

Every run starts two fresh servers on a fresh namespace of one single-member etcd (its
data dir in /dev/shm, see tests/etcd_cluster.py). Median [min-max] over `--runs`.

    .venv/bin/python bench/bench_failover.py [--runs 5] [--ttl 2 5] [--instances 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from shipyard.api.client import Client

PY = sys.executable


def start_server(home: Path, store: str, ttl: int) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SHIPYARD_HOME=str(home))
    with open(home / "server.err", "ab") as err:
        proc = subprocess.Popen([PY, "-m", "shipyard.cli.main", "server", "--store", store,
                                 "--lease-ttl", str(ttl)], env=env, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    with Client(home / "shipyard.sock") as client:
        for _ in range(400):
            if client.is_running():
                return proc
            time.sleep(0.025)
    raise RuntimeError((home / "server.err").read_text())


def stack(name: str, replicas: int) -> dict[str, Any]:
    return {"name": name, "base_dir": "/tmp",
            "services": {"w": {"command": ["/bin/sleep", "600"], "replicas": replicas,
                               "stop": {"timeout": "2s"}}}}


def one_run(url: str, folder: Path, *, ttl: int, instances: int, how: signal.Signals
            ) -> tuple[float, float]:
    """(seconds to a new leader, seconds to the answer of the write), from the signal."""
    name = f"f{uuid.uuid4().hex[:8]}"
    store = f"{url.rsplit('/', 1)[0]}/{name}"
    homes = [folder / name / "a", folder / name / "b"]
    procs = [start_server(homes[0], store, ttl)]
    try:
        procs.append(start_server(homes[1], store, ttl))
        with Client(homes[0] / "shipyard.sock") as a:
            assert a.apply(stack(name, instances)).ok
            before = {i["instance"]: i["pid"] for i in a.instances(stack=name)}
        answered: list[float] = []

        def write() -> None:
            with Client(homes[1] / "shipyard.sock") as b:
                b.scale(name, "w", instances + 1)
                answered.append(time.monotonic())

        killed = time.monotonic()
        procs[0].send_signal(how)
        writer = threading.Thread(target=write)
        writer.start()
        with Client(homes[1] / "shipyard.sock") as b:
            while b.leader()["role"] != "leader":
                time.sleep(0.005)
            led = time.monotonic() - killed
            writer.join(60)
            if not answered:
                raise RuntimeError("the write was not answered")
            after = {i["instance"]: i["pid"] for i in b.instances(stack=name)}
            assert {k: after[k] for k in before} == before, "instances were restarted"
            assert len(after) == instances + 1
            b.down(name)
        return led, answered[0] - killed
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def fmt(values: list[float]) -> str:
    return (f"{statistics.median(values):.2f} s [{min(values):.2f}-{max(values):.2f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ttl", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--instances", type=int, default=10)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.etcd_cluster import EtcdCluster

    print(f"# {platform.node()}: Python {platform.python_version()}, {os.cpu_count()} "
          f"cores; {args.runs} runs each, {args.instances} instances")
    rows = []
    with tempfile.TemporaryDirectory(prefix="shipyard-failover-") as tmp, \
            EtcdCluster(1) as cluster:
        for ttl in args.ttl:
            for how in (signal.SIGKILL, signal.SIGTERM):
                led, wrote = [], []
                for _ in range(args.runs):
                    a, b = one_run(cluster.url("x"), Path(tmp), ttl=ttl,
                                   instances=args.instances, how=how)
                    led.append(a)
                    wrote.append(b)
                label = "kill -9" if how is signal.SIGKILL else "SIGTERM (resign)"
                row = (f"| {ttl} s | {label} | {fmt(led)} | {fmt(wrote)} | "
                       f"{statistics.median(wrote) / ttl:.2f}x |")
                print(row, flush=True)
                rows.append(row)
    print("\n| lease TTL | leader | new leader elected | write answered | write / TTL |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
