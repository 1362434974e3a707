"""How things look on a terminal: instance tables, event lines, plans, deploy summaries."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

from shipyard.engine.results import DeployResult, PlanReport

PS_COLUMNS = ("SERVICE", "INSTANCE", "STATE", "READY", "PID", "PORTS", "RESTARTS", "EXIT",
              "UPTIME", "REV")
JSON_KEYS = ("stack", "service", "instance", "state", "ready", "pid", "ports", "restarts",
             "exit_code", "revision", "health", "message", "started_at", "uptime")
STATE_STYLE = {"ready": "green", "completed": "green", "running": "yellow",
               "starting": "yellow", "pending": "dim", "backoff": "red", "failed": "bold red",
               "stopping": "yellow", "stopped": "dim"}


def console(err: bool = False) -> Console:
    stream = sys.stderr if err else sys.stdout
    tty = stream.isatty()
    # Off a terminal rich would wrap at 80 columns; lines must stay whole for scripts.
    return Console(file=stream, width=None if tty else 250, soft_wrap=not tty,
                   highlight=False)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def ports_text(ports: dict[str, int]) -> str:
    return ",".join(f"{name}={port}" for name, port in ports.items()) or "-"


def instance_json(inst: dict[str, Any]) -> dict[str, Any]:
    return {key: inst.get(key) for key in JSON_KEYS}


def ps_table(instances: list[dict[str, Any]], *, title: str | None = None) -> Table:
    table = Table(*PS_COLUMNS, box=None, title=title, title_justify="left", pad_edge=False,
                  header_style="bold")
    for inst in instances:
        state = str(inst.get("state", "?"))
        table.add_row(
            str(inst.get("service", "")), str(inst.get("instance", "")),
            f"[{STATE_STYLE.get(state, '')}]{state}[/]" if state in STATE_STYLE else state,
            "yes" if inst.get("ready") else "no",
            str(inst["pid"]) if inst.get("pid") else "-",
            ports_text(inst.get("ports") or {}),
            str(inst.get("restarts", 0)),
            "-" if inst.get("exit_code") is None else str(inst["exit_code"]),
            duration(inst.get("uptime")),
            str(inst.get("revision", "-")),
        )
    return table


def print_ps(instances: list[dict[str, Any]]) -> None:
    out = console()
    stacks = sorted({str(i.get("stack")) for i in instances})
    if not instances:
        out.print("no instances")
        return
    for stack in stacks:
        rows = [i for i in instances if str(i.get("stack")) == stack]
        out.print(ps_table(rows, title=f"stack {stack}" if len(stacks) > 1 else None))


def event_line(event: dict[str, Any]) -> str:
    """One event as a line: time, kind, what it is about, message."""
    stamp = time.strftime("%H:%M:%S", time.localtime(float(event.get("ts", 0))))
    who = event.get("instance") or event.get("service") or event.get("stack") or "-"
    return f"{stamp} {event.get('kind', '?'):<20} {who:<16} {event.get('message', '')}"


def print_events(events: Iterable[dict[str, Any]], output: str) -> None:
    for event in events:
        line = json.dumps(event) if output == "json" else event_line(event)
        print(line, flush=True)


CHANGE_MARK = {"add": "+", "change": "~", "remove": "-", "unchanged": "="}


def print_plan(report: PlanReport) -> None:
    out = console()
    out.print(f"stack [bold]{report.stack}[/]: {report.strategy} deploy, "
              f"at most {report.max_parallel} at once")
    for i, phase in enumerate(report.phases, 1):
        out.print(f"  phase {i}: {', '.join(phase)}")
    for change in report.changes:
        fields = f" ({', '.join(change.fields)})" if change.fields else ""
        how = f" [dim]by {change.how}[/]" if change.how and change.action == "change" else ""
        out.print(f"  {CHANGE_MARK.get(change.action, '?')} {change.service}: "
                  f"{change.action}{fields}{how}", highlight=False)
    todo = [c for c in report.changes if c.action != "unchanged"]
    out.print(f"{len(todo)} to change, {len(report.changes) - len(todo)} unchanged")


def result_lines(result: DeployResult) -> list[str]:
    if result.ok:
        lines = [f"stack {result.stack} deployed in {result.duration:.1f}s"]
    else:
        lines = [f"stack {result.stack}: deploy FAILED after {result.duration:.1f}s"]
    if result.started:
        lines.append(f"  started: {', '.join(result.started)}")
    if result.unchanged:
        lines.append(f"  unchanged: {', '.join(result.unchanged)}")
    if result.removed:
        lines.append(f"  removed: {', '.join(result.removed)}")
    for service, reason in sorted(result.failed.items()):
        lines.append(f"  failed: {service}: {reason}")
    if result.skipped:
        lines.append(f"  skipped (a dependency failed): {', '.join(result.skipped)}")
    if result.rolled_back:
        lines.append("  rolled back")
    return lines


def print_result(result: DeployResult, instances: list[dict[str, Any]]) -> None:
    out = console()
    if instances:
        out.print(ps_table(instances))
    for line in result_lines(result):
        out.print(line, style=None if result.ok else "red", markup=False)
