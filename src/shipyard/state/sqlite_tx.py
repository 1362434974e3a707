"""A transaction of the SQLite store: a SAVEPOINT inside the current group-commit batch
(see sqlite_db.py), nested transactions as nested savepoints."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shipyard.state.sqlite_db import SQLiteDatabase


class _Transaction(contextlib.AbstractAsyncContextManager[None]):
    """The async context manager returned by `SQLiteStore.transaction()`."""

    __slots__ = ("active", "depth", "nested", "savepoint", "store", "token")

    def __init__(self, store: SQLiteDatabase) -> None:
        self.store = store
        self.active = False
        self.nested = False
        self.depth = 0
        self.savepoint = "tx"
        self.token: contextvars.Token[_Transaction | None] | None = None

    async def __aenter__(self) -> None:
        store = self.store
        outer = _CURRENT.get()
        if outer is not None and outer.active and outer.store is store:
            # A transaction inside a transaction: a savepoint inside the outer one.
            outer.depth += 1
            self.nested = True
            self.savepoint = f"tx{outer.depth}"
            store._exec(store._writer(), f"SAVEPOINT {self.savepoint}")
            return
        await store._lock.acquire()
        try:
            await store._begin()
            store._exec(store._writer(), "SAVEPOINT tx")
        except BaseException:
            store._release()
            raise
        self.active = True
        self.token = _CURRENT.set(self)

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        store = self.store
        if self.nested:
            store._end_savepoint(self.savepoint, commit=exc_type is None)
            return False
        self.active = False
        if self.token is not None:
            with contextlib.suppress(ValueError):  # exited from another context
                _CURRENT.reset(self.token)
        waiter: asyncio.Future[None] | None = None
        try:
            store._end_savepoint("tx", commit=exc_type is None)
            if exc_type is None:
                waiter = store._after_write()
        finally:
            store._release()
        if waiter is not None:
            await waiter
        return False


_CURRENT: contextvars.ContextVar[_Transaction | None] = contextvars.ContextVar(
    "shipyard_sqlite_transaction", default=None)
