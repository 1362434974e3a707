"""Instance log files: rotation, tail and follow.

Instances write their own log file (opened O_APPEND), so rotation is copytruncate: the
file is copied to `<path>.1` (older copies shifted to `.2` ...) and then truncated in
place; the writer's next append lands at the new end, no reopen needed. Lines written
between the copy and the truncation are lost (a window of microseconds); that is the price
of a writer we cannot ask to reopen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import BinaryIO

_BLOCK = 64 * 1024


def backup_path(path: str | os.PathLike[str], n: int) -> str:
    return f"{os.fspath(path)}.{n}"


def rotate(path: str | os.PathLike[str], backups: int) -> None:
    """Rotate `path` now: shift `.1`→`.2`… (dropping the oldest), copy the file to `.1`
    atomically, then truncate it in place. With `backups` = 0 it is only truncated."""
    path = os.fspath(path)
    if backups > 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(backup_path(path, backups))
        for n in range(backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(backup_path(path, n), backup_path(path, n + 1))
        tmp = backup_path(path, 1) + ".tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, backup_path(path, 1))
    os.truncate(path, 0)


def rotate_if_needed(path: str | os.PathLike[str], max_bytes: int, backups: int) -> bool:
    """Rotate `path` if it is larger than `max_bytes` (0 = never); True if it was.
    A missing file is not an error (the instance has not written yet)."""
    if max_bytes <= 0:
        return False
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    rotate(path, backups)
    return True


@dataclass(frozen=True)
class _Watched:
    max_bytes: int
    backups: int


class LogRotator:
    """Rotates a set of log files when they grow past their limit. Call `check()`
    periodically (it does blocking I/O; `check_async()` runs it in a thread), or run
    `run()` as a task."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._files: dict[str, _Watched] = {}

    def watch(self, path: str | os.PathLike[str], max_bytes: int, backups: int) -> None:
        self._files[os.fspath(path)] = _Watched(max_bytes, backups)

    def unwatch(self, path: str | os.PathLike[str]) -> None:
        self._files.pop(os.fspath(path), None)

    @property
    def paths(self) -> list[str]:
        return list(self._files)

    def check(self) -> list[str]:
        """Rotate the files that need it; the paths rotated. Errors on one file (e.g. a
        full disk) do not stop the others."""
        rotated = []
        for path, w in list(self._files.items()):
            try:
                if rotate_if_needed(path, w.max_bytes, w.backups):
                    rotated.append(path)
            except OSError:
                continue
        return rotated

    async def check_async(self) -> list[str]:
        return await asyncio.to_thread(self.check)

    async def run(self) -> None:
        while True:
            await self.check_async()
            await asyncio.sleep(self.interval)


def tail_lines(path: str | os.PathLike[str], n: int) -> list[str]:
    """The last `n` lines of a file (without their newline), reading backwards from the
    end in blocks; [] when the file does not exist."""
    if n <= 0:
        return []
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return []
    with f:
        end = f.seek(0, os.SEEK_END)
        pos, data = end, b""
        # n lines need n newlines before them (plus one if the last line is complete).
        while pos > 0 and data.count(b"\n") <= n:
            step = min(_BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data and pos == 0 and end == 0:
        return []
    lines = data.split(b"\n")
    return [line.decode("utf-8", "replace") for line in lines[-n:]]


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


async def follow(path: str | os.PathLike[str], *, from_end: bool = True,
                 poll: float = 0.2) -> AsyncIterator[str]:
    """Yield the lines appended to `path` (without their newline), forever.

    Survives rotation: after a copytruncate (the file shrank, or `.1` was replaced and
    the file is now smaller than it) the end of the copy not read yet is yielded from
    `.1`, then the file is followed again from its start; a file replaced by a new one
    (rename rotation) is reopened; a missing file is waited for.
    """
    path = os.fspath(path)
    first = backup_path(path, 1)
    f = None
    ino = -1
    pos = 0
    partial = b""
    copy_key = _stat_key(first)
    started = False
    try:
        while True:
            if f is None:
                try:
                    f = open(path, "rb")  # noqa: SIM115 - closed in finally
                except FileNotFoundError:
                    started = True  # everything it will hold is new
                    await asyncio.sleep(poll)
                    continue
                ino = os.fstat(f.fileno()).st_ino
                pos = f.seek(0, os.SEEK_END) if (from_end and not started) else 0
                started = True
            f.seek(pos)
            chunk = f.read(_BLOCK)
            if chunk:
                pos += len(chunk)
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    yield line.decode("utf-8", "replace")
                continue
            # Nothing new: was the file rotated?
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            new_copy = _stat_key(first)
            if st is None or st.st_ino != ino:  # removed or replaced: finish it, reopen
                for line in _rest_of(f, pos, partial):
                    yield line
                partial = b""
                f.close()
                f = None
                copy_key = new_copy
                if st is None:
                    await asyncio.sleep(poll)
                continue
            copied = new_copy is not None and new_copy != copy_key
            if st.st_size < pos or (copied and new_copy is not None
                                    and st.st_size < new_copy[1]):
                # Truncated. After a copytruncate what we had not read yet is at the
                # end of the fresh copy.
                rest = b""
                if copied:
                    with contextlib.suppress(OSError), open(first, "rb") as g:
                        rest = _read_from(g, pos)
                for line in _rest_of(None, pos, partial + rest):
                    yield line
                partial = b""
                pos = 0
                copy_key = new_copy
                continue
            await asyncio.sleep(poll)
    finally:
        if f is not None:
            f.close()


def _read_from(f: BinaryIO, pos: int) -> bytes:
    if os.fstat(f.fileno()).st_size <= pos:
        return b""
    f.seek(pos)
    return f.read()


def _rest_of(f: BinaryIO | None, pos: int, partial: bytes) -> list[str]:
    """The lines of `partial` followed by what `f` holds after `pos`, the last one even
    without a newline."""
    data = partial
    if f is not None:
        with contextlib.suppress(OSError):
            data += _read_from(f, pos)
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return []
    return [line.decode("utf-8", "replace") for line in data.split(b"\n")]
