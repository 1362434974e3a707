"""Events about instance output: the log relay (runtime/logrelay.py) or a container's
output thread could not write a log file (output is dropped; the instance runs on), or
can again."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shipyard.runtime.logpipe import Notice
from shipyard.state.base import Event

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine


def output_event(engine: Engine, notice: Notice) -> Event | None:
    """The event for a relay notice ("dropped" / "resumed"); None for anything else."""
    stack, _, instance = str(notice.get("key", "")).partition("/")
    state = engine.stacks_state.get(stack)
    sup = state.supervisors.get(instance) if state is not None else None
    where = {"stack": stack or None, "instance": instance or None,
             "service": sup.record.service if sup is not None else None}
    log = notice.get("log")
    if notice.get("ev") == "dropped":
        return Event("instance.output_dropped",
                     f"output is being dropped: cannot write {log}: {notice.get('error')}",
                     data={"log": log, "error": notice.get("error")}, **where)
    if notice.get("ev") == "resumed":
        return Event("instance.output_resumed",
                     f"output is written again to {log}; {notice.get('dropped')} bytes were"
                     " dropped", data={"log": log, "dropped": notice.get("dropped")}, **where)
    return None
