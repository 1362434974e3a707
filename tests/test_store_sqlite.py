"""SQLite store specifics: the factory, files and modes, errors, locks, checkpoints.

Tests run as root, so `chmod 000` does not make a file unreadable: unreadable stores are
tested with a directory where the file should be and with files that are not databases.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from shipyard.errors import InputError, StoreError
from shipyard.state import sqlite_db
from shipyard.state.base import StackRecord
from shipyard.state.factory import open_store
from shipyard.state.sqlite import SQLiteStore
from tests.test_store import collect, ev, inst


# -- factory --------------------------------------------------------------------------------
def test_open_store_accepts_paths_and_sqlite_urls(tmp_path: Path) -> None:
    for where in (tmp_path / "a.db", str(tmp_path / "a.db"), f"sqlite://{tmp_path}/a.db"):
        s = open_store(where)
        assert isinstance(s, SQLiteStore) and s.path == tmp_path / "a.db"


@pytest.mark.parametrize(("url", "says"), [
    ("sqlite://relative/state.db", "absolute"),
    ("redis://x", "unknown store type"),
    ("", "empty"),
])
def test_open_store_rejects_other_urls(url: str, says: str) -> None:
    with pytest.raises(InputError, match=says):
        open_store(url)


# -- SQLite specifics -----------------------------------------------------------------------
async def test_creates_private_folder_and_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "home" / "state.db"
    async with SQLiteStore(path) as s:
        await s.put_stack(StackRecord("s", {}))
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    async with SQLiteStore(path) as s:  # reopening keeps data and schema
        assert await s.get_stack("s") is not None
        assert isinstance(s, SQLiteStore) and await s.schema_version() >= 1


async def test_garbage_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database at all\n" * 200)
    with pytest.raises(StoreError, match=r"state\.db is not a SQLite database") as info:
        await SQLiteStore(path).open()
    assert info.value.hint and "move it away" in info.value.hint
    assert "\n" not in info.value.render()


async def test_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    # As root, chmod 000 does not stop us reading: a directory stands in for "unreadable".
    (tmp_path / "state.db").mkdir()
    with pytest.raises(StoreError, match="is a directory"):
        await SQLiteStore(tmp_path / "state.db").open()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create state store"):
        await SQLiteStore(tmp_path / "file" / "state.db").open()


async def test_foreign_or_newer_database_is_a_store_error(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(StoreError, match="not a Shipyard store"):
        await SQLiteStore(foreign).open()
    newer = tmp_path / "newer.db"
    async with SQLiteStore(newer):
        pass
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE shipyard_schema SET version = 999")
    with pytest.raises(StoreError, match="newer than this Shipyard supports") as info:
        await SQLiteStore(newer).open()
    assert "upgrade Shipyard" in info.value.render()


async def test_lock_held_too_long_is_a_store_error_without_blocking_the_loop(
        tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with SQLiteStore(path, busy_timeout=0.3) as s:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        with pytest.raises(StoreError, match=f"{path} is locked by another process"):
            await s.put_stack(StackRecord("s", {}))
        t.cancel()
        assert ticks >= 10  # the loop kept running while we waited
        assert await s.list_stacks() == []  # reads are not blocked by the writer
        other.execute("ROLLBACK")
        await s.put_stack(StackRecord("s", {}))  # and the store recovers
        other.close()


async def test_per_transaction_commit_mode(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "state.db", group_commit=False) as s:
        await s.put_stack(StackRecord("s", {}))

        async def register(i: int) -> None:
            async with s.transaction():
                await s.put_instance(inst("s", f"api-{i}", i))
                if i % 5 == 0:
                    raise ValueError

        await asyncio.gather(*(register(i) for i in range(200)), return_exceptions=True)
        await asyncio.gather(*(s.put_instance(inst("s", f"db-{i}", i)) for i in range(200)))
        assert len(await s.list_instances("s", "api")) == 160
        assert len(await s.list_instances("s", "db")) == 200


async def test_prune_events_keeps_the_newest(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "state.db") as s:
        for i in range(20):
            await s.append_event(ev(f"e{i}"))
        assert await s.prune_events(5) == 15
        assert [e.kind for e in await s.list_events()] == [f"e{i}" for i in range(15, 20)]
        last = (await s.list_events())[-1].seq
        assert (await s.append_event(ev("next"))).seq == (last or 0) + 1  # never reused
        assert await s.prune_events(0) == 6 and await s.list_events() == []


async def test_closed_store_errors_and_ends_watchers(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "state.db")
    with pytest.raises(StoreError, match="not open"):
        await s.put_stack(StackRecord("s", {}))
    await s.open()
    watcher = asyncio.create_task(collect(s.watch_events(), 10))
    await asyncio.sleep(0.02)
    await s.close()
    assert await asyncio.wait_for(watcher, 2) == []
    with pytest.raises(StoreError, match="not open"):
        await s.list_stacks()


def test_wal_mode_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def make() -> None:
        async with SQLiteStore(path) as s:
            await s.put_stack(StackRecord("s", {}))

    asyncio.run(make())
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert {"stacks", "services", "revisions", "instances", "events",
            "shipyard_schema", "events_by_stack"} <= tables
    assert os.path.getsize(path) > 0


async def test_background_checkpoints_keep_the_wal_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_db, "CHECKPOINT_AFTER", 20)
    path = tmp_path / "state.db"
    async with SQLiteStore(path) as s:
        await s.put_stack(StackRecord("s", {}))
        for round_ in range(30):  # bursts and single writes, checkpoints in between
            await asyncio.gather(*(s.put_instance(inst("s", f"api-{round_}-{i}", i))
                                   for i in range(20)))
            for i in range(10):
                await s.append_event(ev(f"e{round_}-{i}"))
            await asyncio.sleep(0)
        assert len(await s.list_instances("s")) == 600
        seqs = [e.seq for e in await s.list_events(limit=1000)]
        assert seqs == list(range(1, 301))
        wal = Path(f"{path}-wal")
        assert wal.stat().st_size < 2 * 2**20  # restarted, not grown (300+ commits)
        assert s._ckpt_task is not None  # a checkpoint ran in the background
    assert not wal.exists()  # closing checkpoints and removes the WAL
