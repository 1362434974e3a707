"""The state store contract, run against every backend in BACKENDS: SQLite, and etcd (a
real etcd server per test process, see tests/etcd_cluster.py, with a namespace of its own
for each test). SQLite specifics (files, modes, errors, locks, checkpoints, the factory)
are in test_store_sqlite.py, etcd specifics in test_store_etcd.py.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shipyard.errors import NotFoundError
from shipyard.state.base import (
    Event,
    InstanceRecord,
    InstanceState,
    StackRecord,
    StateStore,
)
from shipyard.state.factory import open_store
from shipyard.state.sqlite import SQLiteStore
from tests.etcd_cluster import unique_url

PYTHON = sys.executable
BACKENDS = ["sqlite", "etcd"]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/home/state.db"
    if request.param == "etcd":
        return unique_url(request.config)
    raise AssertionError(request.param)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[StateStore]:
    s = open_store(store_url)
    await s.open()
    yield s
    await s.close()


def inst(stack: str, name: str, index: int = 0, **kw: object) -> InstanceRecord:
    return InstanceRecord(stack=stack, service=name.rsplit("-", 1)[0], instance=name,
                          index=index, revision=1, **kw)  # type: ignore[arg-type]


def ev(kind: str, stack: str | None = "s", **kw: object) -> Event:
    return Event(kind=kind, message=f"{kind} happened", stack=stack, **kw)  # type: ignore[arg-type]


# -- round trips ----------------------------------------------------------------------------
async def test_stack_round_trip(store: StateStore) -> None:
    rec = StackRecord("demo", {"name": "demo", "services": {"api": {"replicas": 2}}},
                      status="deploying", created_at=100.5, updated_at=200.25)
    await store.put_stack(rec)
    assert await store.get_stack("demo") == rec
    assert await store.get_stack("nope") is None
    await store.put_stack(StackRecord("demo", {"v": 2}, status="applied", created_at=999.0,
                                      updated_at=300.0))
    got = await store.get_stack("demo")
    assert got is not None
    assert (got.spec, got.status, got.updated_at) == ({"v": 2}, "applied", 300.0)
    assert got.created_at == 100.5  # an update keeps when the stack was first recorded
    await store.put_stack(StackRecord("alpha", {}))
    assert [s.name for s in await store.list_stacks()] == ["alpha", "demo"]


async def test_instance_round_trip(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    full = InstanceRecord(
        stack="s", service="api", instance="api-2", index=2, revision=3,
        state=InstanceState.READY, ready=True, pid=4242, pgid=4242, proc_start=1234.5,
        cgroup="/sys/fs/cgroup/shipyard/api-2", ports={"http": 30001, "admin": 30002},
        restarts=4, exit_code=None, health="passing", message="ready after 1.2s",
        started_at=1000.0, updated_at=1001.0)
    bare = inst("s", "db-0")
    await store.put_instance(full)
    await store.put_instance(bare)
    assert await store.get_instance("s", "api-2") == full
    assert await store.get_instance("s", "db-0") == bare
    assert await store.get_instance("s", "nope") is None
    full.state, full.exit_code, full.ready = InstanceState.FAILED, 3, False
    await store.put_instance(full)  # replace
    got = await store.get_instance("s", "api-2")
    assert got == full and isinstance(got.state, InstanceState)
    assert [i.instance for i in await store.list_instances()] == ["api-2", "db-0"]
    assert [i.instance for i in await store.list_instances("s", "db")] == ["db-0"]
    assert await store.list_instances("other") == []
    await store.delete_instance("s", "api-2")
    assert [i.instance for i in await store.list_instances("s")] == ["db-0"]


async def test_event_round_trip_and_filters(store: StateStore) -> None:
    first = await store.append_event(Event("deploy.started", "go", stack="s",
                                           data={"services": ["api"], "n": 1}, ts=10.0))
    assert first.seq is not None
    await store.append_event(ev("instance.ready", service="api", instance="api-0"))
    await store.append_event(ev("other.stack", stack="t"))
    await store.append_event(ev("global", stack=None))
    events = await store.list_events()
    assert [e.kind for e in events] == ["deploy.started", "instance.ready", "other.stack",
                                        "global"]
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert events[0] == first and events[0].data == {"services": ["api"], "n": 1}
    assert [e.kind for e in await store.list_events(stack="s")] == ["deploy.started",
                                                                    "instance.ready"]
    assert [e.kind for e in await store.list_events(stack="s", service="api")] == [
        "instance.ready"]
    assert [e.kind for e in await store.list_events(after=seqs[1], limit=1)] == ["other.stack"]


# -- services and revisions -----------------------------------------------------------------
async def test_revision_numbering(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    r1 = await store.record_revision("s", "api", {"image": "a:1"}, "h1")
    assert (r1.revision, r1.spec, r1.outcome) == (1, {"image": "a:1"}, "pending")
    same = await store.record_revision("s", "api", {"image": "a:1"}, "h1")
    assert same == r1  # unchanged hash: the current revision, nothing new
    r2 = await store.record_revision("s", "api", {"image": "a:2"}, "h2")
    back = await store.record_revision("s", "api", {"image": "a:1"}, "h1")
    assert (r2.revision, back.revision) == (2, 3)  # going back is a new revision too
    other = await store.record_revision("s", "db", {"image": "pg"}, "d1")
    assert other.revision == 1  # numbered per service
    assert [(s.name, s.revision, s.spec_hash) for s in await store.list_services("s")] == [
        ("api", 3, "h1"), ("db", 1, "d1")]
    await store.set_revision_outcome("s", "api", 2, "rolled-back")
    got = await store.get_revision("s", "api", 2)
    assert got is not None and (got.outcome, got.spec) == ("rolled-back", {"image": "a:2"})
    assert [r.revision for r in await store.list_revisions("s", "api")] == [1, 2, 3]
    assert await store.get_revision("s", "api", 9) is None
    with pytest.raises(NotFoundError):
        await store.set_revision_outcome("s", "api", 9, "deployed")
    with pytest.raises(NotFoundError):
        await store.record_revision("ghost", "api", {}, "h")


async def test_prune_revisions_keeps_the_newest_and_the_current(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    for i in range(1, 7):
        await store.record_revision("s", "api", {"v": i}, f"h{i}")
    await store.record_revision("s", "db", {"v": 1}, "d1")
    assert await store.prune_revisions("s", "api", 3) == 3
    assert [r.revision for r in await store.list_revisions("s", "api")] == [4, 5, 6]
    assert await store.prune_revisions("s", "api", 3) == 0
    assert await store.prune_revisions("s", "api", 0) == 2  # the current one always stays
    assert [r.revision for r in await store.list_revisions("s", "api")] == [6]
    assert [r.revision for r in await store.list_revisions("s", "db")] == [1]
    nxt = await store.record_revision("s", "api", {"v": 7}, "h7")
    assert nxt.revision == 7  # numbers are never reused


async def test_concurrent_record_revision_is_atomic(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    revs = await asyncio.gather(*(store.record_revision("s", "api", {"v": i % 5}, f"h{i % 5}")
                                  for i in range(50)))
    numbers = [r.revision for r in await store.list_revisions("s", "api")]
    assert numbers == list(range(1, len(numbers) + 1))  # no gaps, no duplicates
    assert {r.revision for r in revs} <= set(numbers)


async def test_delete_stack_cascades_but_keeps_events(store: StateStore) -> None:
    for name in ("s", "keep"):
        await store.put_stack(StackRecord(name, {}))
        await store.record_revision(name, "api", {}, "h")
        await store.put_instance(inst(name, "api-0"))
        await store.append_event(ev("deploy.started", stack=name))
    await store.delete_stack("s")
    assert await store.get_stack("s") is None
    assert await store.list_services("s") == []
    assert await store.list_revisions("s", "api") == []
    assert await store.list_instances("s") == []
    assert len(await store.list_events(stack="s")) == 1
    assert len(await store.list_instances("keep")) == 1  # other stacks untouched
    await store.delete_stack("s")  # deleting twice is fine


async def test_delete_service(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    for svc in ("api", "db"):
        await store.record_revision("s", svc, {}, "h")
        await store.put_instance(inst("s", f"{svc}-0"))
    await store.delete_service("s", "api")
    assert [s.name for s in await store.list_services("s")] == ["db"]
    assert await store.list_revisions("s", "api") == []
    assert [i.instance for i in await store.list_instances("s")] == ["db-0"]
    assert (await store.record_revision("s", "api", {}, "h")).revision == 1


# -- transactions ---------------------------------------------------------------------------
async def test_delete_and_recreate_in_one_transaction(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {"v": 1}))
    await store.record_revision("s", "api", {"v": 1}, "h1")
    await store.record_revision("s", "api", {"v": 2}, "h2")
    for i in range(3):
        await store.put_instance(inst("s", f"api-{i}", i))
    async with store.transaction():
        await store.delete_stack("s")
        await store.put_stack(StackRecord("s", {"v": 2}))
        await store.put_instance(inst("s", "api-1", 1))
        assert (await store.record_revision("s", "api", {"v": 3}, "h3")).revision == 1
        await store.delete_service("s", "api")
        assert (await store.record_revision("s", "api", {"v": 4}, "h4")).revision == 1
        assert [i.instance for i in await store.list_instances("s")] == []
        await store.put_instance(inst("s", "api-2", 2))
    assert (await store.get_stack("s")).spec == {"v": 2}  # type: ignore[union-attr]
    assert [i.instance for i in await store.list_instances("s")] == ["api-2"]
    assert [(r.revision, r.spec_hash) for r in await store.list_revisions("s", "api")] == [
        (1, "h4")]


async def test_transaction_rolls_back_on_exception(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {"v": 1}))
    with pytest.raises(RuntimeError, match="boom"):
        async with store.transaction():
            await store.put_stack(StackRecord("s", {"v": 2}))
            await store.record_revision("s", "api", {}, "h")
            await store.put_instance(inst("s", "api-0"))
            await store.append_event(ev("deploy.started"))
            raise RuntimeError("boom")
    assert (await store.get_stack("s")).spec == {"v": 1}  # type: ignore[union-attr]
    assert await store.list_services("s") == []
    assert await store.list_instances() == []
    assert await store.list_events() == []


async def test_transaction_commits_together(store: StateStore) -> None:
    async with store.transaction():
        await store.put_stack(StackRecord("s", {}))
        await store.put_instance(inst("s", "api-0"))  # sees the stack put just before
        e = await store.append_event(ev("instance.registered"))
        assert await store.get_instance("s", "api-0") is not None  # reads its own writes
    assert e.seq is not None and len(await store.list_events()) == 1


async def test_nested_transaction_rolls_back_only_itself(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    async with store.transaction():
        await store.put_instance(inst("s", "api-0"))
        with pytest.raises(ValueError):
            async with store.transaction():
                await store.put_instance(inst("s", "api-1"))
                raise ValueError
        await store.put_instance(inst("s", "api-2"))
    assert [i.instance for i in await store.list_instances()] == ["api-0", "api-2"]


async def test_tasks_started_inside_a_transaction_join_it(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    with pytest.raises(RuntimeError):
        async with store.transaction():
            await asyncio.gather(*(store.put_instance(inst("s", f"api-{i}", i))
                                   for i in range(10)))
            raise RuntimeError
    assert await store.list_instances() == []
    async with store.transaction():
        await asyncio.gather(*(store.put_instance(inst("s", f"api-{i}", i)) for i in range(10)))
    assert len(await store.list_instances()) == 10


async def test_open_transaction_is_isolated(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    inside, finish = asyncio.Event(), asyncio.Event()

    async def slow_failing_transaction() -> None:
        async with store.transaction():
            await store.put_instance(inst("s", "a-0"))
            inside.set()
            await finish.wait()
            raise RuntimeError("abandon")

    task = asyncio.create_task(slow_failing_transaction())
    await inside.wait()
    assert await store.get_instance("s", "a-0") is None  # uncommitted: invisible to others
    writer = asyncio.create_task(store.put_instance(inst("s", "b-0")))
    await asyncio.sleep(0.02)
    finish.set()
    with pytest.raises(RuntimeError):
        await task
    await writer
    assert [i.instance for i in await store.list_instances()] == ["b-0"]


# -- concurrency ----------------------------------------------------------------------------
async def test_1000_concurrent_put_instance_all_land(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    await asyncio.gather(*(store.put_instance(inst("s", f"api-{i}", i, ports={"http": i}))
                           for i in range(1000)))
    got = await store.list_instances("s")
    assert len(got) == 1000
    assert {i.ports["http"] for i in got} == set(range(1000))


async def test_concurrent_transactions_fail_independently(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))

    async def register(i: int) -> int:
        async with store.transaction():
            await store.put_instance(inst("s", f"api-{i}", i))
            await store.append_event(ev("instance.registered", data={"i": i}))
            if i % 7 == 0:
                raise ValueError(i)
            if i % 3 == 0:
                await asyncio.sleep(0)  # some transactions span loop iterations
        return i

    results = await asyncio.gather(*(register(i) for i in range(300)), return_exceptions=True)
    ok = {r for r in results if isinstance(r, int)}
    assert ok == {i for i in range(300) if i % 7}
    assert {i.index for i in await store.list_instances("s")} == ok
    assert {e.data["i"] for e in await store.list_events(limit=1000)} == ok


# -- watching -------------------------------------------------------------------------------
async def collect(it: AsyncIterator[Event], n: int) -> list[Event]:
    out: list[Event] = []
    async for e in it:
        out.append(e)
        if len(out) == n:
            break
    return out


async def test_watch_events_in_process(store: StateStore) -> None:
    if isinstance(store, SQLiteStore):
        store.poll_interval = 60  # so that only a wake-up can deliver within the timeout
    old = await store.append_event(ev("old"))
    await store.append_event(ev("elsewhere", stack="t"))
    task = asyncio.create_task(collect(store.watch_events(after=0, stack="s"), 3))
    await asyncio.sleep(0.05)
    await store.append_event(ev("new1"))
    await store.append_event(ev("new2"))
    got = await asyncio.wait_for(task, 5)
    assert [e.kind for e in got] == ["old", "new1", "new2"]
    rest = await collect(store.watch_events(after=old.seq or 0), 1)
    assert rest[0].kind == "elsewhere"


CHILD_APPEND = """
import asyncio, sys
from shipyard.state.base import Event
from shipyard.state.factory import open_store
async def main():
    async with open_store(sys.argv[1]) as store:
        for i in range(3):
            await store.append_event(Event("child.event", f"from child {i}", stack="s"))
asyncio.run(main())
"""


async def test_watch_events_from_another_process(store: StateStore, store_url: str) -> None:
    await store.append_event(ev("before"))
    task = asyncio.create_task(collect(store.watch_events(stack="s"), 4))
    proc = await asyncio.create_subprocess_exec(PYTHON, "-c", CHILD_APPEND, store_url)
    assert await proc.wait() == 0
    got = await asyncio.wait_for(task, 10)
    assert [e.kind for e in got] == ["before", "child.event", "child.event", "child.event"]


async def test_watch_events_from_a_second_store(store: StateStore, store_url: str) -> None:
    task = asyncio.create_task(collect(store.watch_events(), 2))
    async with open_store(store_url) as other:
        await other.append_event(ev("one"))
        await other.append_event(ev("two"))
    got = await asyncio.wait_for(task, 5)
    assert [e.kind for e in got] == ["one", "two"]


# -- durability -----------------------------------------------------------------------------
CHILD_WRITER = """
import asyncio, sys
from shipyard.state.base import Event, InstanceRecord, StackRecord
from shipyard.state.factory import open_store
async def main():
    store = open_store(sys.argv[1])
    await store.open()
    await store.put_stack(StackRecord("d", {}))
    i = 0
    while True:
        async with store.transaction():
            await store.put_instance(InstanceRecord("d", "api", f"api-{i}", i, 1))
            e = await store.append_event(Event("instance.registered", str(i), stack="d"))
        print(i, e.seq, flush=True)
        i += 1
asyncio.run(main())
"""


async def test_acknowledged_writes_survive_sigkill(store_url: str) -> None:
    proc = subprocess.Popen([PYTHON, "-c", CHILD_WRITER, store_url], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    last = (-1, -1)
    try:
        for line in proc.stdout:
            a, b = line.split()
            last = (int(a), int(b))
            if last[0] >= 300:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert last[0] >= 300, "the writer died early"
    async with open_store(store_url) as store:
        names = {i.instance for i in await store.list_instances("d")}
        assert {f"api-{i}" for i in range(last[0] + 1)} <= names
        seqs = {e.seq for e in await store.list_events(stack="d", limit=100_000)}
        assert last[1] in seqs


async def test_cancelled_transaction_rolls_back(store: StateStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    inside = asyncio.Event()

    async def stuck() -> None:
        async with store.transaction():
            await store.put_instance(inst("s", "api-0"))
            inside.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(stuck())
    await inside.wait()
    waiting = asyncio.create_task(store.put_instance(inst("s", "api-1")))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await waiting
    assert [i.instance for i in await store.list_instances()] == ["api-1"]


CHILD_BURSTS = """
import asyncio, sys
from shipyard.state.base import Event
from shipyard.state.factory import open_store
async def main():
    async with open_store(sys.argv[1]) as store:
        for i in range(40):
            await asyncio.gather(*(store.append_event(Event("child", f"{i}.{j}", stack="s"))
                                   for j in range(10)))
asyncio.run(main())
"""


async def test_two_processes_writing_at_once(store: StateStore, store_url: str) -> None:
    procs = [await asyncio.create_subprocess_exec(PYTHON, "-c", CHILD_BURSTS, store_url)
             for _ in range(2)]
    mine = 0
    while any(p.returncode is None for p in procs) or mine < 200:
        await asyncio.gather(*(store.append_event(ev("parent")) for _ in range(10)))
        mine += 10
        await asyncio.sleep(0.001)
    assert [await p.wait() for p in procs] == [0, 0]
    events = await store.list_events(limit=100_000)
    assert sum(e.kind == "child" for e in events) == 800
    assert sum(e.kind == "parent" for e in events) == mine
    assert len({e.seq for e in events}) == len(events)


# -- two control planes on one store --------------------------------------------------------
async def test_two_stores_racing_record_revision_get_distinct_numbers(
        store: StateStore, store_url: str) -> None:
    await store.put_stack(StackRecord("s", {}))
    async with open_store(store_url) as other:
        results = await asyncio.gather(*(
            s.record_revision("s", "api", {"v": f"{tag}{i}"}, f"{tag}{i}")
            for i in range(25) for s, tag in ((store, "a"), (other, "b"))))
    assert sorted(r.revision for r in results) == list(range(1, 51))  # none lost or shared
    listed = await store.list_revisions("s", "api")
    assert [(r.revision, r.spec_hash) for r in listed] == sorted(
        (r.revision, r.spec_hash) for r in results)
    [service] = await store.list_services("s")
    assert (service.revision, service.spec_hash) == (50, listed[-1].spec_hash)


async def test_two_stores_racing_append_event_get_distinct_increasing_seqs(
        store: StateStore, store_url: str) -> None:
    async def bursts(s: StateStore, tag: str) -> list[list[int]]:
        out = []
        for i in range(10):
            got = await asyncio.gather(*(s.append_event(ev(tag, data={"i": i * 10 + j}))
                                         for j in range(10)))
            out.append([e.seq for e in got])
        return out  # type: ignore[return-value]

    async with open_store(store_url) as other:
        mine, theirs = await asyncio.gather(bursts(store, "a"), bursts(other, "b"))
    for runs in (mine, theirs):
        for before, after in itertools.pairwise(runs):
            assert max(before) < min(after)  # each store's later appends come later
    seqs = [seq for runs in (mine, theirs) for run in runs for seq in run]
    assert len(set(seqs)) == 200
    events = await store.list_events(limit=1000)
    assert [e.seq for e in events] == sorted(seqs)
    assert sorted((e.kind, e.data["i"]) for e in events) == sorted(
        (tag, i) for tag in "ab" for i in range(100))
    assert await store.last_event_seq() == max(seqs)
