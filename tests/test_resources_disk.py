"""Disk quotas: measuring real directories (blocks used, sparse files, symlinks, hard links,
time budget), the quota verdict, and the DiskWatcher acting on a directory that fills up."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from shipyard.resources.disk import (
    EVENT_OVER,
    DiskTarget,
    DiskWatcher,
    QuotaVerdict,
    check_quota,
    measure_usage,
)

MI = 2**20


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())


def test_measures_blocks_in_use(tmp_path: Path) -> None:
    write(tmp_path / "a.bin", MI)
    write(tmp_path / "sub" / "deeper" / "b.bin", 2 * MI)
    usage = measure_usage(tmp_path)
    assert usage.complete and usage.files == 2 and usage.errors == 0
    assert 3 * MI <= usage.bytes < 3 * MI + 256 * 1024  # data plus directory blocks
    assert measure_usage(tmp_path / "missing") == measure_usage(tmp_path / "missing")
    assert measure_usage(tmp_path / "missing").bytes == 0
    assert measure_usage(tmp_path / "a.bin").bytes >= MI  # a file alone is measured too


def test_sparse_files_symlinks_and_hard_links(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    with open(vol / "sparse", "wb") as f:
        f.truncate(512 * MI)  # 512Mi long, nothing written
    outside = tmp_path / "outside.bin"
    write(outside, 4 * MI)
    (vol / "link").symlink_to(outside)  # not followed
    (vol / "dirlink").symlink_to(tmp_path)  # a loop, were it followed
    write(vol / "data", MI)
    os.link(vol / "data", vol / "data-again")  # the same blocks, counted once
    usage = measure_usage(vol)
    assert usage.complete and usage.files == 4  # sparse, link, dirlink, data (not again)
    assert MI <= usage.bytes < 2 * MI


def test_time_budget_gives_a_lower_bound(tmp_path: Path) -> None:
    for i in range(600):
        (tmp_path / f"d{i % 5}").mkdir(exist_ok=True)
        write(tmp_path / f"d{i % 5}" / f"f{i}", 4096)
    ticks = iter(range(10**6))
    usage = measure_usage(tmp_path, time_budget=3, clock=lambda: float(next(ticks)))
    assert not usage.complete and 0 < usage.files < 600
    full = measure_usage(tmp_path)
    assert full.complete and full.files == 600 and full.bytes > usage.bytes


def test_quota_verdicts() -> None:
    assert check_quota(5, 0) == QuotaVerdict("unlimited", 5, 0)
    assert check_quota(89, 100).status == "ok"
    assert check_quota(90, 100).status == "near"
    assert check_quota(100, 100).status == "near"
    assert check_quota(101, 100).over
    assert check_quota(101, 100, complete=False).over  # a lower bound already over
    assert check_quota(50, 100, complete=False).status == "unknown"
    assert check_quota(3 * MI, 2 * MI).describe() == "3Mi used of 2Mi (150%)"
    assert check_quota(MI, 2 * MI, complete=False).describe() == (
        "at least 1Mi used of 2Mi (50%)")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []
        self.stopped: list[str] = []

    async def on_event(self, kind: str, target: DiskTarget, verdict: QuotaVerdict) -> None:
        self.events.append((kind, target.owner, verdict.usage))

    async def stop(self, target: DiskTarget, verdict: QuotaVerdict) -> None:
        self.stopped.append(target.owner)


async def test_watcher_warns_once_per_crossing(tmp_path: Path) -> None:
    work = tmp_path / "api"
    work.mkdir()
    targets = [DiskTarget("demo/api-1", (str(work),), 2 * MI, "warn"),
               DiskTarget("demo/api-2", (str(work),), 2 * MI, "warn"),  # same workdir
               DiskTarget("demo/web-1", (str(tmp_path / "web"),), 0)]  # no quota
    rec = Recorder()
    watcher = DiskWatcher(lambda: targets, rec.on_event, rec.stop, interval=0.01)
    verdicts = await watcher.check_once()
    assert set(verdicts) == {"demo/api-1", "demo/api-2"}
    assert verdicts["demo/api-1"].status == "ok" and rec.events == []
    write(work / "log-1", MI)
    assert (await watcher.check_once())["demo/api-1"].status in ("ok", "near")
    write(work / "log-2", 2 * MI)  # the directory fills up: 3Mi of 2Mi
    await watcher.check_once()
    assert [(k, o) for k, o, _ in rec.events] == [(EVENT_OVER, "demo/api-1"),
                                                 (EVENT_OVER, "demo/api-2")]
    assert rec.events[0][2] >= 3 * MI and rec.stopped == []
    await watcher.check_once()  # still over: no new event
    assert len(rec.events) == 2
    (work / "log-2").unlink()  # back under, then over again: reported again
    await watcher.check_once()
    write(work / "log-3", 2 * MI)
    await watcher.check_once()
    assert len(rec.events) == 4


async def test_watcher_stops_for_stop_action(tmp_path: Path) -> None:
    vol = tmp_path / "volumes" / "demo" / "data"
    vol.mkdir(parents=True)
    cache = tmp_path / "volumes" / "demo" / "cache"
    target = DiskTarget("demo/db-1", (str(vol), str(cache)), 3 * MI, "stop")
    running = [target]
    rec = Recorder()

    async def stop(t: DiskTarget, verdict: QuotaVerdict) -> None:
        await rec.stop(t, verdict)
        running.clear()  # the engine stops it: no longer a target

    watcher = DiskWatcher(lambda: running, rec.on_event, stop, interval=0.01)
    write(vol / "table", 2 * MI)
    await watcher.check_once()
    assert rec.stopped == []
    write(cache / "blob", 2 * MI)  # the two volumes together: 4Mi of 3Mi
    task = watcher.start()
    for _ in range(200):
        if rec.stopped:
            break
        await asyncio.sleep(0.01)
    await watcher.close()
    assert task.done() and rec.stopped == ["demo/db-1"]
    assert rec.events and rec.events[0][:2] == (EVENT_OVER, "demo/db-1")
    running.append(target)  # restarted, still over: stopped again at the next round
    await watcher.check_once()
    assert rec.stopped == ["demo/db-1", "demo/db-1"] and len(rec.events) == 2


async def test_watcher_survives_a_failing_callback(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "big", 2 * MI)
    calls: list[int] = []

    async def broken(kind: str, target: DiskTarget, verdict: QuotaVerdict) -> None:
        calls.append(1)
        raise RuntimeError("store is down")

    rec = Recorder()
    watcher = DiskWatcher(lambda: [DiskTarget("s/a-1", (str(tmp_path),), MI)], broken,
                          rec.stop, interval=0.01)
    watcher.start()
    for _ in range(200):
        if len(calls) >= 2:
            break
        await asyncio.sleep(0.01)
    await watcher.close()
    assert len(calls) >= 2  # the loop went on after the failure
    assert "s/a-1: acting on its disk quota failed" in caplog.text
