"""Disk quotas: how much a service's volumes hold, and what to do when it is too much.

`resources.disk` is a quota on what an instance keeps on disk: for a process, its working
directory; for a container, its named volumes (the folders `<home>/volumes/<stack>/<name>`
of the container runtime). Nothing stops a write at the limit (that would need
filesystem project quotas, which few hosts have set up): the usage is measured
periodically and `resources.disk_action` says what happens when it is over: `warn` (the
default) records a `resource.disk-over-quota` event, `stop` also stops the instance.

Measuring is `du -x`-like: the blocks files really take (st_blocks x 512, so sparse files
count what they use), symlinks not followed, hard links counted once, other filesystems
mounted inside not entered. It is bounded in time: past its budget it stops and returns
what it found as a lower bound (`complete=False`); a lower bound already over the quota
is still over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("shipyard.resources.disk")

EVENT_OVER = "resource.disk-over-quota"
NEAR = 0.9  # from this fraction of the quota, the verdict is "near"
DiskAction = Literal["warn", "stop"]
Status = Literal["unlimited", "ok", "near", "over", "unknown"]


@dataclass(frozen=True)
class DiskUsage:
    bytes: int
    files: int
    complete: bool  # False: the walk ran out of time (or met unreadable directories)
    errors: int = 0  # directories that could not be read


def measure_usage(path: str | os.PathLike[str], *, time_budget: float = 2.0,
                  clock: Callable[[], float] = time.monotonic) -> DiskUsage:
    """Bytes the files under `path` take on disk (see the module docstring). A missing
    `path` holds nothing."""
    deadline = clock() + time_budget
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return DiskUsage(0, 0, True)
    if not stat.S_ISDIR(top.st_mode):
        return DiskUsage(top.st_blocks * 512, 1, True)
    device = top.st_dev
    total, files, errors = top.st_blocks * 512, 0, 0
    seen: set[tuple[int, int]] = set()
    pending = [os.fspath(path)]
    checked = 0
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    checked += 1
                    if checked % 256 == 0 and clock() > deadline:
                        return DiskUsage(total, files, False, errors)
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed meanwhile
                    if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
                        key = (info.st_dev, info.st_ino)
                        if key in seen:
                            continue
                        seen.add(key)
                    if stat.S_ISDIR(info.st_mode):
                        if info.st_dev != device:
                            continue  # another filesystem mounted here
                        pending.append(entry.path)
                    else:
                        files += 1
                    total += info.st_blocks * 512
        except OSError:
            errors += 1
        if clock() > deadline and pending:
            return DiskUsage(total, files, False, errors)
    return DiskUsage(total, files, errors == 0, errors)


@dataclass(frozen=True)
class QuotaVerdict:
    status: Status
    usage: int
    quota: int

    @property
    def over(self) -> bool:
        return self.status == "over"

    def describe(self) -> str:
        if self.status == "unlimited":
            return f"{_size(self.usage)} used, no quota"
        share = f"{100 * self.usage / self.quota:.0f}%" if self.quota else "?"
        bound = "at least " if self.status == "unknown" else ""
        return f"{bound}{_size(self.usage)} used of {_size(self.quota)} ({share})"


def check_quota(usage: int, quota: int, *, complete: bool = True) -> QuotaVerdict:
    """The verdict for `usage` bytes against `quota` bytes (0: no quota). An incomplete
    measurement is a lower bound: "over" when it already exceeds the quota, else
    "unknown"."""
    if quota <= 0:
        return QuotaVerdict("unlimited", usage, quota)
    if usage > quota:
        return QuotaVerdict("over", usage, quota)
    if not complete:
        return QuotaVerdict("unknown", usage, quota)
    return QuotaVerdict("near" if usage >= NEAR * quota else "ok", usage, quota)


def _size(n: int) -> str:
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= factor:
            return f"{n / factor:.3g}{unit}"
    return f"{n}B"


@dataclass(frozen=True)
class DiskTarget:
    """One running instance with a disk quota, and the directories counted against it."""

    owner: str  # the instance, e.g. "demo/api-1"
    paths: tuple[str, ...]
    quota: int  # bytes (resources.disk)
    action: DiskAction = "warn"  # resources.disk_action


OnEvent = Callable[[str, DiskTarget, QuotaVerdict], Awaitable[None]]
StopInstance = Callable[[DiskTarget, QuotaVerdict], Awaitable[None]]


class DiskWatcher:
    """Measures the volumes of running instances every `interval` seconds and acts on
    those over their quota. It knows nothing of the engine: it gets three callbacks.

    - `targets()`: the instances to check now, as `DiskTarget`s: every running instance
      whose service has `resources.disk > 0`; `paths` is the instance's workdir for a
      process (`instance_workdir(stack, svc)`), the folders of its named volumes for a
      container (`<runtime.volumes_dir>/<stack>/<volume>`); `action` is
      `svc.resources.disk_action`.
    - `on_event(kind, target, verdict)`: record an event; kind is `EVENT_OVER`
      ("resource.disk-over-quota"), emitted when an instance goes over its quota (once,
      not every round; again if it went back under first, or after it was stopped).
    - `stop_instance(target, verdict)`: stop the instance (for `action == "stop"`; the
      engine's usual stop, so its restart policy then applies: a restarted instance
      still over quota is stopped again at the next round).

    The engine calls `watcher.start()` (it makes the `run()` task) once its loop runs,
    next to its other periodic tasks, and `await watcher.close()` when it shuts down. Each
    directory is measured once per round, in a worker thread, within `time_budget`
    seconds; replicas sharing a workdir share its usage.
    """

    def __init__(self, targets: Callable[[], Iterable[DiskTarget]], on_event: OnEvent,
                 stop_instance: StopInstance, *, interval: float = 30.0,
                 time_budget: float = 2.0) -> None:
        self.targets = targets
        self.on_event = on_event
        self.stop_instance = stop_instance
        self.interval = interval
        self.time_budget = time_budget
        self._over: set[str] = set()  # owners reported over quota and not since under
        self._task: asyncio.Task[None] | None = None
        self.last: dict[str, QuotaVerdict] = {}  # the latest verdict of each owner

    async def check_once(self) -> dict[str, QuotaVerdict]:
        """One round: measure, report, stop; the verdict of each target."""
        targets = [t for t in self.targets() if t.quota > 0]
        usage: dict[str, DiskUsage] = {}
        for path in dict.fromkeys(p for t in targets for p in t.paths):
            usage[path] = await asyncio.to_thread(measure_usage, path,
                                                  time_budget=self.time_budget)
        verdicts: dict[str, QuotaVerdict] = {}
        for target in targets:
            parts = [usage[p] for p in target.paths]
            verdict = check_quota(sum(u.bytes for u in parts), target.quota,
                                  complete=all(u.complete for u in parts))
            verdicts[target.owner] = verdict
            try:
                await self._act(target, verdict)
            except Exception:  # one failing callback does not hold up the other targets
                log.exception("%s: acting on its disk quota failed", target.owner)
        current = {t.owner for t in targets}
        self._over &= current  # forget instances that are gone
        self.last = verdicts
        return verdicts

    async def _act(self, target: DiskTarget, verdict: QuotaVerdict) -> None:
        if not verdict.over:
            if verdict.status != "unknown":
                self._over.discard(target.owner)
            return
        if target.owner not in self._over:
            log.warning("%s: disk usage over quota: %s (%s)", target.owner,
                        verdict.describe(), ", ".join(target.paths))
            await self.on_event(EVENT_OVER, target, verdict)
            self._over.add(target.owner)  # (after: an event that failed is sent again)
        if target.action == "stop":
            await self.stop_instance(target, verdict)
            self._over.discard(target.owner)  # a restarted instance is reported again

    async def run(self) -> None:
        """Check every `interval` seconds until cancelled; a failing round is logged and
        does not end the loop."""
        while True:
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("disk quota check failed")
            await asyncio.sleep(self.interval)

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(),
                                                                name="shipyard-disk")
        return self._task

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
