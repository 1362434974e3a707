"""Instance logs: copytruncate rotation (also under a live writer), tail, follow across
rotation."""

from __future__ import annotations

import asyncio
import os
import textwrap
import uuid
from pathlib import Path

import pytest

from shipyard.runtime.base import LaunchSpec
from shipyard.runtime.logs import LogRotator, follow, rotate, rotate_if_needed, tail_lines
from shipyard.runtime.process import ProcessRuntime
from tests.conftest import PYTHON


def append(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def test_rotate_if_needed_shifts_and_truncates(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    assert not rotate_if_needed(log, 10, 2)  # missing: nothing to do
    append(log, "first\n")
    assert not rotate_if_needed(log, 10, 2)
    for word in ("second", "third", "fourth"):
        append(log, f"{word} line\n")
        assert rotate_if_needed(log, 10, 2)
        assert log.stat().st_size == 0
    assert (tmp_path / "app.log.1").read_text() == "fourth line\n"
    assert (tmp_path / "app.log.2").read_text() == "third line\n"
    assert not (tmp_path / "app.log.3").exists()  # only `backups` copies are kept
    assert not (tmp_path / "app.log.1.tmp").exists()
    append(log, "x" * 20)
    assert not rotate_if_needed(log, 0, 2)  # 0 = never
    rotate(log, 0)  # no backups: truncated only
    assert log.stat().st_size == 0
    assert (tmp_path / "app.log.1").read_text() == "fourth line\n"


def test_log_rotator(tmp_path: Path) -> None:
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    append(a, "a" * 100)
    append(b, "b" * 10)
    rotator = LogRotator()
    rotator.watch(a, 50, 1)
    rotator.watch(b, 50, 1)
    rotator.watch(tmp_path / "missing.log", 50, 1)
    assert rotator.check() == [str(a)]
    assert rotator.check() == []
    rotator.unwatch(b)
    assert rotator.paths == [str(a), str(tmp_path / "missing.log")]


WRITER = textwrap.dedent("""
    import sys, time
    for i in range(int(sys.argv[1])):
        print(f"line {i:06d} " + "x" * 40, flush=True)
        if i % 50 == 0:
            time.sleep(0.001)
""")


async def test_rotation_under_a_writing_child(tmp_path: Path) -> None:
    runtime = ProcessRuntime(cgroups="off")
    log = tmp_path / "w.log"
    spec = LaunchSpec(stack=f"logs-{uuid.uuid4().hex[:6]}", service="w", instance="w-1",
                      argv=[PYTHON, "-c", WRITER, "20000"], env={}, workdir=str(tmp_path),
                      log_path=str(log))
    handle = await runtime.start(spec)
    waiter = asyncio.create_task(runtime.wait(handle))
    rotations = 0
    while not waiter.done():
        if rotate_if_needed(log, 64 * 1024, 50):
            rotations += 1
        await asyncio.sleep(0.005)
    assert await waiter == 0
    await runtime.close()
    assert rotations >= 3
    chunks = [tmp_path / f"w.log.{n}" for n in range(50, 0, -1)] + [log]
    data = b"".join(p.read_bytes() for p in chunks if p.exists())
    assert b"\0" not in data  # O_APPEND: the writer follows the truncation, no holes
    numbers = [int(line.split()[1]) for line in data.decode().splitlines()]
    assert numbers == sorted(set(numbers))  # in order, no duplicates
    # copytruncate may lose what is written between a copy and its truncation only (that
    # includes the very last lines, when the last rotation falls just after them): a few
    # lines per rotation at most, never a whole stretch.
    lost = 20000 - len(numbers)
    assert 0 <= lost <= 50 * rotations and numbers[-1] >= 19999 - lost


def test_tail_lines(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    assert tail_lines(log, 5) == []
    log.write_text("")
    assert tail_lines(log, 5) == []
    lines = [f"{i}:" + "y" * (i % 300) for i in range(5000)]  # spans many 64 KiB blocks
    log.write_text("\n".join(lines) + "\n")
    assert tail_lines(log, 3) == lines[-3:]
    assert tail_lines(log, 1234) == lines[-1234:]
    assert tail_lines(log, 10**6) == lines
    assert tail_lines(log, 0) == []
    log.write_text("one\ntwo\npartial")  # no newline at the end
    assert tail_lines(log, 2) == ["two", "partial"]
    log.write_text("\n\nlast\n")
    assert tail_lines(log, 5) == ["", "", "last"]


async def collect(agen: object, n: int, timeout: float = 10.0) -> list[str]:
    out: list[str] = []

    async def run() -> None:
        async for line in agen:  # type: ignore[attr-defined]
            out.append(line)
            if len(out) == n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_follow_from_end_and_from_start(tmp_path: Path) -> None:
    log = tmp_path / "f.log"
    append(log, "old 1\nold 2\n")
    gen = follow(log, poll=0.01)
    task = asyncio.create_task(collect(gen, 2))
    await asyncio.sleep(0.1)
    append(log, "new 1\nnew ")
    await asyncio.sleep(0.05)
    append(log, "2\n")
    assert await task == ["new 1", "new 2"]
    await gen.aclose()
    gen = follow(log, from_end=False, poll=0.01)
    assert await collect(gen, 4) == ["old 1", "old 2", "new 1", "new 2"]
    await gen.aclose()


async def test_follow_waits_for_the_file(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    gen = follow(log, poll=0.01)
    task = asyncio.create_task(collect(gen, 1))
    await asyncio.sleep(0.1)
    append(log, "hello\n")
    assert await task == ["hello"]
    await gen.aclose()


@pytest.mark.parametrize("rotation", ["copytruncate", "rename"])
async def test_follow_across_rotation(tmp_path: Path, rotation: str) -> None:
    log = tmp_path / "r.log"
    append(log, "")
    gen = follow(log, poll=0.01)
    expected = [f"line {i}" for i in range(300)]
    task = asyncio.create_task(collect(gen, len(expected)))
    await asyncio.sleep(0.05)
    for i, line in enumerate(expected):
        append(log, line + "\n")
        if i % 40 == 39:
            if rotation == "copytruncate":
                rotate(log, 2)  # often before the follower has read the last lines
            else:
                os.replace(log, tmp_path / "r.log.1")
                append(log, "")
        if i % 7 == 0:
            await asyncio.sleep(0.003)
    assert await task == expected
    await gen.aclose()
