"""etcd store specifics: the URL, errors naming the endpoints, the key layout, namespaces,
event retention, conflicts inside transactions, watching without polling, and a
3-member cluster that loses a member. The shared contract is in test_store.py."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator

import pytest
from etcd3aio import Etcd3Client

from shipyard.engine.config import EngineConfig
from shipyard.errors import InputError, StoreError
from shipyard.state.base import Event, InstanceRecord, StackRecord
from shipyard.state.etcd import EtcdStore
from shipyard.state.etcd_keys import prefix_end
from shipyard.state.factory import open_store
from tests.etcd_cluster import EtcdCluster, etcd_server, unique_url  # noqa: F401
from tests.test_store import collect, ev

pytestmark = pytest.mark.usefixtures("etcd_server")


@pytest.fixture
async def store(request: pytest.FixtureRequest) -> AsyncIterator[EtcdStore]:
    s = open_store(unique_url(request.config))
    assert isinstance(s, EtcdStore)
    await s.open()
    yield s
    await s.close()




def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the URL --------------------------------------------------------------------------------
def test_open_store_parses_etcd_urls() -> None:
    s = open_store("etcd://10.0.0.1:2379,etcd-b:2380/prod?timeout=2.5&max_txn_ops=512")
    assert isinstance(s, EtcdStore)
    assert (s.endpoints, s.cluster) == (["10.0.0.1:2379", "etcd-b:2380"], "prod")
    assert s._conn.timeout == 2.5 and s._committer.max_ops == 512
    s = open_store("etcd://localhost")
    assert isinstance(s, EtcdStore)
    assert (s.endpoints, s.cluster, s.url) == (["localhost:2379"], "default",
                                               "etcd://localhost:2379/default")


@pytest.mark.parametrize(("url", "says"), [
    ("etcd://", "names no etcd endpoint"),
    ("etcd://h:port", "not host:port"),
    ("etcd://[::1]:2379", "IPv6"),
    ("etcd://h:2379/bad name", "cluster name"),
    ("etcd://h:2379/a/b", "cluster name"),
    ("etcd://h:2379?colour=red", "unknown option 'colour'"),
    ("etcd://h:2379?timeout=-1", "positive float"),
])
def test_open_store_rejects_bad_etcd_urls(url: str, says: str) -> None:
    with pytest.raises(InputError, match=says):
        open_store(url)


def test_shipyard_store_variable_chooses_the_store(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: object) -> None:
    monkeypatch.setenv("SHIPYARD_STORE", "etcd://127.0.0.1:2379/ci")
    assert EngineConfig(home=str(tmp_path)).store_url == "etcd://127.0.0.1:2379/ci"
    monkeypatch.delenv("SHIPYARD_STORE")
    config = EngineConfig(home=str(tmp_path))
    assert config.store_url == str(config.home / "state.db")


# -- errors ---------------------------------------------------------------------------------
async def test_unreachable_etcd_is_one_store_error_naming_the_endpoints() -> None:
    ports = [unused_port(), unused_port()]
    store = open_store(f"etcd://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}")
    t0 = time.monotonic()
    with pytest.raises(StoreError) as info:
        await store.open()
    assert time.monotonic() - t0 < 4
    text = info.value.render()
    assert f"etcd at 127.0.0.1:{ports[0]},127.0.0.1:{ports[1]} is unreachable" in text
    assert "\n" not in text and "check that etcd runs" in text
    with pytest.raises(StoreError, match="is not open"):
        await store.list_stacks()


async def test_silent_etcd_is_a_timeout_store_error() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        store = open_store(f"etcd://127.0.0.1:{port}?timeout=0.5")
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=rf"127\.0\.0\.1:{port} (did not answer within "
                                             r"0\.5s|is unreachable)"):
            await store.open()
        assert time.monotonic() - t0 < 3


async def test_a_transaction_too_large_for_etcd_writes_nothing(store: EtcdStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    with pytest.raises(StoreError, match=r"200 writes is more than one etcd transaction "
                                         r"may hold \(128 operations\)"):
        async with store.transaction():
            for i in range(200):
                await store.put_instance(InstanceRecord("s", "api", f"api-{i}", i, 1))
    assert await store.list_instances() == []


async def test_a_stack_deleted_by_another_writer_fails_put_instance(store: EtcdStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    await store.put_instance(InstanceRecord("s", "api", "api-0", 0, 1))  # caches "s exists"
    async with EtcdStore(store.endpoints, store.cluster) as other:
        await other.delete_stack("s")
    from shipyard.errors import NotFoundError
    with pytest.raises(NotFoundError, match="stack 's' is not in the state store"):
        await store.put_instance(InstanceRecord("s", "api", "api-1", 1, 1))
    assert await store.list_instances() == []


async def test_a_read_modify_write_raced_inside_a_transaction_fails_it(
        store: EtcdStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    await store.record_revision("s", "api", {"v": 1}, "h1")
    async with EtcdStore(store.endpoints, store.cluster) as other:
        with pytest.raises(StoreError, match="changed meanwhile by another writer"):
            async with store.transaction():
                mine = await store.record_revision("s", "api", {"v": 2}, "h2")
                assert mine.revision == 2
                await store.append_event(ev("mine"))
                theirs = await other.record_revision("s", "api", {"v": 3}, "h3")
                assert theirs.revision == 2
    assert [(r.revision, r.spec_hash) for r in await store.list_revisions("s", "api")] == [
        (1, "h1"), (2, "h3")]
    assert await store.list_events() == []  # nothing of the failed transaction landed


# -- layout and namespaces ------------------------------------------------------------------
async def test_keys_are_namespaced_json(store: EtcdStore) -> None:
    await store.put_stack(StackRecord("web/app", {"name": "web/app"}))
    await store.record_revision("web/app", "api", {"image": "a:1"}, "h1")
    await store.put_instance(InstanceRecord("web/app", "api", "api-0", 0, 1, ports={"http": 1}))
    await store.append_event(ev("one", stack="web/app"))
    root = f"/shipyard/{store.cluster}/"
    async with Etcd3Client(store.endpoints) as raw:
        assert raw.kv is not None
        resp = await raw.kv.get(root, prefix_end(root.encode()))
        found = {kv.key.decode()[len(root):]: json.loads(kv.value) for kv in resp.kvs}
    assert set(found) == {
        "meta", "stacks/web%2Fapp", "services/web%2Fapp/api",
        "revisions/web%2Fapp/api/0000000001", "instances/web%2Fapp/api-0",
        "events/00000000000000000001", "counters/events"}
    assert found["meta"] == {"layout": 1}
    assert found["services/web%2Fapp/api"]["revision"] == 1
    assert found["instances/web%2Fapp/api-0"]["ports"] == {"http": 1}
    assert found["events/00000000000000000001"]["kind"] == "one"
    assert found["counters/events"] == 1


async def test_clusters_do_not_see_each_other(store: EtcdStore) -> None:
    await store.put_stack(StackRecord("s", {}))
    await store.append_event(ev("mine"))
    async with EtcdStore(store.endpoints, store.cluster + "-other") as other:
        assert await other.list_stacks() == [] and await other.list_events() == []
        assert (await other.append_event(ev("theirs"))).seq == 1
    assert [e.kind for e in await store.list_events()] == ["mine"]


# -- events ---------------------------------------------------------------------------------
async def test_prune_events_keeps_the_newest_and_never_reuses_seqs(store: EtcdStore) -> None:
    assert await store.last_event_seq() == 0
    for i in range(20):
        await store.append_event(ev(f"e{i}"))
    assert await store.prune_events(5) == 15
    assert [e.kind for e in await store.list_events()] == [f"e{i}" for i in range(15, 20)]
    assert await store.prune_events(5) == 0
    assert (await store.append_event(ev("next"))).seq == 21
    assert await store.prune_events(0) == 6 and await store.list_events() == []
    assert await store.last_event_seq() == 0
    assert (await store.append_event(ev("after"))).seq == 22
    with pytest.raises(ValueError):
        await store.prune_events(-1)


async def test_event_seq_is_set_when_the_transaction_commits(store: EtcdStore) -> None:
    async with store.transaction():
        e = await store.append_event(ev("inside"))
        assert e.seq is None
        assert [x.kind for x in await store.list_events()] == ["inside"]  # its own, last
    assert e.seq == 1 and await store.last_event_seq() == 1


async def test_watch_follows_an_etcd_watch_without_polling(store: EtcdStore) -> None:
    await store.append_event(ev("old"))
    reads = 0
    real_range = store._conn.range

    async def counting_range(*args: object, **kw: object) -> object:
        nonlocal reads
        reads += 1
        return await real_range(*args, **kw)  # type: ignore[arg-type]

    store._conn.range = counting_range  # type: ignore[method-assign]
    got: list[Event] = []
    arrived = asyncio.Event()

    async def follow() -> None:
        async for e in store.watch_events():
            got.append(e)
            arrived.set()

    task = asyncio.create_task(follow())
    await asyncio.wait_for(arrived.wait(), 5)
    arrived.clear()
    before = reads
    await asyncio.sleep(0.5)
    assert reads == before  # idle: no reads at all
    async with EtcdStore(store.endpoints, store.cluster) as other:
        t0 = time.monotonic()
        await other.append_event(ev("new"))
        await asyncio.wait_for(arrived.wait(), 5)
        assert time.monotonic() - t0 < 0.5
    assert [e.kind for e in got] == ["old", "new"] and reads == before
    task.cancel()


async def test_closed_store_errors_and_ends_watchers(store: EtcdStore) -> None:
    watcher = asyncio.create_task(collect(store.watch_events(), 10))
    await asyncio.sleep(0.1)
    await store.close()
    assert await asyncio.wait_for(watcher, 2) == []
    with pytest.raises(StoreError, match="is not open"):
        await store.list_stacks()
    with pytest.raises(StoreError, match="is not open"):
        await store.put_stack(StackRecord("s", {}))


async def test_watch_carries_on_after_etcd_restarts() -> None:
    with EtcdCluster(1) as cluster:
        async with open_store(cluster.url()) as store:
            task = asyncio.create_task(collect(store.watch_events(), 4))
            await store.append_event(ev("a"))
            await store.append_event(ev("b"))
            await asyncio.sleep(0.2)
            cluster.kill(0)
            cluster.start_member(0)
            for kind in ("c", "d"):
                for _ in range(50):  # the client reconnects by itself
                    try:
                        await store.append_event(ev(kind))
                        break
                    except StoreError:
                        await asyncio.sleep(0.1)
            got = await asyncio.wait_for(task, 10)
            assert [e.kind for e in got] == ["a", "b", "c", "d"]
            assert [e.seq for e in got] == [1, 2, 3, 4]


# -- a 3-member cluster ---------------------------------------------------------------------
async def test_three_members_the_leader_killed_the_store_carries_on() -> None:
    with EtcdCluster(3) as cluster:
        # A write in flight when the leader dies waits for a new leader until it times
        # out (ambiguous: it may land later); then the next ones go through.
        async with open_store(cluster.url() + "?timeout=1") as store:
            await store.put_stack(StackRecord("s", {}))
            await asyncio.gather(*(store.put_instance(InstanceRecord("s", "api", f"api-{i}",
                                                                     i, 1))
                                   for i in range(50)))
            cluster.kill(cluster.leader())
            for i in range(50, 60):  # writes and reads go on with 2 of 3 members
                for _ in range(50):
                    try:
                        await store.put_instance(InstanceRecord("s", "api", f"api-{i}", i, 1))
                        break
                    except StoreError:  # a call that was on its way to the dead member
                        await asyncio.sleep(0.1)
            assert len(await store.list_instances("s")) == 60
            assert (await store.record_revision("s", "api", {}, "h")).revision == 1
