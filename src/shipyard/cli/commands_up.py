"""Commands that change the world: up, down, and running the server itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING

import click

from shipyard import __version__
from shipyard.cli.commands_spec import FILE_OPTION
from shipyard.cli.context import Context, NoStack, is_tty, load_stack_file, pick_stack
from shipyard.cli.render import print_result
from shipyard.engine.results import DeployResult
from shipyard.errors import NotFoundError
from shipyard.spec.models import Stack

if TYPE_CHECKING:
    from shipyard.api.client import Client
    from shipyard.cli.foreground import ControlPlaneThread
    from shipyard.engine.config import EngineConfig


@click.command()
@FILE_OPTION
@click.option("-d", "--detach", is_flag=True,
              help="hand the stack to the background server and return")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="with -d: wait until the deploy is over")
@click.pass_context
def up(ctx: click.Context, file: str | None, detach: bool, wait: bool) -> None:
    """Apply the stack: plan, deploy in dependency order, then supervise it.

    In the foreground (the default) the stack runs until Ctrl-C, which stops it gracefully;
    with -d the background server keeps it running."""
    home = Context.of(ctx)
    stack = load_stack_file(file)
    code = up_detached(home, stack, wait) if detach else up_foreground(home, stack)
    ctx.exit(code)


def up_detached(home: Context, stack: Stack, wait: bool) -> int:
    home.ensure_server()
    with home.client() as client:
        if not wait:
            client.submit(stack)
            click.echo(f"deploying stack {stack.name} in the background "
                       "(follow it with `shipyard events -f`)")
            return 0
        if is_tty():
            from shipyard.cli.foreground import watch_deploy

            result, _ = watch_deploy(client, home.client, stack, client.submit(stack))
        else:
            result = client.apply(stack)
        _summary(client, result)
    return 0 if result.ok else 1


def up_foreground(home: Context, stack: Stack) -> int:
    from shipyard.cli.foreground import (
        ControlPlaneThread,
        interrupt_on_sigterm,
        shielded,
        supervise,
        watch_deploy,
    )

    plane: ControlPlaneThread | None = None
    ok = True
    submitted = False
    with interrupt_on_sigterm(), home.client() as client:
        try:
            if not client.is_running():
                plane = ControlPlaneThread(_foreground_config(home))
                plane.start()
                plane.wait_ready()
            report = client.submit(stack)
            submitted = True
            result, after = watch_deploy(client, home.client, stack, report)
            ok = result.ok
            _summary(client, result)
            if not ok and not _exists(client, stack.name):
                return 1
            _note(f"supervising stack {stack.name}; press Ctrl-C to stop it")
            supervise(client, stack.name, after)
        except KeyboardInterrupt:
            pass
        finally:
            with shielded("still stopping gracefully (waiting for instances to exit)..."):
                _stop(client, plane, stack.name, submitted)
    return 0 if ok else 1


def _foreground_config(home: Context) -> EngineConfig:
    from shipyard.engine.config import EngineConfig

    # Only the stack this `up` submitted is stopped on exit (see _stop); stacks the
    # in-process engine re-adopted from the store are left running, as a server would.
    return EngineConfig(home=home.home)


def _stop(client: Client, plane: ControlPlaneThread | None, name: str,
          submitted: bool) -> None:
    if plane is not None:
        if submitted:
            _note(f"stopping stack {name}...")
            with contextlib.suppress(NotFoundError):
                client.down(name)
        plane.stop()
        plane.join()
        if submitted:
            _note("stopped")
        if isinstance(plane.error, Exception):  # it crashed on its own
            raise plane.error
    elif submitted:
        _note(f"stopping stack {name}...")
        with contextlib.suppress(NotFoundError):
            client.down(name)
        _note(f"stack {name} is down")


def _note(text: str) -> None:
    click.echo(text, err=True)


def _exists(client: Client, name: str) -> bool:
    return any(s["name"] == name for s in client.stacks())


def _summary(client: Client, result: DeployResult) -> None:
    try:
        instances = client.instances(stack=result.stack)
    except NotFoundError:
        instances = []
    print_result(result, instances)


@click.command()
@click.argument("stack", required=False)
@click.pass_context
def down(ctx: click.Context, stack: str | None) -> None:
    """Stop every instance of STACK (default: the only one), dependents first."""
    with Context.of(ctx).client() as client:
        try:
            name = pick_stack(client, stack)
        except NoStack:
            click.echo("nothing to stop: no stack is deployed")
            return
        client.down(name)
    click.echo(f"stack {name} is down")


@click.command()
@click.option("--listen", "--tcp", "tcp", metavar="HOST:PORT", default=None,
              help="also listen on TCP, with TLS and authentication (loopback addresses "
                   "only; needs `shipyard tls init` first)")
@click.option("--store", metavar="URL", default=None,
              help="the state store (default: $SHIPYARD_STORE, else home/state.db); "
                   "etcd://host:2379,... lets several servers share it")
@click.option("--ha/--no-ha", "ha", default=None,
              help="campaign for leadership on the etcd store: one server acts, the others "
                   "stand by and forward writes (default: on with an etcd store)")
@click.option("--lease-ttl", metavar="SECONDS", type=click.IntRange(1, 60), default=5,
              show_default=True, help="the leader's lease: a standby takes over within it "
                                      "when the leader dies")
@click.pass_context
def server(ctx: click.Context, tcp: str | None, store: str | None, ha: bool | None,
           lease_ttl: int) -> None:
    """Run the control plane: the engine and its API on the unix socket in the home."""
    from shipyard.api.server import Listeners, describe_tcp, parse_tcp, run_server, tls_for_tcp
    from shipyard.security.config import SecurityConfig

    config = Context.of(ctx).config
    if store:
        config.store = store
    if ha and not config.store_url.startswith("etcd://"):
        raise click.UsageError("--ha needs an etcd store (--store etcd://host:2379,...)")
    security = SecurityConfig.load(config.home)  # a bad security.yaml is bad usage
    if tcp:
        parse_tcp(tcp)  # a bad address is bad usage, refused before anything starts
        tls_for_tcp(security)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ours = logging.getLogger("shipyard")  # the full log, not the CLI's warning lines
    ours.handlers.clear()
    ours.propagate = True
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def ready(listeners: Listeners) -> None:
        click.echo(f"shipyard server {__version__} (pid {os.getpid()}) listening on "
                   f"{listeners.socket_path}", err=True)
        line = describe_tcp(listeners)
        if line:
            click.echo(line, err=True)

    asyncio.run(run_server(config, tcp=tcp, on_ready=ready, ha=ha, lease_ttl=lease_ttl))
    click.echo("shipyard server stopped", err=True)
