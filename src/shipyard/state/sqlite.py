"""The default state store: one SQLite file (see sqlite_db.py for how it is driven).

Every method is one statement or a few in a savepoint, run on the event loop's thread;
writes are durable against kill -9 when they return (WAL, synchronous=NORMAL; a power loss
may lose the last transactions). Events are never pruned by the store itself: call
`prune_events(keep)` to keep only the newest `keep`. Sequence numbers are never reused.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from typing import Any

from shipyard.errors import NotFoundError
from shipyard.state import sqlite_schema as q
from shipyard.state.base import (
    Event,
    InstanceRecord,
    OperationRecord,
    OpState,
    RevisionRecord,
    ServiceRecord,
    StackRecord,
    StateStore,
)
from shipyard.state.sqlite_db import SQLiteDatabase

_WATCH_BATCH = 500


class SQLiteStore(SQLiteDatabase, StateStore):
    """State in one SQLite file (created with mode 0600, its folder with 0700).

    `SQLiteStore(path, *, busy_timeout=5.0, poll_interval=0.2, group_commit=True,
    fsync=False)`: see SQLiteDatabase for the options.
    """

    # -- stacks ---------------------------------------------------------------------------
    async def put_stack(self, record: StackRecord) -> None:
        """Insert or update; an update keeps the stored `created_at`."""
        await self._write(self._exec, q.PUT_STACK, q.stack_row(record))

    async def get_stack(self, name: str) -> StackRecord | None:
        rows = await self._fetch(q.GET_STACK, (name,))
        return q.stack_record(rows[0]) if rows else None

    async def list_stacks(self) -> list[StackRecord]:
        return [q.stack_record(r) for r in await self._fetch(q.LIST_STACKS, ())]

    async def delete_stack(self, name: str) -> None:
        """Remove the stack, its services, revisions and instances (events stay)."""
        await self._write(self._exec, q.DELETE_STACK, (name,))

    # -- services and revisions -----------------------------------------------------------
    async def record_revision(self, stack: str, service: str, spec: dict[str, Any],
                              spec_hash: str) -> RevisionRecord:
        """New revision = max+1 for (stack, service) when `spec_hash` differs from the
        current one. Raises NotFoundError if the stack was never put."""
        return await self._write(self._record_revision, stack, service, spec, spec_hash)

    def _record_revision(self, db: sqlite3.Connection, stack: str, service: str,
                         spec: dict[str, Any], spec_hash: str) -> RevisionRecord:
        current = self._exec(db, q.GET_SERVICE, (stack, service)).fetchone()
        if current is not None and current[3] == spec_hash:
            row = self._exec(db, q.GET_REVISION, (stack, service, current[2])).fetchone()
            if row is not None:
                return q.revision_record(row)
        last = self._exec(db, q.MAX_REVISION, (stack, service)).fetchone()[0]
        record = RevisionRecord(stack, service, (last or 0) + 1, spec, spec_hash)
        row = q.revision_row(record)
        with self._savepoint(db):
            self._put_child(db, q.PUT_SERVICE, (stack, service, record.revision, spec_hash),
                            stack)
            self._exec(db, q.INSERT_REVISION, row)
        return record

    async def list_services(self, stack: str) -> list[ServiceRecord]:
        return [q.service_record(r) for r in await self._fetch(q.LIST_SERVICES, (stack,))]

    async def delete_service(self, stack: str, service: str) -> None:
        """Remove the service, its revisions and its instances."""
        await self._write(self._delete_service, stack, service)

    def _delete_service(self, db: sqlite3.Connection, stack: str, service: str) -> None:
        with self._savepoint(db):
            self._exec(db, q.DELETE_SERVICE, (stack, service))
            self._exec(db, q.DELETE_SERVICE_INSTANCES, (stack, service))

    async def get_revision(self, stack: str, service: str,
                           revision: int) -> RevisionRecord | None:
        rows = await self._fetch(q.GET_REVISION, (stack, service, revision))
        return q.revision_record(rows[0]) if rows else None

    async def list_revisions(self, stack: str, service: str) -> list[RevisionRecord]:
        rows = await self._fetch(q.LIST_REVISIONS, (stack, service))
        return [q.revision_record(r) for r in rows]

    async def set_revision_outcome(self, stack: str, service: str, revision: int,
                                   outcome: str) -> None:
        """Raises NotFoundError if there is no such revision."""
        await self._write(self._set_outcome, stack, service, revision, outcome)

    def _set_outcome(self, db: sqlite3.Connection, stack: str, service: str, revision: int,
                     outcome: str) -> None:
        if self._exec(db, q.SET_OUTCOME, (outcome, stack, service, revision)).rowcount == 0:
            raise NotFoundError(f"no revision {revision} of service {service!r} "
                                f"in stack {stack!r}")

    # -- instances ------------------------------------------------------------------------
    async def put_instance(self, record: InstanceRecord) -> None:
        """Insert or replace, keyed by (stack, instance). Raises NotFoundError if the
        stack was never put."""
        await self._write(self._put_child, q.PUT_INSTANCE, q.instance_row(record),
                          record.stack)

    async def record_instances(
            self, changes: Sequence[tuple[InstanceRecord, Event | None]]) -> None:
        """Put the records and append their events as one write (one savepoint in the
        current batch: all of them, or none); sets each event's `seq`."""
        if not changes:
            return
        rows = [q.instance_row(record) for record, _ in changes]
        events = [event for _, event in changes if event is not None]
        stacks = sorted({record.stack for record, _ in changes})
        seqs = await self._write(self._record_instances, rows,
                                 [q.event_row(e) for e in events], ", ".join(stacks))
        for event, seq in zip(events, seqs, strict=True):
            event.seq = seq

    def _record_instances(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]],
                          event_rows: list[tuple[Any, ...]], stacks: str) -> list[int]:
        with self._savepoint(db):
            self._put_child(db, q.PUT_INSTANCE, rows, stacks, many=True)
            seqs = [self._append_event(db, row) for row in event_rows]
        return seqs

    def _put_child(self, db: sqlite3.Connection, sql: str, row: Any,
                   stack: str, *, many: bool = False) -> None:
        try:
            if many:
                db.executemany(sql, row)
            else:
                db.execute(sql, row)
        except sqlite3.IntegrityError as exc:
            if "FOREIGN KEY" not in str(exc):
                raise self._error(exc) from None
            raise NotFoundError(f"stack {stack!r} is not in the state store",
                                hint="put the stack before its services and instances"
                                ) from None
        except sqlite3.Error as exc:
            self._check_batch()
            raise self._error(exc) from None

    async def get_instance(self, stack: str, instance: str) -> InstanceRecord | None:
        rows = await self._fetch(q.GET_INSTANCE, (stack, instance))
        return q.instance_record(rows[0]) if rows else None

    async def list_instances(self, stack: str | None = None,
                             service: str | None = None) -> list[InstanceRecord]:
        where, params = _filters(stack=stack, service=service)
        sql = q.LIST_INSTANCES + (" WHERE " + " AND ".join(where) if where else "")
        rows = await self._fetch(sql + q.INSTANCES_ORDER, params)
        return [q.instance_record(r) for r in rows]

    async def delete_instance(self, stack: str, instance: str) -> None:
        await self._write(self._exec, q.DELETE_INSTANCE, (stack, instance))

    # -- events ---------------------------------------------------------------------------
    async def append_event(self, event: Event) -> Event:
        """Append to the log; sets `event.seq` and returns the same object."""
        event.seq = await self._write(self._append_event, q.event_row(event))
        return event

    def _append_event(self, db: sqlite3.Connection, row: tuple[Any, ...]) -> int:
        seq = self._exec(db, q.INSERT_EVENT, row).lastrowid
        self._batch_events = True
        assert seq is not None
        return seq

    async def list_events(self, *, after: int = 0, limit: int = 1000,
                          stack: str | None = None, service: str | None = None,
                          ) -> list[Event]:
        """Events with seq > after, oldest first."""
        where, params = _filters(stack=stack, service=service)
        sql = q.LIST_EVENTS + "".join(" AND " + w for w in where) + " ORDER BY seq LIMIT ?"
        rows = await self._fetch(sql, (after, *params, limit))
        return [q.event_record(r) for r in rows]

    async def prune_revisions(self, stack: str, service: str, keep: int) -> int:
        return await self._write(self._prune_revisions, stack, service, keep)

    def _prune_revisions(self, db: sqlite3.Connection, stack: str, service: str,
                         keep: int) -> int:
        cursor = self._exec(db, (
            "DELETE FROM revisions WHERE stack = ? AND service = ? AND revision NOT IN "
            "(SELECT revision FROM revisions WHERE stack = ? AND service = ? "
            " ORDER BY revision DESC LIMIT ?) AND revision NOT IN "
            "(SELECT revision FROM services WHERE stack = ? AND name = ?)"),
            (stack, service, stack, service, max(keep, 0), stack, service))
        return cursor.rowcount

    # -- operations -------------------------------------------------------------------------
    async def put_operation(self, op: OperationRecord) -> OperationRecord:
        op.id = await self._write(self._put_operation, q.op_row(op))
        return op

    def _put_operation(self, db: sqlite3.Connection, row: tuple[Any, ...]) -> int:
        op_id = self._exec(db, q.PUT_OP, row).lastrowid
        assert op_id is not None
        return op_id if row[0] is None else row[0]

    async def get_operation(self, op_id: int) -> OperationRecord | None:
        rows = await self._fetch(q.GET_OP, (op_id,))
        return q.op_record(rows[0]) if rows else None

    async def list_operations(self, *, states: tuple[OpState, ...] | None = None,
                              stack: str | None = None,
                              limit: int = 1000) -> list[OperationRecord]:
        sql, params = q.LIST_OPS, []
        if states is not None:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            params += [str(s) for s in states]
        if stack is not None:
            sql += " AND stack = ?"
            params.append(stack)
        sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id"
        rows = await self._fetch(sql, (*params, limit))
        return [q.op_record(r) for r in rows]

    async def last_event_seq(self) -> int:
        rows = await self._fetch("SELECT coalesce(max(seq), 0) FROM events", ())
        return int(rows[0][0])

    async def watch_events(self, *, after: int = 0,
                           stack: str | None = None) -> AsyncIterator[Event]:
        """Every event with seq > after, then each new one as it is appended. Appends by
        this store wake watchers at once; other processes' appends are seen within
        `poll_interval`. Ends when the store is closed."""
        last = after
        while True:
            signal = self._event_signal
            batch = await self.list_events(after=last, limit=_WATCH_BATCH, stack=stack)
            for event in batch:
                assert event.seq is not None
                last = event.seq
                yield event
            if self._db is None:
                return
            if len(batch) < _WATCH_BATCH and signal is not None and not signal.done():
                await asyncio.wait((signal,), timeout=self.poll_interval)
                if self._db is None:
                    return

    async def prune_events(self, keep: int) -> int:
        """Delete all but the newest `keep` events; returns how many were deleted. The
        store never prunes by itself: call this on a schedule to bound the log."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        if keep == 0:
            cursor = await self._write(self._exec, "DELETE FROM events", ())
        else:
            cursor = await self._write(self._exec, q.PRUNE_EVENTS, (keep - 1,))
        return max(cursor.rowcount, 0)


def _filters(**columns: str | None) -> tuple[list[str], list[str]]:
    where = [f"{name} = ?" for name, value in columns.items() if value is not None]
    return where, [value for value in columns.values() if value is not None]
