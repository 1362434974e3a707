"""Day-2 commands for counts and rollouts: scale, autoscale --resume, top, promote, abort."""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from shipyard.cli.commands_read import STACK_OPTION
from shipyard.cli.commands_spec import OUTPUT_OPTION
from shipyard.cli.context import Context, pick_stack
from shipyard.spec.base import MAX_REPLICAS


@click.command()
@click.argument("service")
@click.argument("replicas", type=click.IntRange(min=0, max=MAX_REPLICAS))
@STACK_OPTION
@click.pass_context
def scale(ctx: click.Context, service: str, replicas: int, stack: str | None) -> None:
    """Run REPLICAS instances of SERVICE. New ones join its router once ready; removed ones
    are drained first. Suspends the service's autoscaling until `autoscale --resume`."""
    with Context.of(ctx).client() as client:
        name = pick_stack(client, stack)
        result = client.scale(name, service, replicas)
    click.echo(f"{service}: {replicas} instance(s) (+{result.get('added', 0)} "
               f"-{result.get('removed', 0)})")


@click.command()
@click.argument("service")
@click.option("--resume", is_flag=True, required=True,
              help="let the autoscaler decide the count again after a manual scale")
@STACK_OPTION
@click.pass_context
def autoscale(ctx: click.Context, service: str, resume: bool, stack: str | None) -> None:
    """Resume autoscaling of SERVICE after `shipyard scale` suspended it."""
    with Context.of(ctx).client() as client:
        name = pick_stack(client, stack)
        client.resume_autoscale(name, service)
    click.echo(f"{service}: autoscaling resumed")


@click.command()
@click.argument("service")
@STACK_OPTION
@click.pass_context
def promote(ctx: click.Context, service: str, stack: str | None) -> None:
    """Promote the rollout of SERVICE in progress (a blue-green swap or canary waiting
    for promotion goes on; a canary skips its remaining steps)."""
    with Context.of(ctx).client() as client:
        name = pick_stack(client, stack)
        result = client.promote(name, service)
    click.echo(f"{service}: promoted (was: {result.get('phase')})")


@click.command()
@click.argument("service")
@STACK_OPTION
@click.pass_context
def abort(ctx: click.Context, service: str, stack: str | None) -> None:
    """Abort the rollout of SERVICE in progress and roll it back."""
    with Context.of(ctx).client() as client:
        name = pick_stack(client, stack)
        result = client.abort(name, service)
    click.echo(f"{service}: rollout aborted (was: {result.get('phase')})")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}Mi"


def top_table(view: dict[str, Any]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("SERVICE/INSTANCE", "STATE", "CPU", "MEMORY", "REQ/S", "ERR", "P99",
                   "CONNS", "AUTOSCALE"):
        table.add_column(column)
    for service, figures in sorted(view.items()):
        router = figures.get("router", {})
        auto = figures.get("autoscale")
        how = "-"
        if auto:
            decision = (auto.get("decision") or {}).get("reason", "")
            how = (f"{auto['min']}..{auto['max']}"
                   + (" suspended" if auto.get("suspended") else "")
                   + (f": {decision}" if decision else ""))
        p99 = router.get("latency_p99")
        rps = router.get("requests_per_second")
        table.add_row(f"[bold]{service}[/] ({figures['replicas']})", "", "", "",
                      "-" if rps is None else f"{rps:.1f}",
                      _pct(router.get("error_rate")),
                      "-" if p99 is None else f"{p99 * 1000:.0f}ms",
                      "-" if "connections" not in router else f"{router['connections']:.1f}",
                      how)
        for inst in figures.get("instances", []):
            table.add_row(f"  {inst['instance']}", inst["state"], _pct(inst.get("cpu")),
                          _mib(inst.get("rss")), "", "", "", "", "")
    return table


@click.command()
@STACK_OPTION
@OUTPUT_OPTION
@click.option("--watch", "-w", is_flag=True, help="refresh every --interval until Ctrl-C")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="seconds between refreshes")
@click.pass_context
def top(ctx: click.Context, stack: str | None, output: str, watch: bool,
        interval: float) -> None:
    """Live figures per service and instance: CPU, memory, requests, errors, latency, and
    the autoscaler's latest decision."""
    with Context.of(ctx).client() as client:
        name = pick_stack(client, stack)
        view = client.top(name)
        if output == "json":
            click.echo(json.dumps(view, indent=2))
            return
        if not watch:
            Console().print(top_table(view))
            return
        with Live(top_table(view), refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(interval)
                    live.update(top_table(client.top(name)))
            except KeyboardInterrupt:
                pass
