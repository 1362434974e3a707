"""Instance output, the engine's side: events when the log relay (runtime/logrelay.py)
or a container's output thread could not write a log file (output is dropped; the
instance runs on) or can again, and the rotation of the log files no relay writes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shipyard.runtime.logpipe import Notice
from shipyard.runtime.logs import rotate_if_needed
from shipyard.state.base import Event

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine


def on_log_notice(engine: Engine, notice: Notice) -> None:
    """A relay notice: an event (recorded in a task of its own)."""
    def service_of(stack: str, instance: str) -> str | None:
        state = engine.stacks_state.get(stack)
        sup = state.supervisors.get(instance) if state is not None else None
        return sup.record.service if sup is not None else None

    event = output_event(notice, service_of)
    if event is not None:
        engine.emit_soon(event)


async def rotate_logs(engine: Engine) -> None:
    """Level-triggered housekeeping: rotate the log files instances write themselves
    (containers' output threads, instances started before the relay); the relay rotates
    its own."""
    config = engine.config
    while True:
        await asyncio.sleep(config.reconcile_interval)
        for state in list(engine.stacks_state.values()):
            for sup in list(state.supervisors.values()):
                if "log_fifo" in sup.record.runtime:
                    continue
                path = config.log_path(state.stack.name, sup.name)
                with contextlib.suppress(OSError):
                    rotate_if_needed(path, config.log_max_bytes, config.log_backups)


def output_event(notice: Notice, service_of: Callable[[str, str], str | None],
                 **data: Any) -> Event | None:
    """The event for a relay notice ("dropped" / "resumed"); None for anything else.
    `service_of(stack, instance)` names the instance's service; `data` is added to the
    event's (e.g. the node)."""
    stack, _, instance = str(notice.get("key", "")).partition("/")
    where = {"stack": stack or None, "instance": instance or None,
             "service": service_of(stack, instance)}
    log = notice.get("log")
    if notice.get("ev") == "dropped":
        return Event("instance.output_dropped",
                     f"output is being dropped: cannot write {log}: {notice.get('error')}",
                     data={"log": log, "error": notice.get("error"), **data}, **where)
    if notice.get("ev") == "resumed":
        return Event("instance.output_resumed",
                     f"output is written again to {log}; {notice.get('dropped')} bytes were"
                     " dropped", data={"log": log, "dropped": notice.get("dropped"), **data},
                     **where)
    return None
