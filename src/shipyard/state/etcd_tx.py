"""Transactions of the etcd store: what one transaction buffers, and the committer that
sends buffered transactions to etcd, many at a time, each batch as ONE etcd transaction.

A transaction (`TxState`) buffers its writes (a put or delete per key, and prefix
deletes), the comparisons its read-modify-writes depend on (`Cmp`: a key's mod or create
revision as it was read, a stack that must exist, a prefix where no key may have appeared
since a read), and the events and operations that still need a number.

The committer takes buffered transactions in order and packs as many as etcd accepts in
one request (`--max-txn-ops`, `--max-request-bytes`, and no key written twice). Numbers
are handed out here, at commit: each counter key (`counters/events`,
`counters/operations`) holds the last number given, the committer knows its value and
mod revision, and the etcd transaction compares that mod revision, puts the new value and
puts the numbered keys. So two control planes appending at once never hand out one seq
twice, and seqs are contiguous and increase in commit order. If the comparisons fail, the
failure branch reads every compared key: counters that moved are reloaded and the batch is
renumbered and sent again; a transaction whose own comparison failed is taken out of the
batch and fails (NotFoundError when a stack it needs is gone, `Conflict` when a key it
read changed), the others are sent again. One etcd request is in flight at a time, and
the transactions that arrive meanwhile form the next batch: a burst of N concurrent
writes costs about N / 40 etcd round trips.

A fenced committer (`Committer.fence`, set by a control plane that won the leader
election, state/election.py) adds one more comparison to every etcd transaction: the
leader key still has the create revision it had when this control plane won. Once the
lease is gone (expired, revoked) or another control plane leads, every write fails with
`NotLeader` and writes nothing, however late a paused process sends it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shipyard.errors import NotFoundError, StoreError
from shipyard.state.base import Event, OperationRecord
from shipyard.state.etcd_conn import Compare, Connection, RequestOp, delete_op, put_op, range_op
from shipyard.state.etcd_keys import Keys, prefix_end

MAX_ATTEMPTS = 64  # sends of one batch before giving up (counters moving every time)
_OP_OVERHEAD = 32  # bytes of framing per operation, for the request size estimate


class Conflict(Exception):
    """A key that a read-modify-write read was changed by another writer before commit."""


class NotLeader(StoreError):
    """A write refused by the store's fence: this control plane does not lead any more."""


@dataclass(frozen=True)
class Fence:
    """The condition every write of a fenced store commits under: `key` (the leader key)
    has create revision `revision` (the term this control plane won). `on_fail` is told,
    once per refused batch, that the fence held no more."""

    key: bytes
    revision: int
    on_fail: Callable[[], None] | None = None

    @property
    def cmp(self) -> Cmp:
        return Cmp(self.key, "create", self.revision, what="the leader key")

    def refused(self) -> NotLeader:
        return NotLeader(f"this control plane no longer leads (its term {self.revision} "
                         "ended): the write was refused and nothing was written",
                         hint="send the request to the current leader (`GET /v1/leader`)")


@dataclass(frozen=True)
class Cmp:
    """A condition a transaction commits under. Kinds: "mod" (the key's mod revision is
    `rev`, 0 = absent), "create" (its create revision is `rev`), "exists", and "no_new"
    (no key in [key, end) was created after revision `rev`)."""

    key: bytes
    kind: str
    rev: int = 0
    end: bytes = b""
    what: str = field(default="", compare=False)  # "service 'demo/api'", for messages
    missing: str = field(default="", compare=False)  # NotFoundError message when it fails

    def proto(self) -> Compare:
        if self.kind == "mod":
            return Compare(target=Compare.MOD, result=Compare.EQUAL, key=self.key,
                           mod_revision=self.rev)
        if self.kind == "create":
            return Compare(target=Compare.CREATE, result=Compare.EQUAL, key=self.key,
                           create_revision=self.rev)
        if self.kind == "exists":
            return Compare(target=Compare.CREATE, result=Compare.GREATER, key=self.key,
                           create_revision=0)
        return Compare(target=Compare.CREATE, result=Compare.LESS, key=self.key,
                       range_end=self.end, create_revision=self.rev + 1)

    def probe(self) -> RequestOp:
        """The read, in the failure branch, that tells whether this condition held."""
        if self.kind == "no_new":
            return range_op(self.key, self.end, count_only=True,
                            min_create_revision=self.rev + 1)
        return range_op(self.key, keys_only=True)

    def holds(self, resp: Any) -> bool:
        if self.kind == "no_new":
            return int(resp.count) == 0
        kv = resp.kvs[0] if resp.kvs else None
        if self.kind == "exists":
            return kv is not None
        if self.kind == "mod":
            return (kv.mod_revision if kv else 0) == self.rev
        return (kv.create_revision if kv else 0) == self.rev

    def error(self) -> Exception:
        if self.missing:
            return NotFoundError(self.missing,
                                 hint="put the stack before its services and instances")
        return Conflict(self.what or self.key.decode(errors="replace"))


class TxState:
    """The buffer of one transaction (or of one write made outside any)."""

    __slots__ = ("cmps", "count", "events", "future", "ops", "ranges", "size", "writes")

    def __init__(self) -> None:
        self.writes: dict[bytes, bytes | None] = {}  # None: delete the key
        self.ranges: list[bytes] = []  # prefixes to delete
        self.cmps: dict[Cmp, None] = {}  # an ordered set
        self.events: list[tuple[Event, bytes]] = []  # (event, its JSON) to number
        self.ops: list[tuple[OperationRecord, bytes]] = []  # new operations to number
        self.future: asyncio.Future[None] | None = None
        self.count = self.size = 0  # n_ops() and nbytes(), measured when submitted

    @property
    def empty(self) -> bool:
        return not (self.writes or self.ranges or self.events or self.ops)

    def n_ops(self) -> int:
        return len(self.writes) + len(self.ranges) + len(self.events) + len(self.ops)

    def nbytes(self) -> int:
        size = sum(len(k) + len(v or b"") + _OP_OVERHEAD for k, v in self.writes.items())
        size += sum(2 * len(p) + _OP_OVERHEAD for p in self.ranges)
        size += sum(len(v) + 64 for _, v in self.events)
        return size + sum(len(v) + 64 for _, v in self.ops)

    # -- savepoints (nested transactions) -------------------------------------------------
    def snapshot(self) -> tuple[Any, ...]:
        return (dict(self.writes), list(self.ranges), dict(self.cmps), len(self.events),
                len(self.ops))

    def restore(self, snap: tuple[Any, ...]) -> None:
        writes, ranges, cmps, n_events, n_ops = snap
        self.writes, self.ranges, self.cmps = writes, ranges, cmps
        del self.events[n_events:]
        del self.ops[n_ops:]

    # -- the overlay: what reads inside the transaction see -------------------------------
    def lookup(self, key: bytes) -> tuple[bool, bytes | None]:
        """(True, value) if this transaction decided `key` (None: deleted)."""
        if key in self.writes:
            return True, self.writes[key]
        if self.covering(key) is not None:
            return True, None
        return False, None

    def covering(self, key: bytes) -> bytes | None:
        """The deleted prefix that covers `key`, if any."""
        for prefix in self.ranges:
            if key.startswith(prefix):
                return prefix
        return None

    def overlay(self, prefix: bytes, items: dict[bytes, bytes]) -> dict[bytes, bytes]:
        """`items` (read from etcd under `prefix`) as this transaction sees them."""
        if self.covering(prefix) is not None:
            items = {}
        elif any(p.startswith(prefix) for p in self.ranges):
            items = {k: v for k, v in items.items() if self.covering(k) is None}
        for key, value in self.writes.items():
            if key.startswith(prefix):
                if value is None:
                    items.pop(key, None)
                else:
                    items[key] = value
        return items

    def delete_prefix(self, prefix: bytes) -> None:
        for key in [k for k in self.writes if k.startswith(prefix)]:
            del self.writes[key]  # the prefix delete removes them anyway
        if self.covering(prefix) is None:
            self.ranges = [p for p in self.ranges if not p.startswith(prefix)]
            self.ranges.append(prefix)


class Committer:
    """Sends buffered transactions to etcd in batches, handing out numbers (see above)."""

    def __init__(self, conn: Connection, keys: Keys, *, max_ops: int, max_bytes: int) -> None:
        self.conn = conn
        self.keys = keys
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self.queue: deque[TxState] = deque()
        self.counters: dict[bytes, tuple[int, int]] = {}  # key -> (value, mod revision)
        self.fence: Fence | None = None  # HA: what every commit also compares (see above)
        self._stale = True  # counters must be (re)read: at first, and after a failed send
        self._task: asyncio.Task[None] | None = None

    async def load_counters(self) -> None:
        keys = (self.keys.event_counter, self.keys.op_counter)
        resp = await self.conn.txn([], [range_op(k) for k in keys], what="reading counters",
                                   write=False)
        for key, op in zip(keys, resp.responses, strict=True):
            self._learn(key, op.response_range)
        self._stale = False

    def _learn(self, key: bytes, resp: Any) -> None:
        kv = resp.kvs[0] if resp.kvs else None
        self.counters[key] = (int(kv.value), kv.mod_revision) if kv else (0, 0)

    async def submit(self, tx: TxState) -> None:
        """Commit `tx`; returns once etcd has it. Raises StoreError (etcd failed: the
        outcome is unknown if the request was sent), NotFoundError or Conflict (nothing
        was written). Cancelled before it was sent, nothing is written."""
        if tx.empty:
            return
        tx.count, tx.size = tx.n_ops(), tx.nbytes()
        if tx.count + 2 > self.max_ops or len(tx.cmps) + 3 > self.max_ops:
            raise StoreError(
                f"etcd at {self.conn.where}: a transaction of {tx.count} writes is more "
                f"than one etcd transaction may hold ({self.max_ops} operations)",
                hint="split it, or raise etcd's --max-txn-ops and ?max_txn_ops= in the URL")
        if tx.size > self.max_bytes:
            raise StoreError(
                f"etcd at {self.conn.where}: a transaction of {tx.size} bytes is larger "
                f"than one etcd request may be ({self.max_bytes} bytes)",
                hint="raise etcd's --max-request-bytes and ?max_txn_bytes= in the URL")
        loop = asyncio.get_running_loop()
        tx.future = loop.create_future()
        self.queue.append(tx)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="etcd-committer")
        await tx.future  # if the caller is cancelled, so is the future: _take skips it

    async def drain(self) -> None:
        """Wait until everything submitted so far is committed (or failed)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        while self.queue:
            batch = self._take()
            if batch:
                try:
                    await self._commit(batch)
                except BaseException as exc:  # never leave a caller waiting
                    self._stale = True  # the request may have been applied
                    err = exc if isinstance(exc, Exception) else StoreError(
                        f"etcd at {self.conn.where}: the commit was interrupted")
                    for tx in batch:
                        _fail(tx, err)
                    if not isinstance(exc, Exception):
                        raise

    def _take(self) -> list[TxState]:
        """The next batch: transactions in order, while they fit and touch no key that an
        earlier one in the batch writes."""
        batch: list[TxState] = []
        points: set[bytes] = set()
        prefixes: list[bytes] = []
        n_ops = n_cmps = size = 0
        while self.queue:
            tx = self.queue[0]
            if tx.future is None or tx.future.done():  # cancelled while waiting
                self.queue.popleft()
                continue
            if batch and (n_ops + tx.count + 2 > self.max_ops
                          or n_cmps + len(tx.cmps) + 3 > self.max_ops
                          or size + tx.size > self.max_bytes
                          or _overlaps(tx, points, prefixes)):
                break
            self.queue.popleft()
            batch.append(tx)
            points.update(tx.writes)
            prefixes.extend(tx.ranges)
            n_ops += tx.count
            n_cmps += len(tx.cmps)
            size += tx.size
        return batch

    async def _commit(self, batch: list[TxState]) -> None:
        keys = self.keys
        if self._stale:
            await self.load_counters()
        for _ in range(MAX_ATTEMPTS):
            cmps: dict[Cmp, None] = {}
            ops: list[RequestOp] = []
            numbered: list[tuple[Event | OperationRecord, int]] = []
            seq, seq_mod = self.counters[keys.event_counter]
            op_id, op_mod = self.counters[keys.op_counter]
            first_seq, first_id = seq, op_id
            for tx in batch:
                cmps.update(tx.cmps)
                for key, value in tx.writes.items():
                    ops.append(delete_op(key) if value is None else put_op(key, value))
                ops.extend(delete_op(p, prefix_end(p)) for p in tx.ranges)
                for event, data in tx.events:
                    seq += 1
                    ops.append(put_op(keys.event(seq), data))
                    numbered.append((event, seq))
                for op, data in tx.ops:
                    op_id += 1
                    ops.append(put_op(keys.operation(op_id), data))
                    numbered.append((op, op_id))
            compares = [c.proto() for c in cmps]
            counters: list[bytes] = []
            if seq != first_seq:
                counters.append(keys.event_counter)
                compares.append(Cmp(keys.event_counter, "mod", seq_mod).proto())
                ops.append(put_op(keys.event_counter, b"%d" % seq))
            if op_id != first_id:
                counters.append(keys.op_counter)
                compares.append(Cmp(keys.op_counter, "mod", op_mod).proto())
                ops.append(put_op(keys.op_counter, b"%d" % op_id))
            probes = [c.probe() for c in cmps] + [range_op(k) for k in counters]
            fence = self.fence
            if fence is not None:  # last, so that the answers above keep their places
                compares.append(fence.cmp.proto())
                probes.append(fence.cmp.probe())
            what = f"committing {len(batch)} transaction{'s' * (len(batch) > 1)}"
            resp = await self.conn.txn(compares, ops, probes, what=what)
            if resp.succeeded:
                rev = resp.header.revision
                if keys.event_counter in counters:
                    self.counters[keys.event_counter] = (seq, rev)
                if keys.op_counter in counters:
                    self.counters[keys.op_counter] = (op_id, rev)
                for obj, number in numbered:
                    if isinstance(obj, Event):
                        obj.seq = number
                    else:
                        obj.id = number
                for tx in batch:
                    if tx.future is not None and not tx.future.done():
                        tx.future.set_result(None)
                return
            answers = [r.response_range for r in resp.responses]
            if fence is not None and not fence.cmp.holds(answers[-1]):
                for tx in batch:
                    _fail(tx, fence.refused())
                if fence.on_fail is not None:
                    fence.on_fail()
                return
            held = {c: c.holds(a) for c, a in zip(cmps, answers, strict=False)}
            counted = answers[len(cmps):len(cmps) + len(counters)]
            for key, answer in zip(counters, counted, strict=True):
                self._learn(key, answer)
            kept = []
            for tx in batch:
                broken = next((c for c in tx.cmps if not held[c]), None)
                if broken is None:
                    kept.append(tx)
                else:
                    _fail(tx, broken.error())
            batch = kept
            if not batch:
                return
        err = StoreError(f"etcd at {self.conn.where}: gave up committing after "
                         f"{MAX_ATTEMPTS} attempts (other writers kept moving the counters)",
                         hint="retry")
        for tx in batch:
            _fail(tx, err)


def _fail(tx: TxState, err: BaseException) -> None:
    if tx.future is not None and not tx.future.done():
        tx.future.set_exception(err)


def _overlaps(tx: TxState, points: set[bytes], prefixes: list[bytes]) -> bool:
    """Would `tx` write a key the batch already writes (etcd refuses that)?"""
    for key in tx.writes:
        if key in points or any(key.startswith(p) for p in prefixes):
            return True
    for prefix in tx.ranges:
        if any(prefix.startswith(p) or p.startswith(prefix) for p in prefixes):
            return True
        if any(key.startswith(prefix) for key in points):
            return True
    return False
