"""The audit trail: who did what, on what, when, from where, and how it ended.

Every mutating request and every refused one (401, 403, 429) is one row of its own SQLite
file, `$SHIPYARD_HOME/audit.db`, independent of the state store. Rows are append-only
(triggers refuse UPDATE and DELETE) and hash-chained: each row's hash is the SHA-256 of the
previous row's hash and of the row's own fields, and a `head` row keeps the count and last
hash. `verify` recomputes the chain: an altered row breaks its own hash, a deleted one
leaves a gap in the sequence and breaks the link of the next row, a truncated tail no
longer matches the head. (Whoever can write the file can also rebuild the whole chain: the
trail proves integrity against mistakes and naive tampering, not against the file's owner;
ship it elsewhere for that.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shipyard.security.private_db import open_private_db

GENESIS = "0" * 64
FIELDS = ("seq", "ts", "request_id", "actor", "role", "source", "method", "path", "action",
          "target", "status", "outcome", "detail")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    role TEXT,
    source TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


@dataclass
class AuditEntry:
    ts: float
    request_id: str
    actor: str
    source: str
    method: str
    path: str
    action: str
    status: int
    outcome: str  # "ok" | "failed" | "denied" | "unauthenticated" | "rate-limited" | "error"
    role: str | None = None
    target: str | None = None
    detail: str = ""
    seq: int = 0
    prev_hash: str = ""
    hash: str = ""

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}

    def view(self) -> dict[str, Any]:
        return asdict(self)


def entry_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    """The chain link: SHA-256 over the previous hash and the row's canonical JSON."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{prev_hash}\n{canonical}".encode()).hexdigest()


@dataclass
class VerifyReport:
    path: str
    rows: int
    ok: bool
    problems: list[str] = field(default_factory=list)
    first_bad_seq: int | None = None

    def view(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog:
    """Appends to, reads and verifies one audit file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db, self._lock = open_private_db(self.path, _SCHEMA, synchronous="NORMAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, entry: AuditEntry) -> AuditEntry:
        """Record `entry` as the next row of the chain (filling seq and the hashes)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                head = self._db.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
                seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
                entry.seq, entry.prev_hash = seq, prev
                entry.hash = entry_hash(prev, entry.fields())
                self._db.execute(
                    f"INSERT INTO audit ({', '.join(FIELDS)}, prev_hash, hash) VALUES "
                    f"({', '.join('?' * (len(FIELDS) + 2))})",
                    (*entry.fields().values(), entry.prev_hash, entry.hash))
                self._db.execute("INSERT INTO head (id, seq, hash) VALUES (1, ?, ?) "
                                 "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, "
                                 "hash = excluded.hash", (seq, entry.hash))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return entry

    def entries(self, *, after: int = 0, limit: int = 1000) -> list[AuditEntry]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(FIELDS)}, prev_hash, hash FROM audit WHERE seq > ? "
                "ORDER BY seq LIMIT ?", (after, limit)).fetchall()
        return [_entry(row) for row in rows]

    def verify(self) -> VerifyReport:
        return verify_file(self.path, db=self._db, lock=self._lock)


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    values = dict(zip((*FIELDS, "prev_hash", "hash"), row, strict=True))
    return AuditEntry(**values)


def verify_file(path: Path, *, db: sqlite3.Connection | None = None,
                lock: threading.Lock | None = None) -> VerifyReport:
    """Recompute the chain of an audit file, read-only."""
    own = db is None
    if db is None:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with lock or contextlib.nullcontext():
            rows = db.execute(f"SELECT {', '.join(FIELDS)}, prev_hash, hash FROM audit "
                              "ORDER BY seq").fetchall()
            head = db.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
    finally:
        if own:
            db.close()
    report = VerifyReport(str(path), len(rows), True)

    def problem(seq: int | None, text: str) -> None:
        report.ok = False
        report.problems.append(text)
        if report.first_bad_seq is None:
            report.first_bad_seq = seq

    prev, expected = GENESIS, 1
    for row in rows:
        entry = _entry(row)
        if entry.seq != expected:
            missing = (f"row {expected}" if entry.seq == expected + 1
                       else f"rows {expected}-{entry.seq - 1}")
            problem(expected, f"{missing} deleted (the sequence jumps from {expected - 1} "
                              f"to {entry.seq})")
        if entry.prev_hash != prev:
            problem(entry.seq, f"row {entry.seq}: its link to the previous row is broken "
                               "(a row before it was deleted or altered)")
        if entry_hash(entry.prev_hash, entry.fields()) != entry.hash:
            problem(entry.seq, f"row {entry.seq}: altered (its content no longer matches "
                               "its hash)")
        prev, expected = entry.hash, entry.seq + 1
    if head is not None and (head[0] != expected - 1 or head[1] != prev):
        problem(expected, f"the trail ends at row {expected - 1} but its head says row "
                          f"{head[0]}: rows at the end were deleted, or the head altered")
    if head is None and rows:
        problem(rows[-1][0], "the head row is missing")
    return report
