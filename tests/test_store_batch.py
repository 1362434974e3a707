"""Many instances' transitions at the cost of one write: `StateStore.record_instances`
(SQLite and etcd, the contract of tests/test_store.py) and the engine's writer that
batches the transitions made at the same moment (engine/transitions.py), as a `down` of
many instances does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shipyard.engine.transitions import TransitionWriter, writer_for
from shipyard.errors import NotFoundError, StoreError
from shipyard.state.base import Event, InstanceState, StackRecord, StateStore
from shipyard.state.etcd import EtcdStore
from tests.test_store import ev, inst, store, store_url  # noqa: F401 (fixtures)


async def test_record_instances_puts_all_in_order(store: StateStore) -> None:  # noqa: F811
    await store.put_stack(StackRecord("s", {}))
    changes = [(inst("s", f"api-{i}", i, state=InstanceState.STOPPING), None)
               for i in range(3)]
    await store.record_instances(changes)
    assert [r.state for r in await store.list_instances("s")] == [InstanceState.STOPPING] * 3
    events = [ev("instance.stopped", instance=f"api-{i}") for i in range(3)]
    await store.record_instances([(inst("s", f"api-{i}", i, state=InstanceState.STOPPED),
                                   events[i] if i != 1 else None) for i in range(3)])
    assert [r.state for r in await store.list_instances("s")] == [InstanceState.STOPPED] * 3
    seqs = [e.seq for e in events if e is not events[1]]
    assert None not in seqs and seqs == sorted(seqs)
    logged = [(e.kind, e.instance, e.seq) for e in await store.list_events(stack="s")]
    assert logged == [("instance.stopped", "api-0", seqs[0]),
                      ("instance.stopped", "api-2", seqs[1])]
    await store.record_instances([])


async def test_record_instances_more_than_one_etcd_transaction_holds(
        store: StateStore) -> None:  # noqa: F811
    """300 changes are 600 writes: etcd splits them (128 operations a transaction)."""
    await store.put_stack(StackRecord("s", {}))
    events = [ev("instance.stopped", instance=f"api-{i}") for i in range(300)]
    await store.record_instances([(inst("s", f"api-{i}", i, state=InstanceState.STOPPED),
                                   events[i]) for i in range(300)])
    assert len(await store.list_instances("s")) == 300
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + 300))  # contiguous, in the given order
    assert [e.instance for e in await store.list_events(stack="s", limit=500)] == [
        f"api-{i}" for i in range(300)]


async def test_record_instances_of_a_missing_stack_writes_nothing(
        store: StateStore) -> None:  # noqa: F811
    await store.put_stack(StackRecord("s", {}))
    with pytest.raises(NotFoundError):
        await store.record_instances([(inst("s", "api-1"), ev("instance.stopped")),
                                      (inst("gone", "api-1"), ev("instance.stopped"))])
    assert await store.list_instances() == []
    assert await store.list_events() == []


async def test_record_instances_joins_an_open_transaction(store: StateStore) -> None:  # noqa: F811
    await store.put_stack(StackRecord("s", {}))
    with pytest.raises(RuntimeError):
        async with store.transaction():
            await store.record_instances([(inst("s", "api-1"), ev("instance.stopped"))])
            raise RuntimeError("roll back")
    assert await store.list_instances() == [] and await store.list_events() == []


# -- the engine's writer ----------------------------------------------------------------
class _Counting:
    """A store wrapper counting record_instances calls (and failing on demand)."""

    def __init__(self, inner: StateStore) -> None:
        self.store = inner
        self.calls: list[int] = []
        self.fail: Exception | None = None

    async def record_instances(self, changes: Any) -> None:
        self.calls.append(len(changes))
        if self.fail is not None:
            raise self.fail
        await self.store.record_instances(changes)


async def test_writer_batches_what_is_written_at_once(store: StateStore) -> None:  # noqa: F811
    await store.put_stack(StackRecord("s", {}))
    counting = _Counting(store)
    writer = TransitionWriter(counting)  # type: ignore[arg-type]
    records = [inst("s", f"api-{i}", i, state=InstanceState.STOPPING) for i in range(50)]
    await asyncio.gather(*(writer.write(r, None) for r in records))
    assert counting.calls == [50]  # one write for the fifty
    # Changed after its write: what was written is the state at write time.
    records[0].state = InstanceState.FAILED
    got = await store.get_instance("s", "api-0")
    assert got is not None and got.state is InstanceState.STOPPING
    # A change arriving while a write is in flight goes in the next batch.
    first = asyncio.ensure_future(writer.write(inst("s", "api-0", 0), ev("a")))
    await asyncio.sleep(0)
    rest = [writer.write(inst("s", f"api-{i}", i), ev("b")) for i in range(1, 4)]
    await asyncio.gather(first, *rest)
    assert sum(counting.calls[1:]) == 4 and len(counting.calls) <= 3
    # Errors reach every caller of the batch.
    counting.fail = StoreError("injected")
    results = await asyncio.gather(*(writer.write(r, None) for r in records[:3]),
                                   return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)


async def test_writer_fails_only_the_changes_of_a_missing_stack(
        store: StateStore) -> None:  # noqa: F811
    await store.put_stack(StackRecord("s", {}))
    writer = TransitionWriter(store)
    results = await asyncio.gather(
        writer.write(inst("s", "api-1"), ev("instance.stopped", instance="api-1")),
        writer.write(inst("gone", "api-1"), ev("instance.stopped", stack="gone")),
        writer.write(inst("s", "api-2"), ev("instance.stopped", instance="api-2")),
        return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], NotFoundError)
    assert [r.instance for r in await store.list_instances("s")] == ["api-1", "api-2"]
    assert [e.instance for e in await store.list_events()] == ["api-1", "api-2"]


async def test_writer_never_writes_into_a_callers_transaction(
        store: StateStore) -> None:  # noqa: F811
    """The writer's task does not inherit the transaction of the caller that started it:
    the caller's rollback does not take the change back."""
    if isinstance(store, EtcdStore):
        pytest.skip("etcd transactions are buffers, a write from inside one is not a case")
    await store.put_stack(StackRecord("s", {}))
    writer = TransitionWriter(store)
    tasks: list[asyncio.Future[None]] = []
    with pytest.raises(RuntimeError):
        async with store.transaction():
            tasks.append(asyncio.ensure_future(writer.write(inst("s", "api-1"), None)))
            await asyncio.sleep(0.05)  # the writer runs meanwhile (and waits its turn)
            raise RuntimeError("roll back the caller's transaction")
    await tasks[0]
    assert [r.instance for r in await store.list_instances("s")] == ["api-1"]


async def test_down_of_many_instances_writes_in_few_batches(engine: Any,
                                                            tmp_path: Path) -> None:
    from shipyard.spec.models import Stack
    from tests.conftest import port_range

    stack = Stack.model_validate({
        "name": "t", "ports": {"range": port_range()}, "base_dir": str(tmp_path),
        "services": {"a": {"command": ["/bin/sleep", "60"], "replicas": 30,
                           "stop": {"timeout": "5s"}}}})
    assert (await engine.apply(stack)).ok
    writer = writer_for(engine.store)
    before = writer.batches
    await engine.down("t")
    # 30 stopping + 30 stopped changes: a handful of writes, not sixty
    assert writer.batches - before <= 12
    events = await engine.store.list_events(stack="t", limit=1000)
    stopped = [e for e in events if e.kind == "instance.stopped"]
    assert sorted(e.instance for e in stopped) == sorted(f"a-{i}" for i in range(1, 31))
    assert all(isinstance(e, Event) and e.data["state"] == "stopped" for e in stopped)
    assert "stack.down" in [e.kind for e in events[-3:]]
