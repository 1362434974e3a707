"""Offline care of the SQLite state file: check it, back it up, restore it.

Pure functions on paths, each returning a dataclass; the CLI (`shipyard state ...`) only
prints them. None of them ever creates or migrates a state database by accident:

* `check_store` reads through a read-only connection (`mode=ro`, `query_only`): SQLite's
  integrity and foreign-key checks, the schema version, the record counts, and Shipyard's
  own invariants. A missing file is `MissingState`, never an empty new store.
* `backup_store` copies with SQLite's online backup API, so it is consistent even while a
  server keeps writing; the copy goes to `FILE.tmp`, is verified, then renamed (mode 0600).
* `restore_store` refuses while a server holds the home, validates the backup before
  touching anything, keeps the current database (checkpointed first) beside it, and
  swaps the new one in with one rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import sqlite3
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shipyard.errors import InputError, ShipyardError, StoreError
from shipyard.state import sqlite_schema as q
from shipyard.state.base import InstanceState

BUSY_TIMEOUT = 5.0  # seconds to wait for another process's lock
TABLES = ("stacks", "services", "revisions", "instances", "events")
_MAX_LISTED = 10  # problems of one kind listed one by one before "... and N more"
_SIDECARS = ("-wal", "-journal", "-shm")


class MissingState(InputError):
    """There is no state database where one was expected (exit code 2)."""


class StateInUse(ShipyardError):
    """A server (or another process) is using the state database (exit code 1)."""


@dataclass
class StoreReport:
    """What `check_store` found. `ok` when there is no problem at all."""

    path: Path
    size: int = 0  # bytes: the database file plus its write-ahead log
    readable: bool = False  # SQLite could open and read it
    integrity_ok: bool = False  # PRAGMA integrity_check said "ok"
    schema_version: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    last_event_seq: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def schema_known(self) -> bool:
        return self.schema_version is not None and 1 <= self.schema_version <= q.SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "size": self.size,
                "integrity_ok": self.integrity_ok, "schema_version": self.schema_version,
                "counts": dict(self.counts), "last_event_seq": self.last_event_seq,
                "problems": list(self.problems)}


@dataclass
class BackupReport:
    source: Path
    path: Path  # the backup file written
    size: int
    schema_version: int | None
    counts: dict[str, int]
    seconds: float
    warnings: list[str] = field(default_factory=list)  # problems the source has too


@dataclass
class RestoreReport:
    path: Path  # the state database now holding the restored data
    source: Path  # the backup it came from
    kept: Path | None  # where the previous database was kept (None: there was none)
    schema_version: int | None
    counts: dict[str, int]


def describe_counts(counts: dict[str, int]) -> str:
    """`2 stacks, 5 services, ...` in the order of TABLES."""
    return ", ".join(f"{counts[t]} {t if counts[t] != 1 else t[:-1]}"
                     for t in TABLES if t in counts)


def human_size(size: int) -> str:
    """`812 B`, `56.0 KiB`, `3.2 MiB`, `1.5 GiB`."""
    if size < 1024:
        return f"{size} B"
    value, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


# -- check ----------------------------------------------------------------------------------
def check_store(path: str | Path) -> StoreReport:
    """Inspect the database at `path` without writing to it. Raises MissingState if there
    is no file; every other finding is a line in `report.problems`."""
    path = Path(path)
    if not path.exists():
        raise MissingState(f"no state at {path}; nothing to check")
    report = StoreReport(path=path, size=_db_size(path))
    if path.is_dir():
        report.problems.append(f"{path} is a directory, not a database file")
        return report
    try:
        with read_only(path) as db:
            _inspect(db, report)
    except sqlite3.Error as exc:
        report.problems.append(describe_sqlite_error(exc))
    return report


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to an existing database (never created, never migrated).

    Reading a WAL database makes SQLite create its `-wal`/`-shm` files; when they did not
    exist before, a last connection in read-write mode lets SQLite remove them again
    (it does so only if no other process has the database open)."""
    had_sidecars = any(_sidecar(path, s).exists() for s in ("-wal", "-shm"))
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}"
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT,
                         isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA query_only = ON")
        yield db
    finally:
        db.close()
        if not had_sidecars and any(_sidecar(path, s).exists() for s in ("-wal", "-shm")):
            with contextlib.suppress(sqlite3.Error):
                tidy = sqlite3.connect(f"{uri}?mode=rw", uri=True, timeout=0)
                try:
                    tidy.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
                finally:
                    tidy.close()


def _inspect(db: sqlite3.Connection, report: StoreReport) -> None:
    problems = report.problems
    rows = db.execute("PRAGMA integrity_check").fetchall()
    report.readable = True
    report.integrity_ok = rows == [("ok",)]
    if not report.integrity_ok:
        lines = [line for row in rows for line in str(row[0]).splitlines()
                 if line.strip() and not line.startswith("*** in database")]
        problems.extend(f"integrity: {line}" for line in lines[:_MAX_LISTED])
        if len(lines) > _MAX_LISTED:
            problems.append(f"integrity: ... and {len(lines) - _MAX_LISTED} more")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "shipyard_schema" not in tables:
        what = "an empty SQLite database" if not tables else "a SQLite database"
        problems.append(f"{report.path} is {what}, not a Shipyard store "
                        "(no shipyard_schema table)")
        return
    versions = db.execute("SELECT version FROM shipyard_schema").fetchall()
    if len(versions) != 1 or not isinstance(versions[0][0], int):
        problems.append(f"the schema version is unreadable (shipyard_schema holds {versions})")
        return
    report.schema_version = version = versions[0][0]
    if version > q.SCHEMA_VERSION:
        problems.append(f"schema version {version} is newer than this Shipyard supports "
                        f"({q.SCHEMA_VERSION}): upgrade Shipyard")
        return
    if version < 1:
        problems.append(f"schema version {version} is unknown (an interrupted setup?)")
        return
    missing = [t for t in TABLES if t not in tables]
    if missing:
        problems.append(f"schema version {version} but tables missing: {', '.join(missing)}")
        return
    for table in TABLES:
        report.counts[table] = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    _check_foreign_keys(db, problems)
    _check_invariants(db, report)


def _check_foreign_keys(db: sqlite3.Connection, problems: list[str]) -> None:
    found = Counter((row[0], row[2]) for row in db.execute("PRAGMA foreign_key_check"))
    for (table, parent), n in sorted(found.items()):
        rows = "row of {} refers" if n == 1 else "rows of {} refer"
        problems.append(f"foreign keys: {n} {rows.format(table)} to missing {parent}")


_SERVICES_WITHOUT_REVISION = """
    SELECT s.stack, s.name, s.revision FROM services s WHERE NOT EXISTS (
        SELECT 1 FROM revisions r
        WHERE r.stack = s.stack AND r.service = s.name AND r.revision = s.revision)
    ORDER BY s.stack, s.name"""
_INSTANCES_WITHOUT_REVISION = """
    SELECT i.stack, i.instance, i.service, i.revision FROM instances i WHERE NOT EXISTS (
        SELECT 1 FROM revisions r
        WHERE r.stack = i.stack AND r.service = i.service AND r.revision = i.revision)
    ORDER BY i.stack, i.instance"""
_UNREADABLE = [  # (table, condition, what is wrong with such a row)
    ("stacks", "NOT json_valid(spec)", "a spec that is not JSON"),
    ("revisions", "NOT json_valid(spec)", "a spec that is not JSON"),
    ("instances", "NOT json_valid(runtime) OR NOT json_valid(ports)",
     "runtime or ports that are not JSON"),
    ("instances", "state NOT IN ({})".format(", ".join(f"'{s}'" for s in InstanceState)),
     "an unknown state"),
    ("events", "NOT json_valid(data)", "data that is not JSON"),
]


def _check_invariants(db: sqlite3.Connection, report: StoreReport) -> None:
    problems = report.problems
    listed = [f"service {stack}/{name}: its current revision {rev} is missing"
              for stack, name, rev in db.execute(_SERVICES_WITHOUT_REVISION)]
    listed += [f"instance {stack}/{inst}: revision {rev} of service {svc} is missing"
               for stack, inst, svc, rev in db.execute(_INSTANCES_WITHOUT_REVISION)]
    problems.extend(listed[:_MAX_LISTED])
    if len(listed) > _MAX_LISTED:
        problems.append(f"... and {len(listed) - _MAX_LISTED} more missing revisions")
    for table, condition, what in _UNREADABLE:
        n = db.execute(f"SELECT count(*) FROM {table} WHERE {condition}").fetchone()[0]
        if n:
            problems.append(f"{table}: {n} {'row has' if n == 1 else 'rows have'} {what}")
    low, high = db.execute("SELECT min(seq), max(seq) FROM events").fetchone()
    report.last_event_seq = high or 0
    if low is not None and low < 1:
        problems.append(f"events: sequence numbers must be positive, found {low}")
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    counter = row[0] if row else 0
    if high is not None and counter < high:
        problems.append(f"events: the sequence counter ({counter}) is behind the newest "
                        f"event ({high}); new events would reuse sequence numbers")


def describe_sqlite_error(exc: sqlite3.Error) -> str:
    """One line about why SQLite could not read a file."""
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    text = str(exc)
    if code == 26 or "not a database" in text:
        return f"not a SQLite database ({text})"
    if code == 11 or "malformed" in text:
        return f"corrupt: {text}"
    if code in (5, 6) or "locked" in text:
        return f"locked by another process for more than {BUSY_TIMEOUT:g}s ({text})"
    if code == 14 or "unable to open" in text:
        return f"cannot open it ({text})"
    return text


# -- backup ---------------------------------------------------------------------------------
def backup_store(source: str | Path, dest: str | Path, *, force: bool = False) -> BackupReport:
    """An online, consistent copy of `source` at `dest` (mode 0600), verified with
    integrity_check before it replaces anything."""
    source, dest = Path(source), Path(dest)
    if not source.exists():
        raise MissingState(f"no state at {source}; nothing to back up")
    if source.is_dir():
        raise StoreError(f"state store {source} is a directory, not a database file")
    _check_destination(source, dest, force)
    started = time.monotonic()
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        _copy_database(source, tmp)
        copy = check_store(tmp)
        if not copy.readable or not copy.integrity_ok:
            raise StoreError(f"the copy of {source} failed its integrity check: "
                             f"{copy.problems[0] if copy.problems else 'unknown'}",
                             hint="see `shipyard state check`")
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise StoreError(f"cannot write the backup {dest}: {exc.strerror or exc}") from None
    finally:
        _remove_db_files(tmp)
    return BackupReport(source=source, path=dest, size=dest.stat().st_size,
                        schema_version=copy.schema_version, counts=copy.counts,
                        seconds=time.monotonic() - started, warnings=copy.problems)


def _check_destination(source: Path, dest: Path, force: bool) -> None:
    if dest.is_dir():
        raise InputError(f"{dest} is a directory", hint="give a file name for the backup")
    if not dest.parent.is_dir():
        raise InputError(f"folder {dest.parent} does not exist",
                         hint="create it or choose another place for the backup")
    if dest.exists():
        if os.path.samefile(dest, source):
            raise InputError(f"{dest} is the state database itself",
                             hint="choose another file for the backup")
        if not force:
            raise InputError(f"{dest} already exists", hint="pass --force to overwrite it")
    for suffix in ("-wal", "-journal"):
        if _sidecar(dest, suffix).exists():
            raise InputError(f"{_sidecar(dest, suffix)} exists: {dest} looks like a database "
                             "in use", hint="choose another file for the backup")


def _copy_database(source: Path, dest: Path) -> None:
    """Copy with SQLite's backup API in one step (one read transaction: a consistent
    snapshot even while other processes write), as a single file in rollback-journal
    mode, mode 0600, synced to disk. Raises StoreError if the source cannot be read."""
    _remove_db_files(dest)
    fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    os.close(fd)
    try:
        with read_only(source) as src:
            out = sqlite3.connect(dest, timeout=0, isolation_level=None)
            try:
                src.backup(out)
                out.execute("PRAGMA journal_mode = DELETE").fetchall()
            finally:
                out.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot copy {source}: {describe_sqlite_error(exc)}") from None
    fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- restore --------------------------------------------------------------------------------
def restore_store(backup: str | Path, target: str | Path, *,
                  socket_path: str | Path) -> RestoreReport:
    """Replace the state database `target` with the data of `backup`.

    Refused (StateInUse) while a server holds the home of `socket_path`; `backup` is
    validated (InputError naming why) before anything is touched. The current database,
    checkpointed first, is kept as `target.before-restore-<timestamp>`."""
    backup, target, socket_path = Path(backup), Path(target), Path(socket_path)
    if not backup.exists():
        raise InputError(f"no backup at {backup}")
    if backup.is_dir():
        raise InputError(f"{backup} is a directory, not a backup file")
    if target.exists() and os.path.samefile(backup, target):
        raise InputError(f"{backup} is the state database itself", hint="nothing to restore")
    found = check_store(backup)
    if not found.ok:
        more = len(found.problems) - 1
        raise InputError(f"{backup} cannot be restored: {found.problems[0]}"
                         + (f" (and {more} more problems)" if more else ""))
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {target.parent}: {exc.strerror or exc}") from None
    tmp = target.with_name(target.name + ".restore-tmp")
    with server_lock(socket_path):
        try:
            _copy_database(backup, tmp)
            copy = check_store(tmp)
            if not copy.ok:
                raise StoreError(f"the copy of {backup} failed its check: {copy.problems[0]}")
            kept = _set_aside(target)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StoreError(f"cannot restore into {target}: {exc.strerror or exc}") from None
        finally:
            _remove_db_files(tmp)
    return RestoreReport(path=target, source=backup, kept=kept,
                         schema_version=copy.schema_version, counts=copy.counts)


@contextlib.contextmanager
def server_lock(socket_path: Path) -> Iterator[None]:
    """Hold the home's server lock (the one `shipyard server` takes, beside its socket):
    no server can start meanwhile. Raises StateInUse if a server holds it or answers."""
    lock = socket_path.parent / "server.lock"
    home = socket_path.parent
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise StateInUse(f"a Shipyard server is running on {home}: stop the server first",
                             hint=f"its lock {lock} is held") from None
        if _socket_answers(socket_path):
            raise StateInUse(f"a Shipyard server is running on {home}: stop the server first",
                             hint=f"it answers on {socket_path}")
        yield
    finally:
        os.close(fd)


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:  # absent, stale, or a path too long to be ours
            return False
        return True


def _set_aside(target: Path) -> Path | None:
    """Keep the current database as `target.before-restore-<timestamp>` with everything
    its write-ahead log held: checkpointed into it, or (if SQLite cannot read it) kept
    beside it under the matching name. `target` itself stays in place; its log files do
    not (a stale log beside the restored file would be replayed into it)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    kept = target.with_name(f"{target.name}.before-restore-{stamp}")
    n = 1
    while any(p.exists() for p in (kept, *(_sidecar(kept, s) for s in _SIDECARS))):
        n += 1
        kept = target.with_name(f"{target.name}.before-restore-{stamp}-{n}")
    exists = target.exists()
    if exists:
        _checkpoint(target)
        try:
            os.link(target, kept)
        except OSError:
            shutil.copy2(target, kept)
            os.chmod(kept, 0o600)
    for suffix in ("-wal", "-journal"):  # left only when the checkpoint could not run
        side = _sidecar(target, suffix)
        if side.exists():
            if side.stat().st_size:
                os.replace(side, _sidecar(kept, suffix))
            else:
                side.unlink()
    with contextlib.suppress(FileNotFoundError):
        _sidecar(target, "-shm").unlink()  # an index of the log, rebuilt by SQLite
    return kept if exists else None


def _checkpoint(path: Path) -> None:
    """Copy the write-ahead log into the database file and remove it; raises StateInUse
    if another process has the database open. A database SQLite cannot read is left as
    it is (its files are then kept as they are)."""
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=rw"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None)
    except sqlite3.Error:
        return
    try:
        busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error as exc:
        code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
        if code not in (5, 6):
            return  # corrupt or not a database: keep its files untouched
        busy = 1
    finally:
        db.close()
    # The last connection to close removes the log: one left means another process
    # still has the database open, and would write into the file set aside.
    if busy or _sidecar(path, "-wal").exists():
        raise StateInUse(f"state database {path} is in use by another process",
                         hint="stop the Shipyard processes using it first")


# -- files ----------------------------------------------------------------------------------
def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _db_size(path: Path) -> int:
    total = 0
    for p in (path, _sidecar(path, "-wal")):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


def _remove_db_files(path: Path) -> None:
    for p in (path, *(_sidecar(path, s) for s in _SIDECARS)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
