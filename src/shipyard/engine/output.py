"""Events about instance output: the log relay (runtime/logrelay.py) or a container's
output thread could not write a log file (output is dropped; the instance runs on), or
can again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shipyard.runtime.logpipe import Notice
from shipyard.state.base import Event


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
