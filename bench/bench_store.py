"""Benchmark of the state stores (SQLite, etcd): instance registrations.

    python bench/bench_store.py [--rounds 5] [--json-only] [--etcd URL | --no-etcd]

A registration is what the engine does when an instance appears: one transaction with
`put_instance` and `append_event("instance.registered")`, committed (durable against kill -9)
before the call returns. Scenarios, each in a fresh store file:

* 1,000 registrations started at once (asyncio.gather) - total time, and per registration
  the latency from the call (the moment gather started them all) to its return; the JSON
  also has "own" latencies, measured from the coroutine's first step;
* 100 registrations at once - the same;
* one registration at a time - p50/p99 of 2,000 in a row.

The etcd store runs the same scenarios against a single-member etcd started for the run
(Debian's etcd-server; its data dir in the temp dir, so on disk: etcd fsyncs its WAL on
every commit, which SQLite with synchronous=NORMAL does not), or against `--etcd URL`.

Baselines measured in the same run: gathering the same number of bare
`await asyncio.sleep(0)` coroutines (the floor of the asyncio loop itself), a raw
sqlite3 loop doing the same two inserts with one commit each (same schema and pragmas),
and raw etcd3aio transactions putting the same two keys (1,000 at once, and one at a time).
Reference to beat (a Rust engine): a registration ~150 us, 100 concurrent ~15 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from shipyard.state.base import Event, InstanceRecord, StackRecord, StateStore
from shipyard.state.sqlite import SQLiteStore
from shipyard.state.sqlite_schema import INSERT_EVENT, PUT_INSTANCE, event_row, instance_row

STACK = "bench"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def instance(i: int, tag: str) -> InstanceRecord:
    return InstanceRecord(STACK, "api", f"api-{tag}-{i}", i, 1, ports={"http": 30000 + i},
                          pid=1000 + i, message="registered")


def event(i: int, tag: str) -> Event:
    return Event("instance.registered", f"api-{tag}-{i} registered", stack=STACK,
                 service="api", instance=f"api-{tag}-{i}", data={"index": i})


async def fresh_store(folder: Path, name: str, **options: Any) -> StateStore:
    """A new store: a SQLite file in `folder`, or with `etcd=URL` a fresh namespace."""
    etcd = options.pop("etcd", None)
    store: StateStore
    if etcd is not None:
        from shipyard.state.factory import open_store
        store = open_store(f"{etcd}/bench-{name.replace(' ', '-')}-{time.time_ns()}")
    else:
        store = SQLiteStore(folder / f"{name}.db", **options)
    await store.open()
    await store.put_stack(StackRecord(STACK, {"name": STACK}))
    return store


async def concurrent(store: StateStore, n: int, tag: str) -> dict[str, Any]:
    own: list[float] = []
    since_start: list[float] = []

    async def register(i: int) -> None:
        t0 = time.perf_counter()
        async with store.transaction():
            await store.put_instance(instance(i, tag))
            await store.append_event(event(i, tag))
        t1 = time.perf_counter()
        own.append(t1 - t0)
        since_start.append(t1 - start)

    start = time.perf_counter()
    await asyncio.gather(*(register(i) for i in range(n)))
    total = time.perf_counter() - start
    assert len(await store.list_instances(STACK)) >= n
    return {"total": total, "own": own, "since_start": since_start}


async def sequential(store: StateStore, n: int, tag: str) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        async with store.transaction():
            await store.put_instance(instance(i, tag))
            await store.append_event(event(i, tag))
        out.append(time.perf_counter() - t0)
    return out


async def bare_loop(n: int) -> float:
    async def noop() -> None:
        await asyncio.sleep(0)

    start = time.perf_counter()
    await asyncio.gather(*(noop() for _ in range(n)))
    return time.perf_counter() - start


def raw_sqlite(path: Path, n: int, *, one_commit: bool = False) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    rows = [(instance_row(instance(i, "raw")), event_row(event(i, "raw"))) for i in range(n)]
    start = time.perf_counter()
    if one_commit:
        db.execute("BEGIN IMMEDIATE")
    for inst, ev in rows:
        if not one_commit:
            db.execute("BEGIN IMMEDIATE")
        db.execute(PUT_INSTANCE, inst)
        db.execute(INSERT_EVENT, ev)
        if not one_commit:
            db.execute("COMMIT")
    if one_commit:
        db.execute("COMMIT")
    total = time.perf_counter() - start
    db.close()
    return total


async def raw_etcd(url: str, n: int, *, concurrently: bool) -> list[float]:
    """etcd3aio alone: n transactions putting an instance key and an event key (the same
    JSON), all at once or one at a time; the durations of each."""
    from etcd3aio import Etcd3Client
    from etcd3aio.kv import KVService

    from shipyard.state.etcd_keys import encode

    endpoints = url[len("etcd://"):].split(",")
    tag = f"raw-{time.time_ns()}"
    async with Etcd3Client(endpoints) as client:
        assert client.kv is not None
        kv = client.kv

        async def one(i: int) -> float:
            t0 = time.perf_counter()
            await kv.txn([], [
                KVService.txn_op_put(f"/bench/{tag}/i/{i}", encode(instance(i, tag))),
                KVService.txn_op_put(f"/bench/{tag}/e/{i:020d}", encode(event(i, tag)))])
            return time.perf_counter() - t0

        if concurrently:
            start = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            return [time.perf_counter() - start]
        return [await one(i) for i in range(n)]


async def rounds_of(k: int, fn: Callable[[int], Awaitable[Any]]) -> list[Any]:
    return [await fn(r) for r in range(k)]


async def run(rounds: int, folder: Path, etcd: str | None,
              etcd_label: str = "etcd") -> dict[str, Any]:
    results: dict[str, Any] = {}
    modes: list[tuple[str, dict[str, Any]]] = [
        ("group commit (default)", {}), ("commit per transaction", {"group_commit": False})]
    if etcd is not None:
        modes.append((etcd_label, {"etcd": etcd}))
    for mode, options in modes:
        async def burst(r: int, n: int, options: dict[str, Any] = options,
                        mode: str = mode) -> dict[str, Any]:
            store = await fresh_store(folder, f"{mode[:5]}-{n}-{r}", **options)
            try:
                await concurrent(store, 50, "warm")  # warm statement caches
                return await concurrent(store, n, f"r{r}")
            finally:
                await store.close()

        big = await rounds_of(rounds, lambda r: burst(r, 1000))
        small = await rounds_of(rounds, lambda r: burst(r, 100))
        since100 = [x for b in small for x in b["since_start"]]
        store = await fresh_store(folder, f"{mode[:5]}-seq", **options)
        await sequential(store, 100, "warm")
        seq = await sequential(store, 2000, "seq")
        await store.close()
        own = [x for b in big for x in b["own"]]
        since = [x for b in big for x in b["since_start"]]
        results[mode] = {
            "1000_total_ms": statistics.median(b["total"] for b in big) * 1e3,
            "1000_total_min_max_ms": [min(b["total"] for b in big) * 1e3,
                                      max(b["total"] for b in big) * 1e3],
            "1000_own_p50_us": pct(own, 50) * 1e6,
            "1000_own_p99_us": pct(own, 99) * 1e6,
            "1000_from_start_p50_ms": pct(since, 50) * 1e3,
            "1000_from_start_p99_ms": pct(since, 99) * 1e3,
            "100_total_ms": statistics.median(b["total"] for b in small) * 1e3,
            "100_from_start_p50_ms": pct(since100, 50) * 1e3,
            "100_from_start_p99_ms": pct(since100, 99) * 1e3,
            "sequential_p50_us": pct(seq, 50) * 1e6,
            "sequential_p99_us": pct(seq, 99) * 1e6,
        }
    bare = [await bare_loop(1000) for _ in range(rounds)]
    bare100 = [await bare_loop(100) for _ in range(rounds)]
    raw_path = folder / "raw.db"
    await (await fresh_store(folder, "raw")).close()  # creates the schema
    raw = [raw_sqlite(raw_path, 1000) for _ in range(rounds)]
    raw_one = [raw_sqlite(raw_path, 1000, one_commit=True) for _ in range(rounds)]
    results["baselines"] = {
        "bare_asyncio_gather_1000_ms": statistics.median(bare) * 1e3,
        "bare_asyncio_gather_100_ms": statistics.median(bare100) * 1e3,
        "raw_sqlite_1000_commits_ms": statistics.median(raw) * 1e3,
        "raw_sqlite_1000_one_commit_ms": statistics.median(raw_one) * 1e3,
    }
    if etcd is not None:
        raw_gather = [(await raw_etcd(etcd, 1000, concurrently=True))[0]
                      for _ in range(rounds)]
        raw_seq = await raw_etcd(etcd, 1000, concurrently=False)
        results["baselines"].update({
            "raw_etcd_1000_concurrent_txns_ms": statistics.median(raw_gather) * 1e3,
            "raw_etcd_txn_one_at_a_time_p50_us": pct(raw_seq, 50) * 1e6,
        })
    return results


def table(results: dict[str, Any]) -> str:
    base = results["baselines"]
    lines = [
        "| store mode | 1,000 concurrent: total | call → return p50 / p99 "
        "| 100 concurrent: total | call → return p50 / p99 | one at a time p50 / p99 "
        "| 1,000 ÷ bare asyncio | 1,000 ÷ raw client |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, r in results.items():
        if mode in ("baselines", "environment"):
            continue
        raw = (base["raw_etcd_1000_concurrent_txns_ms"] if mode.startswith("etcd")
               else base["raw_sqlite_1000_commits_ms"])
        lines.append(
            f"| {mode} | {r['1000_total_ms']:.1f} ms "
            f"| {r['1000_from_start_p50_ms']:.1f} / {r['1000_from_start_p99_ms']:.1f} ms "
            f"| {r['100_total_ms']:.2f} ms "
            f"| {r['100_from_start_p50_ms']:.2f} / {r['100_from_start_p99_ms']:.2f} ms "
            f"| {r['sequential_p50_us']:.0f} / {r['sequential_p99_us']:.0f} µs "
            f"| {r['1000_total_ms'] / base['bare_asyncio_gather_1000_ms']:.1f}x "
            f"| {r['1000_total_ms'] / raw:.2f}x |")
    lines += [
        "",
        "| baseline | time |",
        "| --- | --- |",
        f"| bare asyncio: gather 1,000 x `sleep(0)` | "
        f"{base['bare_asyncio_gather_1000_ms']:.1f} ms |",
        f"| bare asyncio: gather 100 x `sleep(0)` | "
        f"{base['bare_asyncio_gather_100_ms']:.2f} ms |",
        f"| raw sqlite3: 1,000 x (2 inserts + commit) | "
        f"{base['raw_sqlite_1000_commits_ms']:.1f} ms |",
        f"| raw sqlite3: 1,000 x 2 inserts, one commit | "
        f"{base['raw_sqlite_1000_one_commit_ms']:.1f} ms |",
    ]
    if "raw_etcd_1000_concurrent_txns_ms" in base:
        lines += [
            f"| raw etcd3aio: 1,000 txns (2 puts each) at once | "
            f"{base['raw_etcd_1000_concurrent_txns_ms']:.1f} ms |",
            f"| raw etcd3aio: one txn (2 puts) at a time, p50 | "
            f"{base['raw_etcd_txn_one_at_a_time_p50_us']:.0f} µs |",
        ]
    lines.append("| reference (Rust engine) | registration ≈150 µs, 100 concurrent ≈15 ms |")
    return "\n".join(lines)


@contextlib.contextmanager
def etcd_server(args: argparse.Namespace,
                folder: Path) -> Iterator[tuple[str | None, str, str]]:
    """(base URL of the etcd to use or None, its version, the column's label)."""
    if args.no_etcd:
        yield None, "", ""
        return
    if args.etcd:
        yield "etcd://" + args.etcd.removeprefix("etcd://").split("/")[0], "given", "etcd"
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.etcd_cluster import ETCD, EtcdCluster

    if ETCD is None:
        print("etcd is not installed (apt-get install etcd-server): no etcd column",
              file=sys.stderr)
        yield None, "", ""
        return
    version = subprocess.run([ETCD, "--version"], capture_output=True, text=True,
                             check=False).stdout.split("\n")[0]
    n = args.etcd_members
    cluster = EtcdCluster(n, base_dir=folder)
    with cluster:
        yield ("etcd://" + ",".join(cluster.endpoints), version,
               f"etcd ({n} member{'s' * (n > 1)}, WAL on disk)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json-only", action="store_true")
    parser.add_argument("--dir", help="where to put the store files (default: the temp dir)")
    parser.add_argument("--etcd", help="use this etcd (etcd://host:port,...) instead of "
                                       "starting one")
    parser.add_argument("--etcd-members", type=int, default=1,
                        help="members of the etcd started for the run (default 1)")
    parser.add_argument("--no-etcd", action="store_true", help="SQLite only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-", dir=args.dir) as tmp, \
            etcd_server(args, Path(tmp)) as (etcd, etcd_version, label):
        results = asyncio.run(run(args.rounds, Path(tmp), etcd, label))
    results["environment"] = {
        "python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version,
        "etcd": etcd_version, "platform": platform.platform(), "rounds": args.rounds,
    }
    if not args.json_only:
        print(table(results))
        print()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
