"""Endless responses: the event stream and followed logs.

Every stream also ends when the server shuts down (`closing` is set), so that a graceful
shutdown never waits on a client that follows forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

from shipyard.api.models import event_view
from shipyard.state.base import StateStore

T = TypeVar("T")
_DONE = object()


async def merge(sources: list[AsyncIterator[T]], closing: asyncio.Event) -> AsyncIterator[T]:
    """Items of all `sources` as they come, until every source ends or `closing` is set."""
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=1000)

    async def pump(source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                await queue.put(item)
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)

    async def watch_closing() -> None:
        await closing.wait()
        await queue.put(_DONE)

    pumps = [asyncio.create_task(pump(source)) for source in sources]
    closer = asyncio.create_task(watch_closing())

    async def all_done() -> None:
        await asyncio.gather(*pumps, return_exceptions=True)
        await queue.put(_DONE)

    finisher = asyncio.create_task(all_done())
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, Exception):
                raise item
            yield item  # type: ignore[misc]
    finally:
        for task in (*pumps, closer, finisher):
            task.cancel()
        await asyncio.gather(*pumps, closer, finisher, return_exceptions=True)
        for source in sources:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


async def latest_seq(store: StateStore) -> int:
    """The sequence number of the newest event (0 when there is none)."""
    return await store.last_event_seq()


async def event_lines(store: StateStore, *, after: int, stack: str | None,
                      service: str | None, closing: asyncio.Event) -> AsyncIterator[bytes]:
    """NDJSON: every event after `after`, then each new one, until the server closes."""
    watch = store.watch_events(after=after, stack=stack)
    async for event in merge([watch], closing):
        if service is not None and event.service != service:
            continue
        yield (json.dumps(event_view(event)) + "\n").encode()


def prefixer(files: list[tuple[str, Path]]) -> dict[str, str]:
    """The "instance | " prefix of each instance, padded so that lines align."""
    width = max((len(name) for name, _ in files), default=0)
    return {name: f"{name:<{width}} | " for name, _ in files}


def _clean(line: str) -> str:
    return line.rstrip("\r\n") + "\n"


def tail_text(files: list[tuple[str, Path]], tail: int | None) -> list[str]:
    """The last `tail` lines of each instance's log (all of them when None), prefixed."""
    from shipyard.runtime.logs import tail_lines

    prefixes = prefixer(files)
    out: list[str] = []
    for name, path in files:
        if tail is None:
            try:
                with path.open(encoding="utf-8", errors="replace") as f:
                    lines = f.readlines()
            except FileNotFoundError:
                lines = []
        elif tail <= 0:
            lines = []
        else:
            lines = tail_lines(path, tail)
        out.extend(prefixes[name] + _clean(line) for line in lines)
    return out


async def log_lines(files: list[tuple[str, Path]], *, tail: int | None,
                    closing: asyncio.Event) -> AsyncIterator[bytes]:
    """The tail of every log, then the lines appended to any of them, merged as they
    come, until the server closes."""
    from shipyard.runtime.logs import follow

    for line in tail_text(files, tail):
        yield line.encode()
    prefixes = prefixer(files)

    async def tagged(name: str, path: Path) -> AsyncIterator[str]:
        async for line in follow(path, from_end=True):
            yield prefixes[name] + _clean(line)

    async for line in merge([tagged(name, path) for name, path in files], closing):
        yield line.encode()
