"""`shipyard state check | backup | restore` on real stores: healthy, corrupted, foreign,
missing; a backup taken while another process keeps writing; restores that keep what was
there; the server's lock; and the installed console script."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.api.server import open_listeners
from shipyard.errors import InputError
from shipyard.state import sqlite_schema
from shipyard.state.base import Event, InstanceRecord, StackRecord
from shipyard.state.maintenance import (
    MissingState,
    StateInUse,
    backup_store,
    check_store,
    restore_store,
)
from shipyard.state.sqlite import SQLiteStore

SHIPYARD = str(Path(sys.executable).parent / "shipyard")
PAGE = 4096

# Appends numbered events until the stop file appears; says "ready" after the first 50.
# With exit_hard it leaves like kill -9 would, without closing (its WAL is not checkpointed).
WRITER = """
import asyncio, os, sys
from pathlib import Path
from shipyard.state.base import Event, StackRecord
from shipyard.state.sqlite import SQLiteStore

async def main(path, stop, limit, exit_hard):
    store = SQLiteStore(path)
    await store.open()
    await store.put_stack(StackRecord("writer", {}))
    i = 0
    while i < limit and not Path(stop).exists():
        await store.append_event(Event("tick", f"e{i}", stack="writer", data={"i": i}))
        i += 1
        if i == 50:
            print("ready", flush=True)
    if exit_hard:
        os._exit(0)
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"))
"""


async def populate(path: Path, *, stack: str = "demo", events: int = 20) -> None:
    """A store as the engine leaves it: a stack, two services (api at revision 2),
    their instances, and `events` events."""
    async with SQLiteStore(path) as store:
        await store.put_stack(StackRecord(stack, {"name": stack}))
        for service in ("api", "db"):
            rev = await store.record_revision(stack, service, {"v": 1}, f"{service}-1")
            await store.put_instance(InstanceRecord(stack, service, f"{service}-1", 1,
                                                    rev.revision, ports={"http": 30001}))
        rev = await store.record_revision(stack, "api", {"v": 2}, "api-2")
        await store.put_instance(InstanceRecord(stack, "api", "api-1", 1, rev.revision))
        for i in range(events):
            await store.append_event(Event("tick", f"event {i}", stack=stack, data={"i": i}))


def make_store(path: Path, **kwargs: object) -> Path:
    asyncio.run(populate(path, **kwargs))  # type: ignore[arg-type]
    return path


def corrupt_middle_page(path: Path) -> None:
    """Overwrite one whole page in the middle of the file with garbage."""
    pages = path.stat().st_size // PAGE
    assert pages >= 4
    with open(path, "r+b") as f:
        f.seek(pages // 2 * PAGE)
        f.write(b"\xab" * PAGE)


def execute(path: Path, *statements: str) -> None:
    """Raw SQL on a store file, as a bug or a bad tool might write it (no foreign keys)."""
    db = sqlite3.connect(path)
    try:
        with db:
            for sql in statements:
                db.execute(sql)
    finally:
        db.close()


def messages(path: Path) -> list[tuple[int, str]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT seq, message FROM events ORDER BY seq").fetchall()
    finally:
        db.close()


def start_writer(path: Path, stop: Path, *, limit: int = 10**9,
                 exit_hard: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(stop), str(limit),
         "1" if exit_hard else "0"], stdout=subprocess.PIPE, text=True)


@pytest.fixture
def short_home() -> Iterator[Path]:
    """A home with a path short enough for a unix socket (tmp_path may be too long)."""
    folder = Path(tempfile.mkdtemp(prefix="sy-", dir="/tmp"))
    try:
        yield folder / "home"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- check ----------------------------------------------------------------------------------
def test_check_a_healthy_store_changes_nothing(tmp_path: Path) -> None:
    db = make_store(tmp_path / "state.db", events=30)
    before = db.read_bytes()
    report = check_store(db)
    assert report.ok, report.problems
    assert report.integrity_ok and report.readable
    assert report.schema_version == sqlite_schema.SCHEMA_VERSION
    assert report.counts == {"stacks": 1, "services": 2, "revisions": 3, "instances": 2,
                             "events": 30}
    assert report.last_event_seq == 30
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.db"]  # no -wal/-shm left


def test_check_a_missing_store_never_creates_it(tmp_path: Path) -> None:
    with pytest.raises(MissingState, match=r"no state at .*; nothing to check") as info:
        check_store(tmp_path / "state.db")
    assert info.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_check_a_corrupted_store(tmp_path: Path) -> None:
    db = make_store(tmp_path / "state.db", events=600)
    corrupt_middle_page(db)
    report = check_store(db)
    assert not report.ok
    assert any(p.startswith(("integrity:", "corrupt:")) for p in report.problems)


def test_check_files_that_are_not_shipyard_stores(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database\n" * 300)
    assert check_store(junk).problems == ["not a SQLite database (file is not a database)"]

    other = tmp_path / "other.db"
    execute(other, "CREATE TABLE things (x)")
    (problem,) = check_store(other).problems
    assert "not a Shipyard store" in problem

    empty = tmp_path / "empty.db"
    empty.touch()
    assert "an empty SQLite database" in check_store(empty).problems[0]

    folder = tmp_path / "dir.db"
    folder.mkdir()
    assert "is a directory" in check_store(folder).problems[0]


def test_check_finds_broken_invariants(tmp_path: Path) -> None:
    path = make_store(tmp_path / "state.db", events=5)
    execute(path,
            "DELETE FROM revisions WHERE service = 'api' AND revision = 2",
            "UPDATE instances SET revision = 9 WHERE instance = 'db-1'",
            "UPDATE sqlite_sequence SET seq = 3 WHERE name = 'events'",
            "UPDATE events SET data = 'not json' WHERE seq = 2",
            "INSERT INTO services VALUES ('ghost', 'svc', 1, 'h')")  # no such stack
    report = check_store(path)
    assert report.integrity_ok
    problems = "\n".join(report.problems)
    assert "service demo/api: its current revision 2 is missing" in problems
    assert "instance demo/api-1: revision 2 of service api is missing" in problems
    assert "instance demo/db-1: revision 9 of service db is missing" in problems
    assert "events: 1 row has data that is not JSON" in problems
    assert "the sequence counter (3) is behind the newest event (5)" in problems
    assert "foreign keys: 1 row of services refers to missing stacks" in problems


def test_check_a_newer_schema(tmp_path: Path) -> None:
    path = make_store(tmp_path / "state.db", events=1)
    execute(path, "UPDATE shipyard_schema SET version = 999")
    report = check_store(path)
    assert report.schema_version == 999 and not report.schema_known
    assert report.problems == [f"schema version 999 is newer than this Shipyard supports "
                               f"({sqlite_schema.SCHEMA_VERSION}): upgrade Shipyard"]


# -- backup ---------------------------------------------------------------------------------
def test_backup_copies_verifies_and_refuses_to_overwrite(tmp_path: Path) -> None:
    source = make_store(tmp_path / "state.db", events=10)
    dest = tmp_path / "backup.db"
    report = backup_store(source, dest)
    assert report.path == dest and report.size == dest.stat().st_size
    assert report.counts["events"] == 10 and report.warnings == []
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.db", "state.db"]
    assert check_store(dest).ok
    assert messages(dest) == messages(source)

    with pytest.raises(InputError, match="already exists") as info:
        backup_store(source, dest)
    assert info.value.exit_code == 2
    asyncio.run(populate(source, stack="more", events=3))
    assert backup_store(source, dest, force=True).counts["stacks"] == 2
    with pytest.raises(InputError, match="is the state database itself"):
        backup_store(source, source, force=True)
    with pytest.raises(MissingState, match="nothing to back up"):
        backup_store(tmp_path / "nothing.db", tmp_path / "b2.db")
    assert not (tmp_path / "nothing.db").exists()


def test_backup_while_another_process_writes(tmp_path: Path) -> None:
    source, stop = tmp_path / "state.db", tmp_path / "stop"
    writer = start_writer(source, stop)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        counts = []
        for n in range(3):
            dest = tmp_path / f"backup-{n}.db"
            report = backup_store(source, dest)
            assert writer.poll() is None, "the writer must still be running"
            assert check_store(dest).integrity_ok
            got = messages(dest)
            # A prefix of what the writer appended, in order, with no gap.
            assert got == [(i + 1, f"e{i}") for i in range(len(got))]
            assert report.counts["events"] == len(got) >= 50
            counts.append(len(got))
            time.sleep(0.1)
    finally:
        stop.touch()
        assert writer.wait(timeout=10) == 0
    final = messages(source)
    assert counts == sorted(counts) and counts[-1] < len(final)
    assert final[:counts[-1]] == messages(tmp_path / "backup-2.db")


# -- restore --------------------------------------------------------------------------------
def test_restore_round_trip_keeps_the_previous_state(short_home: Path) -> None:
    target = short_home / "state.db"
    make_store(target, events=10)
    backup = short_home.parent / "backup.db"
    backup_store(target, backup)
    asyncio.run(populate(target, stack="later", events=5))  # after the backup

    report = restore_store(backup, target, socket_path=short_home / "shipyard.sock")
    assert report.counts["stacks"] == 1 and report.counts["events"] == 10
    assert report.kept is not None and report.kept.name.startswith("state.db.before-restore-")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600

    async def stacks(path: Path) -> list[str]:
        async with SQLiteStore(path) as store:
            return [s.name for s in await store.list_stacks()]

    assert asyncio.run(stacks(target)) == ["demo"]
    assert asyncio.run(stacks(report.kept)) == ["demo", "later"]
    assert check_store(target).ok
    leftovers = {p.name for p in short_home.iterdir()} - {"server.lock"}
    assert leftovers == {"state.db", report.kept.name}


def test_restore_keeps_what_was_only_in_the_write_ahead_log(short_home: Path) -> None:
    target = short_home / "state.db"
    make_store(target, events=3)
    backup = short_home.parent / "backup.db"
    backup_store(target, backup)
    # A writer that dies without closing: its 40 events live only in state.db-wal.
    writer = start_writer(target, short_home / "stop", limit=40, exit_hard=True)
    assert writer.wait(timeout=10) == 0
    wal = short_home / "state.db-wal"
    assert wal.exists() and wal.stat().st_size > 0

    report = restore_store(backup, target, socket_path=short_home / "shipyard.sock")
    assert report.kept is not None
    assert not wal.exists()  # a stale log must not be replayed into the restored file
    kept = messages(report.kept)
    assert len(kept) == 43 and kept[-1][1] == "e39"
    assert len(messages(target)) == 3


def test_restore_refused_while_a_server_holds_the_home(short_home: Path) -> None:
    target = make_store(short_home / "state.db", events=2)
    backup = short_home.parent / "backup.db"
    backup_store(target, backup)
    before = target.read_bytes()
    listeners = open_listeners(short_home / "shipyard.sock")  # the server's own lock
    try:
        with pytest.raises(StateInUse, match="stop the server first") as info:
            restore_store(backup, target, socket_path=short_home / "shipyard.sock")
        assert info.value.exit_code == 1
    finally:
        listeners.close()
    assert target.read_bytes() == before
    assert not any("before-restore" in p.name for p in short_home.iterdir())
    assert restore_store(backup, target, socket_path=short_home / "shipyard.sock").kept


def test_restore_refused_while_another_process_has_the_store_open(short_home: Path) -> None:
    target = make_store(short_home / "state.db", events=2)
    backup = short_home.parent / "backup.db"
    backup_store(target, backup)
    stop = short_home / "stop"
    writer = start_writer(target, stop)  # not a server: it holds no lock
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        with pytest.raises(StateInUse, match="in use by another process"):
            restore_store(backup, target, socket_path=short_home / "shipyard.sock")
    finally:
        stop.touch()
        assert writer.wait(timeout=10) == 0
    assert not any("restore" in p.name for p in short_home.iterdir())
    assert check_store(target).counts["events"] > 50


def test_restore_refuses_invalid_backups_before_touching_anything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    target = make_store(home / "state.db", events=600)
    junk = tmp_path / "junk.db"
    junk.write_text("not a database\n" * 400)
    corrupt = tmp_path / "corrupt.db"
    backup_store(target, corrupt)
    corrupt_middle_page(corrupt)
    newer = tmp_path / "newer.db"
    backup_store(target, newer)
    execute(newer, "UPDATE shipyard_schema SET version = 999")
    foreign = tmp_path / "foreign.db"
    execute(foreign, "CREATE TABLE things (x)")
    cases = {junk: "not a SQLite database", corrupt: "corrupt|integrity",
             newer: "newer than this Shipyard", foreign: "not a Shipyard store",
             tmp_path / "missing.db": "no backup at", target: "the state database itself"}
    before = {p.name: p.read_bytes() for p in home.iterdir()}
    for backup, reason in cases.items():
        with pytest.raises(InputError, match=reason) as info:
            restore_store(backup, target, socket_path=home / "shipyard.sock")
        assert info.value.exit_code == 2
        assert {p.name: p.read_bytes() for p in home.iterdir()} == before  # no lock either


def test_restore_into_an_empty_home(short_home: Path, tmp_path: Path) -> None:
    backup = make_store(tmp_path / "backup.db", events=4)
    report = restore_store(backup, short_home / "state.db",
                           socket_path=short_home / "shipyard.sock")
    assert report.kept is None and report.counts["events"] == 4
    assert stat.S_IMODE(short_home.stat().st_mode) == 0o700
    assert check_store(short_home / "state.db").ok


# -- the console script ---------------------------------------------------------------------
def shipyard(home: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"SHIPYARD_HOME": str(home)}
    env.pop("SHIPYARD_DEBUG", None)
    done = subprocess.run([SHIPYARD, "state", *args], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return done


def test_cli_check(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = shipyard(home, "check", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == f"error: no state at {home / 'state.db'}; nothing to check\n"
    assert not home.exists()

    make_store(home / "state.db", events=600)
    done = shipyard(home, "check", cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    assert "healthy" in done.stdout and "600 events" in done.stdout
    done = shipyard(home, "check", "-o", "json", cwd=tmp_path)
    assert done.returncode == 0
    found = json.loads(done.stdout)
    assert found["ok"] and found["counts"]["services"] == 2 and found["problems"] == []

    corrupt_middle_page(home / "state.db")
    done = shipyard(home, "check", cwd=tmp_path)
    assert done.returncode == 1
    problems = [line for line in done.stdout.splitlines() if line.startswith("problem: ")]
    assert problems and "problem" in done.stdout.splitlines()[0]


def test_cli_backup_and_restore(short_home: Path) -> None:
    work = short_home.parent
    make_store(short_home / "state.db", events=7)
    done = shipyard(short_home, "backup", "b.db", cwd=work)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"backed up {short_home / 'state.db'} to b.db (")
    assert "7 events" in done.stdout
    done = shipyard(short_home, "backup", "b.db", cwd=work)
    assert (done.returncode, done.stderr) == (
        2, "error: b.db already exists (pass --force to overwrite it)\n")

    listeners = open_listeners(short_home / "shipyard.sock")
    try:
        done = shipyard(short_home, "restore", "b.db", cwd=work)
        assert done.returncode == 1
        assert "stop the server first" in done.stderr and len(done.stderr.splitlines()) == 1
    finally:
        listeners.close()

    (work / "junk.db").write_text("junk")
    done = shipyard(short_home, "restore", "junk.db", cwd=work)
    assert done.returncode == 2 and "junk.db cannot be restored: not a SQLite" in done.stderr
    done = shipyard(short_home, "restore", "b.db", cwd=work)
    assert done.returncode == 0, done.stderr
    assert "the previous state is kept as" in done.stdout
