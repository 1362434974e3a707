"""The etcd state store: the same StateStore contract as SQLite, shared by several control
planes through an etcd cluster (`etcd://h1:2379,h2:2379[/cluster]`).

Layout: see etcd_keys.py (everything under `/shipyard/<cluster>/`, JSON values).
Commits: see etcd_tx.py (batches, CAS on mod revisions, numbers handed out at commit).
Transactions and the connection: etcd_db.py and etcd_conn.py. Watching: etcd_watch.py.

Semantics, and where they differ from SQLite's:

* Every write, and every `transaction()`, is one etcd transaction: all of it lands, or
  none. A write returns once etcd has committed it (durable on a quorum of members).
* Read-modify-writes made by the store (record_revision's max+1, put_stack keeping
  `created_at`, set_revision_outcome, delete_service's instances) compare the mod or
  create revisions they read. Outside a transaction, a lost race is retried by the call
  itself (so two control planes recording revisions at once get distinct numbers).
  Inside `transaction()`, it fails the whole transaction with StoreError ("changed
  meanwhile"; nothing written): the caller retries. Plain reads inside a transaction see
  its own writes and the latest committed data; they are not validated at commit.
* Inside `transaction()`, an appended event's `seq` and a new operation's `id` are set
  when the transaction commits (they are None until then); outside one, on return.
* Transactions of one store do not wait for each other (SQLite serializes them): their
  writes are independent unless they read-modify-write the same key.
* A transaction may hold at most `max_txn_ops` writes (etcd's --max-txn-ops, 128 by
  default) and `max_txn_bytes` bytes: more raises StoreError and writes nothing.
* Events are keys `events/<seq>`; seqs come from a counter key advanced in the same etcd
  transaction, so they are contiguous, strictly increasing in commit order and never
  reused. `prune_events(keep)` keeps the newest `keep`; nothing is pruned by itself.
* `watch_events` follows an etcd watch on the events prefix (no polling).
* Any etcd failure (unreachable, timeout, refused) is a StoreError naming the endpoints.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from shipyard.errors import NotFoundError
from shipyard.state import etcd_keys as k
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
from shipyard.state.etcd_conn import delete_op
from shipyard.state.etcd_db import EtcdDatabase
from shipyard.state.etcd_keys import Keys, prefix_end
from shipyard.state.etcd_tx import Cmp, TxState
from shipyard.state.etcd_watch import watch_events

_PAGE = 256  # events per read


class EtcdStore(EtcdDatabase, StateStore):
    """State in an etcd cluster (v3 API, etcd >= 3.4), under `/shipyard/<cluster>/`.

    `EtcdStore(endpoints, cluster="default", *, timeout=5.0, max_txn_ops=128,
    max_txn_bytes=1_000_000)`: `timeout` bounds every etcd call; the two limits must not
    exceed the server's --max-txn-ops and --max-request-bytes.
    """

    # -- stacks ---------------------------------------------------------------------------
    async def put_stack(self, record: StackRecord) -> None:
        """Insert or update; an update keeps the stored `created_at`."""
        await self._write(self._put_stack, record)

    async def _put_stack(self, tx: TxState, record: StackRecord) -> None:
        key = self.keys.stack(record.name)
        old, create, _, decided = await self._get(tx, key, f"reading stack {record.name!r}")
        data = dict(vars(record))
        if old is not None:
            data["created_at"] = k.stack_record(old).created_at
        if not decided:
            tx.cmps[Cmp(key, "create", create, what=f"stack {record.name!r}")] = None
        await self._put(tx, key, k.dumps(data))

    async def get_stack(self, name: str) -> StackRecord | None:
        self._check_open()
        value, *_ = await self._get(self._tx(), self.keys.stack(name),
                                    f"reading stack {name!r}")
        return k.stack_record(value) if value is not None else None

    async def list_stacks(self) -> list[StackRecord]:
        self._check_open()
        items, _ = await self._list(self._tx(), self.keys.stacks, "listing stacks")
        return sorted((k.stack_record(v) for _, v in items), key=lambda s: s.name)

    async def delete_stack(self, name: str) -> None:
        """Remove the stack, its services, revisions and instances (events stay)."""
        await self._write(self._delete_stack, name)
        self._stacks_seen.discard(name)

    async def _delete_stack(self, tx: TxState, name: str) -> None:
        tx.writes[self.keys.stack(name)] = None
        for prefix in self.keys.stack_children(name):
            tx.delete_prefix(prefix)

    # -- services and revisions -----------------------------------------------------------
    async def record_revision(self, stack: str, service: str, spec: dict[str, Any],
                              spec_hash: str) -> RevisionRecord:
        """New revision = current+1 for (stack, service) when `spec_hash` differs from the
        current one. Raises NotFoundError if the stack was never put."""
        return await self._write(self._record_revision, stack, service, spec, spec_hash,
                                 lock=("revision", stack, service))

    async def _record_revision(self, tx: TxState, stack: str, service: str,
                               spec: dict[str, Any], spec_hash: str) -> RevisionRecord:
        await self._require_stack(tx, stack)
        key = self.keys.service(stack, service)
        what = f"service {stack + '/' + service!r}"
        value, _, mod, decided = await self._get(tx, key, f"reading {what}")
        current = k.service_record(value) if value is not None else None
        if current is not None and current.spec_hash == spec_hash:
            rev, *_ = await self._get(tx, self.keys.revision(stack, service, current.revision),
                                      f"reading {what}")
            if rev is not None:
                return k.revision_record(rev)
        record = RevisionRecord(stack, service, (current.revision if current else 0) + 1,
                                spec, spec_hash)
        rev_key = self.keys.revision(stack, service, record.revision)
        if not decided:
            tx.cmps[Cmp(key, "mod", mod, what=what)] = None
        if not tx.lookup(rev_key)[0]:
            tx.cmps[Cmp(rev_key, "create", 0, what=f"revision {record.revision} of "
                        f"{what}")] = None
        service_rec = ServiceRecord(stack, service, record.revision, spec_hash)
        await self._put(tx, key, k.encode(service_rec))
        await self._put(tx, rev_key, k.encode(record))
        return record

    async def list_services(self, stack: str) -> list[ServiceRecord]:
        self._check_open()
        items, _ = await self._list(self._tx(), self.keys.services(stack),
                                    f"listing services of stack {stack!r}")
        return sorted((k.service_record(v) for _, v in items), key=lambda s: s.name)

    async def delete_service(self, stack: str, service: str) -> None:
        """Remove the service, its revisions and its instances."""
        await self._write(self._delete_service, stack, service)

    async def _delete_service(self, tx: TxState, stack: str, service: str) -> None:
        prefix = self.keys.instances(stack)
        items, revision = await self._list(tx, prefix, f"listing instances of {stack!r}")
        tx.writes[self.keys.service(stack, service)] = None
        tx.delete_prefix(self.keys.revisions(stack, service))
        for key, value in items:
            if k.instance_record(value).service == service:
                tx.writes[key] = None
        if revision:
            tx.cmps[Cmp(prefix, "no_new", revision, prefix_end(prefix),
                        what=f"the instances of stack {stack!r}")] = None

    async def get_revision(self, stack: str, service: str,
                           revision: int) -> RevisionRecord | None:
        self._check_open()
        value, *_ = await self._get(self._tx(), self.keys.revision(stack, service, revision),
                                    f"reading revision {revision} of {service!r}")
        return k.revision_record(value) if value is not None else None

    async def list_revisions(self, stack: str, service: str) -> list[RevisionRecord]:
        self._check_open()
        items, _ = await self._list(self._tx(), self.keys.revisions(stack, service),
                                    f"listing revisions of {service!r}")
        return sorted((k.revision_record(v) for _, v in items), key=lambda r: r.revision)

    async def prune_revisions(self, stack: str, service: str, keep: int) -> int:
        return await self._write(self._prune_revisions, stack, service, keep)

    async def _prune_revisions(self, tx: TxState, stack: str, service: str,
                               keep: int) -> int:
        items, _ = await self._list(tx, self.keys.revisions(stack, service),
                                    f"listing revisions of {service!r}")
        value, _, _, _ = await self._get(tx, self.keys.service(stack, service),
                                         f"reading service {service!r}")
        current = k.service_record(value).revision if value is not None else None
        revs = sorted((k.revision_record(v).revision, key) for key, v in items)
        doomed = [key for rev, key in revs[:max(len(revs) - max(keep, 0), 0)]
                  if rev != current]
        for key in doomed:
            tx.writes[key] = None
        return len(doomed)

    async def set_revision_outcome(self, stack: str, service: str, revision: int,
                                   outcome: str) -> None:
        """Raises NotFoundError if there is no such revision."""
        await self._write(self._set_outcome, stack, service, revision, outcome)

    async def _set_outcome(self, tx: TxState, stack: str, service: str, revision: int,
                           outcome: str) -> None:
        key = self.keys.revision(stack, service, revision)
        what = f"revision {revision} of service {service!r} in stack {stack!r}"
        value, _, mod, decided = await self._get(tx, key, f"reading {what}")
        if value is None:
            raise NotFoundError(f"no {what}")
        record = k.revision_record(value)
        record.outcome = outcome
        if not decided:
            tx.cmps[Cmp(key, "mod", mod, what=what)] = None
        await self._put(tx, key, k.encode(record))

    # -- instances ------------------------------------------------------------------------
    async def put_instance(self, record: InstanceRecord) -> None:
        """Insert or replace, keyed by (stack, instance). Raises NotFoundError if the
        stack was never put."""
        await self._write(self._put_instance, record)

    async def _put_instance(self, tx: TxState, record: InstanceRecord) -> None:
        await self._require_stack(tx, record.stack)
        await self._put(tx, self.keys.instance(record.stack, record.instance),
                        k.encode(record))

    async def get_instance(self, stack: str, instance: str) -> InstanceRecord | None:
        self._check_open()
        value, *_ = await self._get(self._tx(), self.keys.instance(stack, instance),
                                    f"reading instance {instance!r}")
        return k.instance_record(value) if value is not None else None

    async def list_instances(self, stack: str | None = None,
                             service: str | None = None) -> list[InstanceRecord]:
        self._check_open()
        items, _ = await self._list(self._tx(), self.keys.instances(stack),
                                    "listing instances")
        records = [k.instance_record(v) for _, v in items]
        if service is not None:
            records = [r for r in records if r.service == service]
        return sorted(records, key=lambda r: (r.stack, r.service, r.index, r.instance))

    async def delete_instance(self, stack: str, instance: str) -> None:
        await self._write(self._delete_instance, stack, instance)

    async def record_instances(
            self, changes: Sequence[tuple[InstanceRecord, Event | None]]) -> None:
        """Put the records and append their events in as few etcd transactions as they
        fit in (two writes a change, and the event counter, within `max_txn_ops`), one
        after the other, each atomic; inside `transaction()`, all in that one."""
        per = max(1, (self._committer.max_ops - 2) // 2)
        if self._tx() is not None:
            per = max(len(changes), 1)
        for start in range(0, len(changes), per):
            await self._write(self._record_instances, changes[start:start + per])

    async def _record_instances(
            self, tx: TxState, changes: Sequence[tuple[InstanceRecord, Event | None]]) -> None:
        for record, event in changes:
            await self._put_instance(tx, record)
            if event is not None:
                await self._append_event(tx, event)

    async def _delete_instance(self, tx: TxState, stack: str, instance: str) -> None:
        tx.writes[self.keys.instance(stack, instance)] = None

    # -- events ---------------------------------------------------------------------------
    async def append_event(self, event: Event) -> Event:
        """Append to the log; sets `event.seq` (at commit, inside a transaction) and
        returns the same object."""
        await self._write(self._append_event, event)
        return event

    async def _append_event(self, tx: TxState, event: Event) -> None:
        tx.events.append((event, k.encode(event, without="seq")))

    async def list_events(self, *, after: int = 0, limit: int = 1000,
                          stack: str | None = None, service: str | None = None,
                          ) -> list[Event]:
        """Events with seq > after, oldest first (inside a transaction, its own events
        come last, with seq None)."""
        self._check_open()
        out: list[Event] = []
        async for event in self.events_after(after, stack=stack, service=service):
            if len(out) >= limit:
                break
            out.append(event)
        tx = self._tx()
        if tx is not None:
            out += [e for e, _ in tx.events if _matches(e, stack, service)]
        return out[:limit]

    async def events_after(self, after: int, *, stack: str | None = None,
                           service: str | None = None) -> AsyncIterator[Event]:
        """The committed events with seq > after, oldest first, read a page at a time."""
        start, end = self.keys.event(after + 1), prefix_end(self.keys.events)
        while True:
            resp = await self._conn.range(start, end, what="reading events", limit=_PAGE)
            for kv in resp.kvs:
                event = k.event_record(kv.key, kv.value)
                if _matches(event, stack, service):
                    yield event
            if not resp.more or not resp.kvs:
                return
            start = resp.kvs[-1].key + b"\0"

    async def last_event_seq(self) -> int:
        """The seq of the newest event, 0 when there is none."""
        self._check_open()
        resp = await self._conn.get(self.keys.event_counter, what="reading the event counter")
        last = int(resp.kvs[0].value) if resp.kvs else 0
        if last:  # the newest is gone only if every event was pruned
            found = await self._conn.get(self.keys.event(last), what="reading events")
            if not found.kvs:
                newest = await self._conn.range(self.keys.events, self.keys.event(last),
                                                what="reading events", keys_only=True,
                                                limit=1, descending=True)
                last = Keys.number(newest.kvs[0].key) if newest.kvs else 0
        return last

    def watch_events(self, *, after: int = 0, stack: str | None = None) -> AsyncIterator[Event]:
        """Every event with seq > after, then each new one as it is committed, from an
        etcd watch. Ends when the store is closed."""
        self._check_open()
        assert self._closed is not None
        return watch_events(self, self._conn, self._closed, after=after, stack=stack)

    async def prune_events(self, keep: int) -> int:
        """Delete all but the newest `keep` events; returns how many were deleted. Never
        part of a transaction; seqs are never reused."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self._check_open()
        resp = await self._conn.get(self.keys.event_counter, what="reading the event counter")
        last = int(resp.kvs[0].value) if resp.kvs else 0
        cut = last + 1 - keep  # seqs are contiguous: the newest `keep` are >= cut
        if cut <= 1:
            return 0
        fence = self.fence
        if fence is None:
            deleted = await self._conn.delete_range(self.keys.events, self.keys.event(cut),
                                                    what="pruning events")
            return int(deleted.deleted)
        resp = await self._conn.txn([fence.cmp.proto()],
                                    [delete_op(self.keys.events, self.keys.event(cut))],
                                    what="pruning events")
        if not resp.succeeded:
            if fence.on_fail is not None:
                fence.on_fail()
            raise fence.refused()
        return int(resp.responses[0].response_delete_range.deleted)

    # -- operations -----------------------------------------------------------------------
    async def put_operation(self, op: OperationRecord) -> OperationRecord:
        """Insert (assigning `op.id` when it is None: at commit, inside a transaction) or
        replace by id (an id this store handed out)."""
        await self._write(self._put_operation, op)
        return op

    async def _put_operation(self, tx: TxState, op: OperationRecord) -> None:
        data = k.encode(op, without="id")
        if op.id is None:
            tx.ops.append((op, data))
        else:
            await self._put(tx, self.keys.operation(op.id), data)

    async def get_operation(self, op_id: int) -> OperationRecord | None:
        self._check_open()
        key = self.keys.operation(op_id)
        value, *_ = await self._get(self._tx(), key, f"reading operation {op_id}")
        return k.operation_record(key, value) if value is not None else None

    async def list_operations(self, *, states: tuple[OpState, ...] | None = None,
                              stack: str | None = None,
                              limit: int = 1000) -> list[OperationRecord]:
        """Oldest first (by id); the newest `limit` of those that match."""
        self._check_open()
        items, _ = await self._list(self._tx(), self.keys.operations, "listing operations")
        ops = [k.operation_record(key, v) for key, v in items]
        tx = self._tx()
        if tx is not None:  # its own new operations come last (their ids are not set yet)
            ops += [op for op, _ in tx.ops]
        ops = [o for o in ops if (states is None or o.state in states)
               and (stack is None or o.stack == stack)]
        return ops[-limit:] if limit > 0 else []


def _matches(event: Event, stack: str | None, service: str | None) -> bool:
    return (stack is None or event.stack == stack) and (service is None
                                                        or event.service == service)
