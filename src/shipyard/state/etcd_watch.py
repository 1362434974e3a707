"""Following the etcd store's event log with an etcd watch (never by polling).

The watch on the events prefix is created first; once etcd confirms it (the `created`
answer), the events already committed are read with ordinary range reads. Every event
committed after the watch was created comes through the watch, so none is missed between
the read and the watch; duplicates are dropped by seq. Seqs are contiguous, so a jump in
the watched seqs means the watch missed some (etcd3aio reconnects a broken stream from
the last revision it saw): the gap is read again. Every reconnection (a new `created`)
also reads whatever was committed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeVar

import grpc
from etcd3aio import EtcdError

from shipyard.state import etcd_keys as k
from shipyard.state.base import Event
from shipyard.state.etcd_conn import Connection

if TYPE_CHECKING:
    from shipyard.state.etcd import EtcdStore

T = TypeVar("T")


async def watch_events(store: EtcdStore, conn: Connection, closed: asyncio.Future[None], *,
                       after: int, stack: str | None) -> AsyncIterator[Event]:
    last = after
    while not closed.done():
        try:
            stream = conn.watch(store.keys.events)
        except Exception:  # the connection is closed
            if closed.done():
                return
            raise
        try:
            async for resp in _until(stream, closed):
                if resp.created or resp.compact_revision or resp.canceled:
                    async for event in store.events_after(last):
                        assert event.seq is not None
                        last = event.seq
                        if stack is None or event.stack == stack:
                            yield event
                    if resp.canceled:
                        break  # etcd ended this watch: start another
                    continue
                for change in resp.events:
                    seq = k.Keys.number(change.kv.key)
                    if seq <= last:
                        continue
                    if seq > last + 1:  # missed some: read them
                        async for event in store.events_after(last):
                            assert event.seq is not None
                            if event.seq >= seq:
                                break
                            last = event.seq
                            if stack is None or event.stack == stack:
                                yield event
                    event = k.event_record(change.kv.key, change.kv.value)
                    last = seq
                    if stack is None or event.stack == stack:
                        yield event
        except (EtcdError, grpc.aio.AioRpcError) as exc:
            if closed.done():
                return
            raise conn.error(exc, "watching events") from None
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]


async def _until(stream: AsyncIterator[T], closed: asyncio.Future[None]) -> AsyncIterator[T]:
    """The items of `stream` until it ends or `closed` is done."""
    while not closed.done():
        nxt: asyncio.Future[T] = asyncio.ensure_future(anext(stream))
        try:
            await asyncio.wait((nxt, closed), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            nxt.cancel()
            raise
        if closed.done():
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt
            return
        try:
            item = nxt.result()
        except StopAsyncIteration:
            return
        yield item
