"""The machinery of the SQLite store: connections, group commit, transactions, checkpoints.

SQLite is used from the event loop's thread.

Design (measured in bench/bench_store.py):

* Two connections to the file: a *writer* and a *reader*. SQLite calls take tens of
  microseconds, so they run directly on the loop thread instead of hopping to a thread pool
  (a hop alone costs more than the query). WAL journal mode lets the reader (and other
  processes) read while a write is in progress.
* Group commit. A write opens a batch (`BEGIN IMMEDIATE`) if none is open, applies its
  statements at once, and then awaits the batch's commit, which runs one loop iteration
  later. Every write made by other coroutines in that same iteration joins the batch, so a
  burst of N concurrent writes costs one commit instead of N. No call returns before its
  batch is committed; if the commit fails, every write in the batch fails with StoreError
  and none of them landed. `group_commit=False` commits each write/transaction by itself.
* `transaction()` serializes coroutines with an asyncio.Lock and wraps its writes in a
  SAVEPOINT inside the current batch: an exception rolls back exactly that transaction's
  writes. Writes made outside a transaction are each atomic and durable on return.
  Reads outside a transaction use the reader connection and see committed data only;
  reads inside one see the transaction's own writes. Tasks started inside a transaction
  (contextvars are inherited) write into it while it is open.
* Durability: `synchronous=NORMAL` in WAL mode. A committed write is in the WAL file (in
  the OS page cache) before the call returns, so it survives `kill -9` of this process; a
  power loss or kernel crash may lose the last transactions (never corrupt the file).
  `fsync=True` selects `synchronous=FULL`, which survives power loss at the cost of one
  fsync per commit (one per batch with group commit).
* Checkpoints (copying the WAL back into the database file, with fsyncs) run in a worker
  thread on their own connection after every `CHECKPOINT_AFTER` writes, instead of
  SQLite's automatic checkpoint that would stall the loop for milliseconds inside a commit.
  Writers wait (asynchronously) while it runs, so that it catches up with the whole WAL
  and the next write can start the WAL file over instead of growing it.
* Locks: the busy timeout is enforced by retrying with `asyncio.sleep`, never by blocking
  the loop; after `busy_timeout` seconds the call fails with StoreError.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from shipyard.errors import StoreError
from shipyard.state import sqlite_schema as q
from shipyard.state.sqlite_tx import _CURRENT, _Transaction

T = TypeVar("T")

_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (primary result codes)
CHECKPOINT_AFTER = 256  # writes between two background checkpoints
_WAL_SIZE_LIMIT = 64 * 2**20  # truncate the WAL back to this size after a checkpoint


class SQLiteDatabase:
    """The connections, batches, transactions and checkpoints behind SQLiteStore."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0,
                 poll_interval: float = 0.2, group_commit: bool = True,
                 fsync: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.busy_timeout = busy_timeout  # seconds to wait for another process's lock
        self.poll_interval = poll_interval  # how often watchers look for other processes' events
        self.group_commit = group_commit
        self.fsync = fsync
        self._db: sqlite3.Connection | None = None  # the writer
        self._rdb: sqlite3.Connection | None = None  # the reader
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._in_batch = False  # a BEGIN is open on the writer
        self._flush_pending = False  # the batch is due but a transaction holds the lock
        self._flush_handle: asyncio.Handle | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._batch_events = False
        self._event_signal: asyncio.Future[None] | None = None
        self._ckpt_db: sqlite3.Connection | None = None  # used by the checkpoint thread
        self._ckpt_task: asyncio.Future[None] | None = None
        self._ckpt_writes = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        if self._db is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._prepare_path()
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.001
        while True:
            db: sqlite3.Connection | None = None
            try:
                db = self._connect()
                self._setup(db)
                break
            except BaseException as exc:
                if db is not None:
                    db.close()
                if not isinstance(exc, sqlite3.Error):
                    raise
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise self._error(exc) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        self._db = db
        try:
            self._rdb = self._connect()
            self._rdb.execute("PRAGMA query_only = ON")
            self._ckpt_db = self._connect()
        except sqlite3.Error as exc:
            for conn in (self._rdb, db):
                if conn is not None:
                    conn.close()
            self._db = self._rdb = None
            raise self._error(exc) from None
        self._event_signal = self._loop.create_future()

    async def close(self) -> None:
        """Commit what is pending and close. Watchers end; later calls raise StoreError."""
        if self._db is None:
            return
        async with self._lock:  # no transaction or checkpoint is running past this point
            if self._in_batch:
                self._commit()
            ckpt_task = self._ckpt_task
            if ckpt_task is not None:
                ckpt_task.cancel()  # not started: it was waiting for the lock
            db, rdb, ckpt = self._db, self._rdb, self._ckpt_db
            self._db = self._rdb = self._ckpt_db = None
            for conn in (ckpt, rdb, db):  # the last one checkpoints and removes the WAL
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
        if ckpt_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ckpt_task
            self._ckpt_task = None
        self._wake_watchers()

    def _prepare_path(self) -> None:
        path, folder = self.path, self.path.parent
        try:
            if not folder.exists():
                folder.mkdir(mode=0o700, parents=True)
                os.chmod(folder, 0o700)
            if path.is_dir():
                raise StoreError(f"state store {path} is a directory, not a database file",
                                 hint="point the store at a file path")
            if not path.exists():
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
                os.close(fd)
        except FileExistsError:
            pass  # created meanwhile by another process
        except OSError as exc:
            raise StoreError(f"cannot create state store {path}: {exc.strerror or exc}",
                             hint="check that its folder exists and is writable") from None

    def _connect(self) -> sqlite3.Connection:
        # timeout=0: waiting for locks is done by async retries, never by blocking the loop.
        return sqlite3.connect(self.path, timeout=0, isolation_level=None,
                               check_same_thread=False, cached_statements=256)

    def _setup(self, db: sqlite3.Connection) -> None:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"state store {self.path} cannot use WAL journaling ({mode})",
                             hint="put the store on a local file system")
        db.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA wal_autocheckpoint = 0")  # done in a thread, see _checkpoint
        db.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        db.execute("BEGIN IMMEDIATE")
        try:
            self._migrate(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _migrate(self, db: sqlite3.Connection) -> None:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "shipyard_schema" not in tables:
            if tables - {"sqlite_sequence"}:
                raise StoreError(f"{self.path} is a SQLite database but not a Shipyard store",
                                 hint="move it away or point the store at another file")
            db.execute("CREATE TABLE shipyard_schema (version INTEGER NOT NULL)")
            db.execute("INSERT INTO shipyard_schema (version) VALUES (0)")
        version = db.execute("SELECT version FROM shipyard_schema").fetchone()[0]
        if version > q.SCHEMA_VERSION:
            raise StoreError(
                f"state store {self.path} has schema version {version}, newer than this "
                f"Shipyard supports ({q.SCHEMA_VERSION})", hint="upgrade Shipyard")
        for number, statements in q.MIGRATIONS:
            if number > version:
                for sql in statements:
                    db.execute(sql)
                db.execute("UPDATE shipyard_schema SET version = ?", (number,))

    async def schema_version(self) -> int:
        """The schema version of the open database."""
        rows = await self._fetch("SELECT version FROM shipyard_schema", ())
        return int(rows[0][0])

    # -- errors ---------------------------------------------------------------------------
    def _error(self, exc: BaseException, what: str = "") -> StoreError:
        path = self.path
        if isinstance(exc, StoreError):
            return exc
        code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        text = str(exc)
        if code == 26 or "not a database" in text:
            return StoreError(f"{path} is not a SQLite database ({text})",
                              hint="move it away or point the store at another file")
        if code == 14 or "unable to open" in text:
            return StoreError(f"cannot open state store {path} ({text})",
                              hint="check that it is a file and that its folder is writable")
        if code == 8 or "readonly" in text:
            return StoreError(f"state store {path} is read-only ({text})",
                              hint="check the permissions of the file and its folder")
        if code in _BUSY_CODES:
            return StoreError(
                f"state store {path} is locked by another process "
                f"(waited {self.busy_timeout:g}s)",
                hint="is another Shipyard control plane using it? stop it or retry")
        if code == 13:
            return StoreError(f"state store {path}: disk full", hint="free some disk space")
        if code == 11:
            return StoreError(f"state store {path} is corrupt ({text})",
                              hint="restore it from a backup or move it away")
        suffix = f" while {what}" if what else ""
        return StoreError(f"state store {path}: {text}{suffix}")

    def _writer(self) -> sqlite3.Connection:
        db = self._db
        if db is None:
            raise StoreError(f"state store {self.path} is not open",
                             hint="call `await store.open()` first")
        return db

    def _exec(self, db: sqlite3.Connection, sql: str, params: Any = ()) -> sqlite3.Cursor:
        try:
            return db.execute(sql, params)
        except sqlite3.Error as exc:
            self._check_batch()
            raise self._error(exc) from None

    # -- batches and commits --------------------------------------------------------------
    async def _begin(self) -> None:
        """Open a batch on the writer if none is open (the caller holds the lock)."""
        if self._in_batch:
            return
        db = self._writer()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise self._error(exc) from None
            await self._begin_slow(db)
        self._in_batch = True
        self._batch_events = False
        if self.group_commit:
            assert self._loop is not None
            self._flush_handle = self._loop.call_soon(self._flush)

    async def _begin_slow(self, db: sqlite3.Connection) -> None:
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.001
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise self._error(exc) from None

    def _after_write(self) -> asyncio.Future[None] | None:
        """After a write or transaction succeeded inside the batch: either commit now
        (no group commit) or return a future resolved when the batch commits."""
        if not self.group_commit:
            err = self._commit()
            if err is not None:
                raise err
            return None
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        return waiter

    def _release(self) -> None:
        self._lock.release()
        if self._in_batch and (self._flush_pending or not self.group_commit):
            self._commit()

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._in_batch:
            return
        if self._lock.locked():  # a transaction is open across an await: commit at its end
            self._flush_pending = True
            return
        self._commit()

    def _commit(self) -> StoreError | None:
        """Commit the batch; resolve its waiters (with the error if the commit failed)."""
        waiters, self._waiters = self._waiters, []
        self._in_batch = self._flush_pending = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        err: StoreError | None = None
        db = self._db
        try:
            if db is None:
                raise StoreError(f"state store {self.path} was closed before a commit")
            db.execute("COMMIT")
        except (sqlite3.Error, StoreError) as exc:
            err = self._error(exc, "committing")
            if db is not None and db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
        for waiter in waiters:
            if not waiter.done():
                if err is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(err)
        if err is None:
            if self._batch_events:
                self._wake_watchers()
            self._ckpt_writes += len(waiters) or 1
            if self._ckpt_writes >= 4 * CHECKPOINT_AFTER and db is not None:
                # The checkpoint task is starved (a caller writes without ever yielding
                # to the loop): checkpoint here rather than let the WAL grow forever.
                self._ckpt_writes = 0
                _checkpoint(db)
            elif self._ckpt_writes >= CHECKPOINT_AFTER:
                self._checkpoint()
        return err

    def _checkpoint(self) -> None:
        if self._ckpt_task is not None and not self._ckpt_task.done():
            return
        if self._loop is not None:
            self._ckpt_writes = 0
            self._ckpt_task = self._loop.create_task(self._run_checkpoint())

    async def _run_checkpoint(self) -> None:
        """Checkpoint in a worker thread while holding the write lock: the loop keeps
        running, writers wait, and the checkpoint reaches the end of the WAL."""
        assert self._loop is not None
        await self._lock.acquire()
        try:
            if self._in_batch:
                self._commit()
            if self._ckpt_db is not None:
                try:
                    await self._loop.run_in_executor(None, _checkpoint, self._ckpt_db)
                except RuntimeError:  # the executor is shut down: checkpoint here
                    _checkpoint(self._ckpt_db)
        finally:
            self._release()

    def _check_batch(self) -> None:
        """After an error: if SQLite rolled the whole batch back, fail its waiters."""
        db = self._db
        if self._in_batch and db is not None and not db.in_transaction:
            self._in_batch = self._flush_pending = False
            err = StoreError(f"state store {self.path}: a write failed and SQLite rolled "
                             "back the batch", hint="retry the operation")
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(err)

    def _end_savepoint(self, name: str, *, commit: bool) -> None:
        db = self._writer()
        if not commit and db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute(f"ROLLBACK TO {name}")
        if db.in_transaction:
            self._exec(db, f"RELEASE {name}")
        self._check_batch()

    @contextlib.contextmanager
    def _savepoint(self, db: sqlite3.Connection) -> Iterator[None]:
        """Make a multi-statement operation atomic inside the batch."""
        db.execute("SAVEPOINT op")
        try:
            yield
        except BaseException:
            self._end_savepoint("op", commit=False)
            raise
        self._end_savepoint("op", commit=True)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(writer, *args)` in the current transaction, or as its own durable write."""
        tx = _CURRENT.get()
        if tx is not None and tx.active and tx.store is self:
            return fn(self._writer(), *args)
        await self._lock.acquire()
        try:
            db = self._writer()
            await self._begin()
            result = fn(db, *args)
            waiter = self._after_write()
        finally:
            self._release()
        if waiter is not None:
            await waiter
        return result

    def transaction(self) -> _Transaction:
        """Group the writes made inside into one atomic commit (see the module docs)."""
        return _Transaction(self)

    # -- reads ----------------------------------------------------------------------------
    async def _fetch(self, sql: str, params: Any) -> list[Any]:
        tx = _CURRENT.get()
        db = self._db if tx is not None and tx.active and tx.store is self else self._rdb
        if db is None:
            self._writer()  # raises "not open"
        assert db is not None
        try:
            return db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            if not _is_busy(exc):
                raise self._error(exc) from None
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.001
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            try:
                return db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise self._error(exc) from None

    def _wake_watchers(self) -> None:
        signal = self._event_signal
        if signal is not None and not signal.done():
            signal.set_result(None)
        if self._loop is not None and self._db is not None:
            self._event_signal = self._loop.create_future()


def _checkpoint(db: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _is_busy(exc: BaseException) -> bool:
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    return code in _BUSY_CODES or "locked" in str(exc) or "busy" in str(exc)
