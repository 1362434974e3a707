"""The machinery of the etcd store: connection, lifecycle, transactions, and the reads
and buffered writes that the record methods (etcd.py) are made of.

A write made outside `transaction()` is its own transaction: `_write` runs the method
body against a fresh TxState, submits it to the committer, and runs the body again (with
fresh reads) when a compare-and-swap lost a race. Inside `transaction()` (a contextvar, so
tasks started inside join it) the body writes into the open transaction's TxState, which
is submitted when the block exits without an exception; a nested block is a savepoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from shipyard.errors import InputError, NotFoundError, StoreError
from shipyard.state import etcd_keys as k
from shipyard.state.etcd_conn import Connection, EtcdTls, put_op, range_op
from shipyard.state.etcd_keys import Keys, prefix_end
from shipyard.state.etcd_tx import Cmp, Committer, Conflict, Fence, TxState

T = TypeVar("T")
RETRIES = 50  # attempts of a read-modify-write outside a transaction before giving up


class _Transaction(contextlib.AbstractAsyncContextManager[None]):
    """The async context manager returned by `EtcdStore.transaction()`."""

    __slots__ = ("active", "outer", "snap", "state", "store", "token")

    def __init__(self, store: EtcdDatabase) -> None:
        self.store = store
        self.state = TxState()
        self.active = False
        self.outer: _Transaction | None = None
        self.snap: tuple[Any, ...] = ()
        self.token: contextvars.Token[_Transaction | None] | None = None

    async def __aenter__(self) -> None:
        outer = _CURRENT.get()
        if outer is not None and outer.active and outer.store is self.store:
            self.outer, self.snap = outer, outer.state.snapshot()  # a savepoint
            return
        self.store._check_open()
        self.active = True
        self.token = _CURRENT.set(self)

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        if self.outer is not None:
            if exc_type is not None:
                self.outer.state.restore(self.snap)
            return False
        self.active = False
        if self.token is not None:
            with contextlib.suppress(ValueError):  # exited from another context
                _CURRENT.reset(self.token)
        if exc_type is None:
            try:
                await self.store._committer.submit(self.state)
            except Conflict as exc:
                raise StoreError(f"state store {self.store.url}: transaction not committed, "
                                 f"{exc} was changed meanwhile by another writer (nothing "
                                 "was written)", hint="retry the operation") from None
            except NotFoundError:
                self.store._stacks_seen.clear()  # a stack it needed was deleted meanwhile
                raise
        return False


_CURRENT: contextvars.ContextVar[_Transaction | None] = contextvars.ContextVar(
    "shipyard_etcd_transaction", default=None)


class EtcdDatabase:
    """The connection, committer and transactions behind EtcdStore (see its docs)."""

    def __init__(self, endpoints: Sequence[str] | str, cluster: str = "default", *,
                 timeout: float = 5.0, max_txn_ops: int = 128,
                 max_txn_bytes: int = 1_000_000, tls: EtcdTls | None = None) -> None:
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        if not k.CLUSTER_NAME.fullmatch(cluster):
            raise InputError(f"etcd cluster name {cluster!r} is not valid",
                             hint="use letters, digits, '.', '_' and '-' (at most 63)")
        self.cluster = cluster
        self.keys = Keys(cluster)
        self._conn = Connection(endpoints, timeout=timeout, tls=tls)
        self.endpoints = self._conn.endpoints
        self._committer = Committer(self._conn, self.keys, max_ops=max_txn_ops,
                                    max_bytes=max_txn_bytes)
        self._closed: asyncio.Future[None] | None = None
        self._stacks_seen: set[str] = set()  # stacks known to exist (checked at commit)
        self._locks: dict[Any, tuple[asyncio.Lock, list[int]]] = {}

    @property
    def url(self) -> str:
        return f"etcd://{self._conn.where}/{self.cluster}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, check the layout version (writing it into a new namespace) and load
        the counters. Raises StoreError if etcd cannot be reached."""
        if self._conn.is_open:
            return
        await self._conn.open()
        try:
            await self._check_layout()
            await self._committer.load_counters()
        except BaseException:
            await self._conn.close()
            raise
        self._closed = asyncio.get_running_loop().create_future()
        self._stacks_seen.clear()

    async def _check_layout(self) -> None:
        meta = self.keys.meta
        resp = await self._conn.txn(
            [Cmp(meta, "mod", 0).proto()], [put_op(meta, k.dumps({"layout": k.LAYOUT}))],
            [range_op(meta)], what="opening the store")
        if resp.succeeded:
            return
        kvs = resp.responses[0].response_range.kvs
        try:
            layout = int(json.loads(kvs[0].value)["layout"])
        except (ValueError, KeyError, TypeError, IndexError):
            raise StoreError(f"state store {self.url}: {meta.decode()} is not a Shipyard "
                             "layout record", hint="use another cluster name") from None
        if layout > k.LAYOUT:
            raise StoreError(f"state store {self.url} has layout version {layout}, newer "
                             f"than this Shipyard supports ({k.LAYOUT})",
                             hint="upgrade Shipyard")

    async def close(self) -> None:
        """Commit what is pending and disconnect. Watchers end; later calls raise
        StoreError."""
        if not self._conn.is_open:
            return
        try:
            await self._committer.drain()
        finally:
            if self._closed is not None and not self._closed.done():
                self._closed.set_result(None)
            await asyncio.sleep(0)  # let watchers see it before the channel goes
            await self._conn.close()

    def _check_open(self) -> None:
        if not self._conn.is_open:
            raise StoreError(f"state store {self.url} is not open",
                             hint="call `await store.open()` first")

    @property
    def fence(self) -> Fence | None:
        return self._committer.fence

    def set_fence(self, fence: Fence | None) -> None:
        """Commit every write from now on only while `fence` holds (the leader key keeps
        the create revision this control plane won it with); see etcd_tx.py."""
        self._committer.fence = fence

    def transaction(self) -> _Transaction:
        """Group the writes made inside into one etcd transaction (see the module docs)."""
        return _Transaction(self)

    # -- raw keys of this namespace (agent/: nodes, assignments) ------------- (issue 10) --
    async def put_raw(self, key: bytes, value: bytes | None, *,
                      mod_revision: int | None = None) -> None:
        """Put `value` at `key` (a key under `keys.root`; None deletes it), in the current
        transaction or as a write of its own. With `mod_revision` (0: absent), only while
        the key still has it: else StoreError ("changed meanwhile"), nothing written."""
        if not key.startswith(self.keys.root):
            raise ValueError(f"{key!r} is not a key of {self.url}")
        state = self._tx()
        own = state is None
        if state is None:
            self._check_open()
            state = TxState()
        if mod_revision is not None:
            state.cmps[Cmp(key, "mod", mod_revision, what=key.decode(errors="replace"))] = None
        await self._put(state, key, value)
        if own:
            try:
                await self._committer.submit(state)
            except Conflict as exc:
                raise StoreError(f"state store {self.url}: {exc} was changed meanwhile "
                                 "(nothing was written)", hint="read it again") from None

    def check_raw(self, key: bytes, mod_revision: int) -> None:
        """Commit the current transaction only if `key` still has `mod_revision` (0:
        absent); it fails with StoreError otherwise. Only inside `transaction()`."""
        state = self._tx()
        if state is None:
            raise RuntimeError("check_raw() is only meaningful inside transaction()")
        state.cmps[Cmp(key, "mod", mod_revision, what=key.decode(errors="replace"))] = None
    # -- end raw keys ------------------------------------------------------------------------

    # -- machinery ------------------------------------------------------------------------
    def _tx(self) -> TxState | None:
        tx = _CURRENT.get()
        return tx.state if tx is not None and tx.active and tx.store is self else None

    async def _write(self, fn: Callable[..., Awaitable[T]], *args: Any,
                     lock: Any = None) -> T:
        """Run `fn(tx, *args)` in the current transaction, or as its own etcd transaction,
        again with fresh reads when another writer changed what it read."""
        state = self._tx()
        if state is not None:
            return await fn(state, *args)
        self._check_open()
        if lock is None:
            return await self._attempts(fn, *args)
        async with self._serialized(lock):
            return await self._attempts(fn, *args)

    async def _attempts(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        for attempt in range(RETRIES):
            state = TxState()
            result = await fn(state, *args)
            try:
                await self._committer.submit(state)
                return result
            except Conflict:
                await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
            except NotFoundError:
                self._stacks_seen.clear()
                raise
        raise StoreError(f"state store {self.url}: gave up after {RETRIES} attempts, other "
                         "writers kept changing the same records", hint="retry")

    @contextlib.asynccontextmanager
    async def _serialized(self, key: Any) -> AsyncIterator[None]:
        """Callers of this store with the same `key` take turns, so that they do not race
        each other's compare-and-swap."""
        entry = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if not entry[1][0]:
                del self._locks[key]

    async def _get(self, tx: TxState | None, key: bytes, what: str
                   ) -> tuple[bytes | None, int, int, bool]:
        """(value or None, create revision, mod revision, decided by `tx`)."""
        if tx is not None:
            hit, value = tx.lookup(key)
            if hit:
                return value, 0, 0, True
        resp = await self._conn.get(key, what=what)
        if not resp.kvs:
            return None, 0, 0, False
        kv = resp.kvs[0]
        return kv.value, kv.create_revision, kv.mod_revision, False

    async def _list(self, tx: TxState | None, prefix: bytes, what: str
                    ) -> tuple[list[tuple[bytes, bytes]], int]:
        """The keys under `prefix` as `tx` sees them, in key order, and the etcd revision
        they were read at (0 if `tx` decided them all)."""
        items: dict[bytes, bytes] = {}
        revision = 0
        if tx is None or tx.covering(prefix) is None:
            kvs, revision = await self._conn.range_all(prefix, prefix_end(prefix), what=what)
            items = {kv.key: kv.value for kv in kvs}
        if tx is not None:
            items = tx.overlay(prefix, items)
        return sorted(items.items()), revision

    async def _put(self, tx: TxState, key: bytes, value: bytes | None) -> None:
        """Buffer a write. A key under a prefix this transaction deletes turns that prefix
        delete into deletes of the keys it held (etcd refuses both in one transaction)."""
        prefix = tx.covering(key)
        if prefix is not None:
            kvs, revision = await self._conn.range_all(prefix, prefix_end(prefix),
                                                       what="reading keys", keys_only=True)
            if prefix in tx.ranges:  # (another task of this transaction may have done it)
                tx.ranges.remove(prefix)
            for kv in kvs:
                tx.writes.setdefault(kv.key, None)
            tx.cmps[Cmp(prefix, "no_new", revision, prefix_end(prefix),
                        what=f"keys under {prefix.decode()}")] = None
        tx.writes[key] = value

    async def _require_stack(self, tx: TxState, stack: str) -> None:
        """NotFoundError unless `stack` exists; its existence is checked again at commit."""
        key = self.keys.stack(stack)
        hit, value = tx.lookup(key)
        missing = f"stack {stack!r} is not in the state store"
        if hit:
            if value is None:
                raise NotFoundError(missing, hint="put the stack before its services and "
                                                  "instances")
            return
        if stack not in self._stacks_seen:
            value, *_ = await self._get(None, key, f"reading stack {stack!r}")
            if value is None:
                raise NotFoundError(missing, hint="put the stack before its services and "
                                                  "instances")
            self._stacks_seen.add(stack)
        tx.cmps[Cmp(key, "exists", missing=missing)] = None
