"""Nodes: `shipyard agent` (run a node), `shipyard nodes` (list them) and `shipyard place`
(place a stack's instances on them). All three talk to the etcd store directly, not to a
server: see docs/nodes.md."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from shipyard.cli.commands_spec import FILE_OPTION
from shipyard.cli.context import Context, load_stack_file
from shipyard.engine.config import default_store
from shipyard.errors import InputError

if TYPE_CHECKING:
    from shipyard.agent.scheduler import NodeScheduler, PlaceReport
    from shipyard.state.base import InstanceRecord
    from shipyard.state.etcd import EtcdStore

STORE_OPTION = click.option(
    "--store", metavar="URL", default=None,
    help="the etcd store, etcd://host:2379[,...][/cluster] (default: $SHIPYARD_STORE)")


def _store_url(store: str | None) -> str:
    url = store or default_store()
    if not url or not url.startswith("etcd://"):
        raise click.UsageError("nodes need an etcd store: --store etcd://host:2379[/cluster]")
    return url


def _labels(items: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        labels[key.strip()] = value.strip()
    return labels


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ours = logging.getLogger("shipyard")
    ours.handlers.clear()
    ours.propagate = True


@click.command()
@STORE_OPTION
@click.option("--node", required=True, metavar="NAME", help="this node's name")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="a label placement constraints can ask for (repeatable)")
@click.option("--home", "agent_home", metavar="DIR", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="where the agent keeps instance logs (default: the Shipyard home)")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="the address this node's instances answer on")
@click.option("--lease-ttl", type=click.IntRange(1, 60), default=5, show_default=True,
              metavar="SECONDS", help="the heartbeat lease: a dead agent's node is lost "
                                      "within it")
@click.pass_context
def agent(ctx: click.Context, store: str | None, node: str, labels: tuple[str, ...],
          agent_home: Path | None, address: str, lease_ttl: int) -> None:
    """Run this machine as node NAME: register it, keep it alive, run what is assigned."""
    from shipyard.agent.agent import Agent

    home = (agent_home.expanduser().resolve() if agent_home else Context.of(ctx).home)
    runner = Agent(_store_url(store), node, home=home, labels=_labels(labels),
                   address=address, lease_ttl=lease_ttl)
    _logging()

    async def main() -> None:
        stop = asyncio.Event()
        with _stop_on_signals(stop):
            task = asyncio.create_task(runner.run(stop))
            registered = asyncio.create_task(runner.registered.wait())
            await asyncio.wait([task, registered], return_when=asyncio.FIRST_COMPLETED)
            if registered.done():
                click.echo(f"shipyard agent: node {node} registered on {runner.store.url} "
                           f"(lease {lease_ttl}s)", err=True)
            else:
                registered.cancel()
            await task

    asyncio.run(main())
    click.echo(f"shipyard agent: node {node} stopped", err=True)


async def _open(url: str) -> tuple[EtcdStore, NodeScheduler]:
    from shipyard.agent.scheduler import NodeScheduler
    from shipyard.state.etcd import EtcdStore
    from shipyard.state.factory import open_store

    store = open_store(url)
    if not isinstance(store, EtcdStore):
        raise InputError("nodes need an etcd store")
    await store.open()
    scheduler = NodeScheduler(store)
    try:
        await scheduler.open()
    except BaseException:
        await store.close()
        raise
    return store, scheduler


def _size(value: float) -> str:
    from shipyard.resources.capacity import format_amount

    return format_amount("memory", value)


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@click.command()
@STORE_OPTION
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def nodes(store: str | None, output: str) -> None:
    """The registered nodes: state, capacity, labels, instances."""
    url = _store_url(store)

    async def main() -> list[dict[str, Any]]:
        db, scheduler = await _open(url)
        try:
            return [{**vars(v.record), "alive": v.alive, "instances": v.instances,
                     "state": v.record.state if v.alive or v.record.state != "ready"
                     else "unreachable"} for v in await scheduler.nodes()]
        finally:
            await scheduler.close()
            await db.close()

    found = asyncio.run(main())
    if output == "json":
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("no nodes registered (start one with `shipyard agent --node NAME`)")
        return
    rows = [["NODE", "STATE", "CPU", "MEMORY", "DISK", "GPU", "LABELS", "ADDRESS",
             "INSTANCES"]]
    for n in found:
        rows.append([n["name"], n["state"], f"{n['cpu']:g}", _size(n["memory"]),
                     _size(n["disk"]), str(n["gpu"]),
                     ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-",
                     n["address"], ",".join(n["instances"]) or "-"])
    _table(rows)


@click.command()
@FILE_OPTION
@STORE_OPTION
@click.option("--timeout", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="how long to wait for the agents to report the instances running")
@click.option("--follow", is_flag=True,
              help="then keep scheduling: record lost nodes, re-place their instances "
                   "(until Ctrl-C)")
@click.option("--interval", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="with --follow: seconds between passes besides those node changes wake")
@click.option("--remove", is_flag=True,
              help="take the stack off the nodes instead (its agents stop its instances)")
@click.pass_context
def place(ctx: click.Context, file: str | None, store: str | None, timeout: float,
          follow: bool, interval: float, remove: bool) -> None:
    """Place the stack's instances on the registered nodes and wait until they run."""
    url = _store_url(store)
    stack = load_stack_file(file)
    if follow:
        _logging()

    async def main() -> int:
        db, scheduler = await _open(url)
        scheduler.interval = interval
        try:
            if remove:
                count = await scheduler.remove_stack(stack.name)
                click.echo(f"stack {stack.name} taken off the nodes ({count} instances)")
                return 0
            report = await scheduler.place_stack(stack)
            for name, why in sorted(report.unplaced.items()):
                click.echo(f"unplaced: {name}: {why}", err=True)
            code = 1 if report.unplaced else 0
            try:
                records = await scheduler.wait_running(stack.name, timeout,
                                                       instances=report.where)
            except TimeoutError as exc:
                click.echo(f"error: {exc}", err=True)
                records, code = await db.list_instances(stack=stack.name), 1
            _print_placement(report, records)
            if follow:
                click.echo("following the nodes (Ctrl-C to stop)", err=True)
                stop = asyncio.Event()
                with _stop_on_signals(stop):
                    await scheduler.run(stop)
            return code
        finally:
            await scheduler.close()
            await db.close()

    ctx.exit(asyncio.run(main()))


def _print_placement(report: PlaceReport, records: list[InstanceRecord]) -> None:
    where = report.where
    rows = [["INSTANCE", "NODE", "STATE", "PID", "PORTS"]]
    for r in sorted(records, key=lambda r: (r.service, r.index)):
        rows.append([r.instance, where.get(r.instance, "-"), r.state.value,
                     str(r.pid or "-"),
                     ",".join(f"{k}={v}" for k, v in r.ports.items()) or "-"])
    _table(rows)
    sys.stdout.flush()
