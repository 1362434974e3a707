"""The durable, prioritized operation queue.

Every mutating request becomes an `OperationRecord` persisted before it runs. The queue runs
them by priority (critical, high, normal, low; FIFO within one), never two at once on the
same service (a stack-wide operation conflicts with every operation on that stack), at most
`max_concurrent` at a time, each within its timeout. A control plane that starts finds the
operations its predecessor left: queued ones run; running ones are resumed when their kind
is convergent (re-running it reaches the same end state) and otherwise failed, with a
reason, so that nothing is lost and nothing runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shipyard.errors import Busy, InputError, NotFoundError, ShipyardError
from shipyard.state.base import Event, OperationRecord, OpState, StateStore

log = logging.getLogger(__name__)

PRIORITIES = {"critical": 0, "high": 1, "normal": 2, "low": 3}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}

Handler = Callable[[OperationRecord], Awaitable[dict[str, Any]]]


def parse_priority(value: str | int) -> int:
    if isinstance(value, int) and value in PRIORITY_NAMES:
        return value
    if isinstance(value, str) and value in PRIORITIES:
        return PRIORITIES[value]
    raise InputError(f"unknown priority {value!r}",
                     hint=f"one of {', '.join(PRIORITIES)}")


def conflicts(a: OperationRecord, b: OperationRecord) -> bool:
    """Two operations may not interleave: same stack, and either is stack-wide or both
    are on the same service."""
    return a.stack == b.stack and (a.service is None or b.service is None
                                   or a.service == b.service)


class OperationQueue:
    def __init__(self, store: StateStore, *, max_concurrent: int = 100,
                 max_queued: int = 1000,
                 emit: Callable[[Event], Awaitable[Any]] | None = None,
                 finished: Callable[[], None] | None = None) -> None:
        self.store = store
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.handlers: dict[str, Handler] = {}
        self.resumable: set[str] = set()
        self._emit = emit
        self._finished = finished  # told whenever an operation has left the running set
        self._queued: list[OperationRecord] = []
        self._running: dict[int, tuple[OperationRecord, asyncio.Task[None]]] = {}
        self._done: dict[int, asyncio.Future[OperationRecord]] = {}
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._accepting = True

    def register(self, kind: str, handler: Handler, *, resumable: bool) -> None:
        self.handlers[kind] = handler
        if resumable:
            self.resumable.add(kind)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Pick up what a previous control plane left, then start dispatching."""
        left = await self.store.list_operations(states=(OpState.QUEUED, OpState.RUNNING))
        known = {op.id for op in self._queued}  # submitted here before start()
        for op in left:
            if op.id in known:
                continue
            if op.state is OpState.RUNNING:
                if op.kind in self.resumable:
                    await self._event(op, "op.resumed",
                                      f"resuming {self.describe(op)} after a control-plane "
                                      f"restart (attempt {op.attempts + 1})")
                else:
                    await self._finish(op, OpState.FAILED, error=(
                        "interrupted by a control-plane restart; not resumed because it is "
                        "not safe to run twice: run it again"))
                    continue
            self._queued.append(op)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="operations")

    async def close(self, *, cancel_running: bool = True) -> None:
        """Stop dispatching. Running operations are cancelled and stay `running` in the
        store, to be resumed (or failed) by the next control plane."""
        self._accepting = False
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        if cancel_running:
            for _, task in list(self._running.values()):
                task.cancel()
            for _, task in list(self._running.values()):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # -- submitting and waiting ---------------------------------------------------------
    async def submit(self, op: OperationRecord) -> OperationRecord:
        if op.kind not in self.handlers:
            raise InputError(f"unknown operation {op.kind!r}")
        if not self._accepting:
            raise Busy("the control plane is shutting down; not accepting operations",
                       hint="retry once the next server runs")
        queued = len(self._queued)
        # Overload: low-priority work is refused first, then normal; high and critical
        # are always taken (they are what gets a struggling system back).
        limit = {3: self.max_queued // 2, 2: self.max_queued}.get(op.priority)
        if limit is not None and queued >= limit:
            raise Busy(f"busy: {queued} operations are queued; "
                       f"{PRIORITY_NAMES[op.priority]}-priority work is refused for now",
                       hint="retry later")
        op.state = OpState.QUEUED
        await self.store.put_operation(op)
        self._queued.append(op)
        await self._event(op, "op.queued", f"queued {self.describe(op)}")
        self._wake.set()
        return op

    async def wait(self, op_id: int) -> OperationRecord:
        """Wait until the operation has finished; its final record."""
        op = await self.store.get_operation(op_id)
        if op is None:
            raise NotFoundError(f"no operation {op_id}")
        if op.state.finished:
            return op
        fut = self._done.setdefault(op_id, asyncio.get_running_loop().create_future())
        return await asyncio.shield(fut)

    async def cancel(self, *, stack: str, kinds: tuple[str, ...] = ("apply",)) -> None:
        """Cancel queued and running operations of `kinds` on `stack` (e.g. a `down`
        supersedes a deploy in progress)."""
        for op in [o for o in self._queued if o.stack == stack and o.kind in kinds]:
            self._queued.remove(op)
            await self._finish(op, OpState.CANCELLED, error="superseded")
        for op, task in list(self._running.values()):
            if op.stack == stack and op.kind in kinds:
                op.error = "superseded"
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def running(self, stack: str | None = None) -> list[OperationRecord]:
        return [op for op, _ in self._running.values() if stack in (None, op.stack)]

    def queued(self) -> list[OperationRecord]:
        return sorted(self._queued, key=_order)

    @staticmethod
    def describe(op: OperationRecord) -> str:
        target = f"{op.stack}/{op.service}" if op.service else op.stack
        return f"{op.kind} {target} (#{op.id}, {PRIORITY_NAMES.get(op.priority, op.priority)})"

    # -- running ------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            for op in self._runnable():
                self._queued.remove(op)
                task = asyncio.create_task(self._execute(op), name=f"op:{op.id}")
                assert op.id is not None
                self._running[op.id] = (op, task)
            await self._wake.wait()

    def _runnable(self) -> list[OperationRecord]:
        chosen: list[OperationRecord] = []
        busy: dict[str, list[OperationRecord]] = {}  # by stack: running or chosen now
        for op, _ in self._running.values():
            busy.setdefault(op.stack, []).append(op)
        running = len(self._running)
        waiting: dict[str, list[OperationRecord]] = {}  # by stack: ahead in line, held
        for op in sorted(self._queued, key=_order):
            if running + len(chosen) >= self.max_concurrent:
                break
            # An operation never overtakes an older (or higher-priority) one that it
            # conflicts with, nor interleaves with a running one.
            if any(conflicts(op, o) for o in busy.get(op.stack, ())) or any(
                    conflicts(op, o) for o in waiting.get(op.stack, ())):
                waiting.setdefault(op.stack, []).append(op)
                continue
            chosen.append(op)
            busy.setdefault(op.stack, []).append(op)
        return chosen

    async def _execute(self, op: OperationRecord) -> None:
        assert op.id is not None
        op.state, op.started_at = OpState.RUNNING, op.started_at or time.time()
        op.attempts += 1
        await self.store.put_operation(op)
        await self._event(op, "op.started", f"running {self.describe(op)}")
        t0 = time.monotonic()
        try:
            result = await asyncio.wait_for(self.handlers[op.kind](op), op.timeout)
        except TimeoutError:
            await self._finish(op, OpState.FAILED,
                               error=f"timed out after {op.timeout:g}s")
        except asyncio.CancelledError:
            if op.error == "superseded":
                await self._finish(op, OpState.CANCELLED, error="superseded")
            else:  # control plane shutting down: left `running`, resumed by the next one
                raise
        except ShipyardError as exc:
            await self._finish(op, OpState.FAILED, error=exc.render())
        except Exception as exc:  # a bug: the operation fails, the queue carries on
            log.exception("operation %s failed", self.describe(op))
            await self._finish(op, OpState.FAILED, error=f"internal error: {exc!r}")
        else:
            ok = result.get("ok", True)
            await self._finish(op, OpState.SUCCEEDED if ok else OpState.FAILED,
                               result=result, error="" if ok else result.get("error", "failed"),
                               duration=time.monotonic() - t0)
        finally:
            self._running.pop(op.id, None)
            self._wake.set()
            if self._finished is not None:
                self._finished()

    async def _finish(self, op: OperationRecord, state: OpState, *, error: str = "",
                      result: dict[str, Any] | None = None, duration: float | None = None,
                      ) -> None:
        op.state, op.error, op.finished_at = state, error, time.time()
        if result is not None:
            op.result = result
        await self.store.put_operation(op)
        took = f" in {duration:.2f}s" if duration is not None else ""
        what = {OpState.SUCCEEDED: "done", OpState.FAILED: "failed",
                OpState.CANCELLED: "cancelled"}[state]
        await self._event(op, f"op.{what}",
                          f"{what}: {self.describe(op)}{took}" + (f": {error}" if error else ""))
        fut = self._done.pop(op.id or -1, None)
        if fut is not None and not fut.done():
            fut.set_result(op)

    async def _event(self, op: OperationRecord, kind: str, message: str) -> None:
        if self._emit is not None:
            await self._emit(Event(kind, message, stack=op.stack, service=op.service,
                                   data={"op": op.id, "kind": op.kind,
                                         "priority": op.priority, "state": op.state.value}))


def _order(op: OperationRecord) -> tuple[int, int]:
    return (op.priority, op.id or 0)
