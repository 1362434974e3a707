"""The operations part of the store contract, on every backend of test_store.py."""

from __future__ import annotations

import pytest

from shipyard.state.base import OperationRecord, OpState, StateStore
from tests.test_store import store, store_url  # noqa: F401  (fixtures, every backend)

pytestmark = pytest.mark.usefixtures("store")


async def test_operations_round_trip_and_ids_increase(store: StateStore) -> None:  # noqa: F811
    a = await store.put_operation(OperationRecord("apply", "s", payload={"x": [1, 2]},
                                                  priority=1, timeout=30.0))
    b = await store.put_operation(OperationRecord("restart", "s", service="api"))
    assert a.id is not None and b.id is not None and b.id > a.id
    got = await store.get_operation(a.id)
    assert got == a
    a.state, a.checkpoint, a.attempts = OpState.RUNNING, {"done": ["db"]}, 1
    await store.put_operation(a)
    got = await store.get_operation(a.id)
    assert got is not None and got.state is OpState.RUNNING and got.checkpoint == {"done": ["db"]}
    assert await store.get_operation(10_000) is None


async def test_list_operations_filters_and_orders(store: StateStore) -> None:  # noqa: F811
    ops = [await store.put_operation(OperationRecord("apply", stack, state=state))
           for stack, state in [("a", OpState.QUEUED), ("b", OpState.RUNNING),
                                ("a", OpState.SUCCEEDED), ("a", OpState.QUEUED)]]
    ids = [o.id for o in ops]
    assert [o.id for o in await store.list_operations()] == ids
    queued = await store.list_operations(states=(OpState.QUEUED, OpState.RUNNING))
    assert [o.id for o in queued] == [ids[0], ids[1], ids[3]]
    assert [o.id for o in await store.list_operations(stack="a")] == [ids[0], ids[2], ids[3]]
    assert [o.id for o in await store.list_operations(limit=2)] == ids[2:]


async def test_operation_writes_join_a_transaction(store: StateStore) -> None:  # noqa: F811
    with pytest.raises(RuntimeError):
        async with store.transaction():
            await store.put_operation(OperationRecord("down", "s"))
            raise RuntimeError("rolled back")
    assert await store.list_operations() == []
