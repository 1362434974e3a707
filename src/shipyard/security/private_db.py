"""The SQLite files the security layer keeps beside the state store (tokens, audit): owner-
only from the moment they exist, WAL, one connection shared under a lock."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path


def open_private_db(path: Path, schema: str, *,
                    synchronous: str | None = None) -> tuple[sqlite3.Connection, threading.Lock]:
    """Create `path` (0600, in a 0700 folder) if needed, open it in autocommit mode with
    WAL, apply `schema`; the connection and the lock its users must hold."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        path.touch(mode=0o600, exist_ok=False)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    lock = threading.Lock()
    with lock:
        db.execute("PRAGMA journal_mode=WAL")
        if synchronous:
            db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(schema)
    return db, lock
