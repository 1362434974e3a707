"""Day-2 operations: restart a service, and see the operation queue."""

from __future__ import annotations

import json
import time

import click
from rich.console import Console
from rich.table import Table

from shipyard.cli.commands_read import STACK_OPTION
from shipyard.cli.commands_spec import OUTPUT_OPTION
from shipyard.cli.context import Context, pick_stack

PRIORITY_OPTION = click.option(
    "--priority", type=click.Choice(["critical", "high", "normal", "low"]), default="normal",
    show_default=True, help="the operation's place in the queue")


@click.command()
@click.argument("service")
@click.option("--rolling", is_flag=True,
              help="one instance at a time, the next once the previous is ready again")
@STACK_OPTION
@PRIORITY_OPTION
@click.pass_context
def restart(ctx: click.Context, service: str, rolling: bool, stack: str | None,
            priority: str) -> None:
    """Restart the instances of SERVICE (all at once, or --rolling)."""
    with Context.of(ctx).client() as client:
        name = pick_stack(client, stack)
        result = client.restart(name, service, rolling=rolling, priority=priority)
    how = " one at a time" if result.get("rolling") else ""
    click.echo(f"restarted {', '.join(result.get('restarted', [])) or 'nothing'}{how}")


@click.command()
@click.argument("service")
@OUTPUT_OPTION
@STACK_OPTION
@click.pass_context
def history(ctx: click.Context, service: str, output: str, stack: str | None) -> None:
    """The revisions of SERVICE: when, what changed, outcome; * marks the current one."""
    with Context.of(ctx).client() as client:
        name = pick_stack(client, stack)
        revisions = client.history(name, service)
    if output == "json":
        click.echo(json.dumps(revisions, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("REV", "WHEN", "OUTCOME", "CHANGED"):
        table.add_column(column)
    for rev in revisions:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rev["created_at"]))
        mark = "*" if rev["current"] else " "
        table.add_row(f"{mark}{rev['revision']}", when, rev["outcome"],
                      ", ".join(rev["changed"]))
    Console().print(table)


@click.command()
@click.argument("service")
@click.option("--to", "to", type=click.IntRange(min=1), default=None, metavar="REV",
              help="the revision (default: the previous deployed one)")
@STACK_OPTION
@click.pass_context
def rollback(ctx: click.Context, service: str, to: int | None, stack: str | None) -> None:
    """Deploy an earlier revision of SERVICE again; the rest of the stack is untouched."""
    with Context.of(ctx).client() as client:
        name = pick_stack(client, stack)
        result = client.rollback(name, service, to)
    if result.ok:
        click.echo(f"rolled {service} back in {result.duration:.1f}s")
        return
    click.echo(f"rollback of {service} failed: "
               + "; ".join(f"{k}: {v}" for k, v in result.failed.items()), err=True)
    raise click.exceptions.Exit(1)


@click.command()
@STACK_OPTION
@click.pass_context
def recover(ctx: click.Context, stack: str | None) -> None:
    """Partial recovery: restart only the failed services and their dependents."""
    with Context.of(ctx).client() as client:
        name = pick_stack(client, stack)
        result = client.recover(name)
    if not result.get("recovered"):
        click.echo(f"nothing to recover: every service of {name} runs")
        return
    click.echo(f"recovered {', '.join(result['recovered'])}"
               + (f"; restarted dependents {', '.join(result['restarted'])}"
                  if result.get("restarted") else ""))
    if not result.get("ok", True):
        raise click.exceptions.Exit(1)


@click.command()
@OUTPUT_OPTION
@STACK_OPTION
@click.option("--all", "show_all", is_flag=True, help="finished operations too")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.pass_context
def ops(ctx: click.Context, output: str, stack: str | None, show_all: bool,
        limit: int) -> None:
    """The operation queue: what runs, what waits, and (with --all) what finished."""
    states = None if show_all else ["queued", "running"]
    with Context.of(ctx).client() as client:
        found = client.operations(stack=stack, states=states, limit=limit)
    if output == "json":
        click.echo(json.dumps(found, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "KIND", "TARGET", "PRIORITY", "STATE", "AGE", "ERROR"):
        table.add_column(column)
    now = time.time()
    for op in found:
        target = op["stack"] + (f"/{op['service']}" if op.get("service") else "")
        table.add_row(str(op["id"]), op["kind"], target, op["priority"], op["state"],
                      f"{now - op['created_at']:.0f}s", op.get("error") or "")
    Console().print(table)
