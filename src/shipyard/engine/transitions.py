"""Instance transitions written together (group commit of state changes).

Every state change of an instance is its record and (usually) an event, written before the
supervisor goes on. When many instances change at once (a `down` stops a hundred: each
goes `stopping`, then `stopped` as its process exits; a deploy starts a hundred), writing
each in a transaction of its own costs a transaction, a savepoint and an await per change
(about nine statements for SQLite, an etcd transaction each). Here a change is queued, and
whatever is queued when the writer runs — every change made in the same turn of the event
loop, and those made while the previous write was in flight — goes to the store in one
`record_instances` call: one savepoint for SQLite, as few etcd transactions as the changes
fit in. Each caller still returns only once its change is durable, with the store's error
if it failed; the order of the changes (and so the events' seqs) is the order they were
made in.

A batch refused because a stack is gone (NotFoundError: nothing of it was written) is
written again change by change, so that only the changes of that stack fail, as they did
when each was its own transaction.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import weakref

from shipyard.errors import NotFoundError
from shipyard.security.redact import redact_event
from shipyard.state.base import Event, InstanceRecord, StateStore

_Change = tuple[InstanceRecord, Event | None, "asyncio.Future[None]"]


class TransitionWriter:
    """Queues instance transitions of one store and writes them in batches."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._queue: list[_Change] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # how many store writes were made (for tests and benchmarks)

    async def write(self, record: InstanceRecord, event: Event | None) -> None:
        """Record `record` as it is now and append `event` (redacted); returns once both
        are durable, raises what the store raised."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        snapshot = dataclasses.replace(record, runtime=dict(record.runtime),
                                       ports=dict(record.ports))
        self._queue.append((snapshot, redact_event(event) if event else None, done))
        if self._task is None or self._task.done():
            # a context of its own: never inside a caller's open store transaction
            self._task = loop.create_task(self._run(), name="instance-transitions",
                                          context=contextvars.Context())
        await done

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._commit(batch)
            except BaseException:  # cancelled (the loop is closing): never leave a waiter
                for _, _, done in [*batch, *self._queue]:
                    done.cancel()
                self._queue = []
                raise

    async def _commit(self, batch: list[_Change]) -> None:
        self.batches += 1
        try:
            await self.store.record_instances([(rec, event) for rec, event, _ in batch])
        except NotFoundError as exc:
            if len(batch) == 1:
                _settle(batch[0][2], exc)
                return
            for change in batch:  # only the changes of the missing stack fail
                await self._commit([change])
            return
        except Exception as exc:
            for _, _, done in batch:
                _settle(done, exc)
            return
        for _, _, done in batch:
            _settle(done, None)


def _settle(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.done():  # its caller was cancelled: the change was written all the same
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)


_writers: weakref.WeakKeyDictionary[StateStore, TransitionWriter] = (
    weakref.WeakKeyDictionary())


def writer_for(store: StateStore) -> TransitionWriter:
    """The transition writer of `store` (one per store, made on first use, gone with it:
    the writer holds the store by a weak proxy, or the registry would keep it alive)."""
    writer = _writers.get(store)
    if writer is None:
        writer = _writers[store] = TransitionWriter(weakref.proxy(store))
    return writer
