"""`shipyard secret set|ls|rm`: Shipyard's own secret store (values encrypted at rest in
$SHIPYARD_HOME; see docs/security.md).

A value is read from stdin, never from the command line (argv is visible to every user in
`ps`, and lands in shell histories); on a terminal it is asked for without echo. The
commands go through the server when one runs (checked against the role, audited), else
they use the home's store directly.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from typing import Any

import click

from shipyard.cli.commands_spec import OUTPUT_OPTION
from shipyard.cli.context import Context
from shipyard.errors import InputError, NotFoundError
from shipyard.security.secret_store import SecretStore, check_name, check_value


def _read_value(name: str) -> str:
    """The value from stdin: asked for without echo on a terminal, else all of stdin with
    one trailing newline removed (`echo "$X" | shipyard secret set x`)."""
    if sys.stdin is None:
        raise InputError("no stdin to read the value from")
    if sys.stdin.isatty():
        value = getpass.getpass(f"value of {name}: ")
    else:
        value = sys.stdin.read()
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
    return check_value(value)


def _server(context: Context) -> Any:
    """A client of the running server, or None when there is none (local use)."""
    client = context.client()
    if context.remote or client.is_running():
        return client
    client.close()
    return None


@click.group()
def secret() -> None:
    """Set, list and remove the secrets of Shipyard's own store (`{stored: NAME}`)."""


@secret.command("set")
@click.argument("name")
@click.pass_context
def secret_set(ctx: click.Context, name: str) -> None:
    """Store secret NAME; its value is read from stdin (never from the command line)."""
    check_name(name)
    value = _read_value(name)
    context = Context.of(ctx)
    client = _server(context)
    if client is None:
        created = SecretStore(context.home).set(name, value)
    else:
        with client:
            answer = client._json("PUT", f"/v1/secrets/{name}", json={"value": value})
        created = bool(answer.get("created"))
    click.echo(f"secret {name} {'stored' if created else 'replaced'}", err=True)


@secret.command("ls")
@OUTPUT_OPTION
@click.pass_context
def secret_ls(ctx: click.Context, output: str) -> None:
    """The stored secrets: names and times, never values."""
    context = Context.of(ctx)
    client = _server(context)
    if client is None:
        found = [s.view() for s in SecretStore(context.home).list()]
    else:
        with client:
            found = client._json("GET", "/v1/secrets")
    if output == "json":
        click.echo(json.dumps(found, indent=2))
        return
    width = max([len(item["name"]) for item in found] + [4])
    for item in found:
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item["updated_at"]))
        click.echo(f"{item['name'].ljust(width)}  {updated}")


@secret.command("rm")
@click.argument("name")
@click.pass_context
def secret_rm(ctx: click.Context, name: str) -> None:
    """Remove stored secret NAME (running instances keep the value they were given)."""
    check_name(name)
    context = Context.of(ctx)
    client = _server(context)
    if client is None:
        if not SecretStore(context.home).delete(name):
            raise NotFoundError(f"no stored secret {name}", hint="see `shipyard secret ls`")
    else:
        with client:
            client._json("DELETE", f"/v1/secrets/{name}")
    click.echo(f"secret {name} removed", err=True)
