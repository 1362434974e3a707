"""The operation queue with a real SQLite store: order, serialization, limits, overload,
timeouts, and what a new control plane does with the operations its predecessor left."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.engine.operations import OperationQueue, conflicts
from shipyard.errors import Busy
from shipyard.state.base import Event, OperationRecord, OpState
from shipyard.state.sqlite import SQLiteStore


class Recorder:
    """Handlers that record when they run, and block until released."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.running: set[str] = set()
        self.peak = 0
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, label: str) -> asyncio.Event:
        return self.gates.setdefault(label, asyncio.Event())

    async def handle(self, op: OperationRecord) -> dict[str, Any]:
        label = op.payload["label"]
        self.log.append(label)
        self.running.add(label)
        self.peak = max(self.peak, len(self.running))
        try:
            await self.gate(label).wait()
        finally:
            self.running.discard(label)
        return {"ok": True, "label": label}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(tmp_path / "state.db") as s:
        yield s


def op(label: str, stack: str = "s", service: str | None = None, priority: int = 2,
       **kw: Any) -> OperationRecord:
    return OperationRecord("work", stack, service=service, priority=priority,
                           payload={"label": label}, **kw)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def make_queue(store: SQLiteStore, rec: Recorder, **kw: Any) -> OperationQueue:
    events: list[Event] = []

    async def emit(e: Event) -> None:
        events.append(e)
        await store.append_event(e)

    queue = OperationQueue(store, emit=emit, **kw)
    queue.register("work", rec.handle, resumable=True)
    return queue


async def test_priority_then_fifo_and_per_service_serialization(store: SQLiteStore) -> None:
    rec = Recorder()
    queue = await make_queue(store, rec)
    # submitted before the dispatcher runs: it then picks by priority, FIFO within one
    for o in [op("low", service="a", priority=3), op("n1", service="b"),
              op("crit", service="c", priority=0), op("n2", service="b"),
              op("stackwide", stack="t"), op("t-svc", stack="t", service="x")]:
        await queue.submit(o)
    await queue.start()
    await settle()
    # n2 waits for n1 (same service); t-svc waits for the stack-wide operation on t
    assert rec.log == ["crit", "n1", "stackwide", "low"]
    rec.gate("n1").set()
    rec.gate("stackwide").set()
    await settle()
    assert rec.log[4:] == ["n2", "t-svc"]
    for label in ("crit", "n2", "t-svc", "low"):
        rec.gate(label).set()
    await settle()
    done = await store.list_operations()
    assert all(o.state is OpState.SUCCEEDED for o in done)
    await queue.close()


async def test_global_concurrency_limit(store: SQLiteStore) -> None:
    rec = Recorder()
    queue = await make_queue(store, rec, max_concurrent=3)
    await queue.start()
    ops = [await queue.submit(op(f"o{i}", service=f"svc{i}")) for i in range(8)]
    await settle()
    assert len(rec.running) == 3
    for i in range(8):
        rec.gate(f"o{i}").set()
        await settle()
    finished = [await queue.wait(o.id or 0) for o in ops]
    assert rec.peak == 3 and all(o.state is OpState.SUCCEEDED for o in finished)
    await queue.close()


async def test_overload_refuses_low_priority_first(store: SQLiteStore) -> None:
    rec = Recorder()
    queue = await make_queue(store, rec, max_queued=4)  # not started: everything waits
    await queue.submit(op("a", service="1"))
    await queue.submit(op("b", service="2"))
    with pytest.raises(Busy, match="low-priority work is refused"):
        await queue.submit(op("c", service="3", priority=3))
    await queue.submit(op("d", service="4"))
    await queue.submit(op("e", service="5"))
    with pytest.raises(Busy, match="normal-priority"):
        await queue.submit(op("f", service="6"))
    await queue.submit(op("g", service="7", priority=0))  # critical is always taken
    assert len(await store.list_operations()) == 5  # refused ones were never persisted


async def test_timeout_fails_the_operation(store: SQLiteStore) -> None:
    rec = Recorder()
    queue = await make_queue(store, rec)
    await queue.start()
    o = await queue.submit(op("slow", timeout=0.1))
    done = await queue.wait(o.id or 0)
    assert done.state is OpState.FAILED and done.error == "timed out after 0.1s"
    await queue.close()


async def test_a_new_control_plane_resumes_or_fails_what_was_left(
        store: SQLiteStore) -> None:
    rec = Recorder()
    first = await make_queue(store, rec)
    first.register("once", rec.handle, resumable=False)
    await first.start()
    resumable = await first.submit(op("resume-me", service="a"))
    unsafe = await first.submit(OperationRecord("once", "s", service="b",
                                                payload={"label": "unsafe"}))
    waiting = await first.submit(op("queued", service="a"))
    await settle()
    assert sorted(rec.running) == ["resume-me", "unsafe"]
    await first.close()  # as if the process died: running ones stay `running`
    states = {o.id: o.state for o in await store.list_operations()}
    assert states[resumable.id] is OpState.RUNNING and states[waiting.id] is OpState.QUEUED

    rec2 = Recorder()
    second = await make_queue(store, rec2)
    second.register("once", rec2.handle, resumable=False)
    await second.start()
    await settle()
    assert rec2.log == ["resume-me"]  # resumed first; `queued` waits for it (service a)
    rec2.gate("resume-me").set()
    rec2.gate("queued").set()
    await settle()
    final = {o.id: o for o in await store.list_operations()}
    assert final[resumable.id].state is OpState.SUCCEEDED
    assert final[resumable.id].attempts == 2
    assert final[waiting.id].state is OpState.SUCCEEDED
    assert final[unsafe.id].state is OpState.FAILED
    assert "not safe to run twice" in final[unsafe.id].error
    assert "unsafe" not in rec2.log  # never run twice
    kinds = [e.kind for e in await store.list_events()]
    assert "op.resumed" in kinds and "op.failed" in kinds
    await second.close()


async def test_cancel_supersedes_queued_and_running(store: SQLiteStore) -> None:
    rec = Recorder()
    queue = await make_queue(store, rec)
    queue.register("apply", rec.handle, resumable=True)
    await queue.start()
    running = await queue.submit(OperationRecord("apply", "s", payload={"label": "r"}))
    queued = await queue.submit(OperationRecord("apply", "s", payload={"label": "q"}))
    await settle()
    await queue.cancel(stack="s", kinds=("apply",))
    final = {o.id: o.state for o in await store.list_operations()}
    assert final[running.id] is OpState.CANCELLED and final[queued.id] is OpState.CANCELLED
    assert rec.log == ["r"]
    await queue.close()


def test_conflicts() -> None:
    assert conflicts(op("a", service="x"), op("b", service="x"))
    assert not conflicts(op("a", service="x"), op("b", service="y"))
    assert conflicts(op("a"), op("b", service="y"))
    assert not conflicts(op("a", stack="s1"), op("b", stack="s2"))
