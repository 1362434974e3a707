"""`shipyard token`, `shipyard tls`, `shipyard audit` and `shipyard whoami`: who may use
the control plane, and what they did.

Tokens and the audit listing go through the server (so that they are checked and
audited); `tls` writes certificates into the home directly, and `audit verify` reads the
audit file itself (through the server with --url)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from shipyard.cli.commands_spec import OUTPUT_OPTION
from shipyard.cli.context import Context
from shipyard.errors import InputError, ShipyardError

FOLLOW_INTERVAL = 0.5


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                   .rstrip())


# -- whoami --------------------------------------------------------------------------------

@click.command()
@OUTPUT_OPTION
@click.pass_context
def whoami(ctx: click.Context, output: str) -> None:
    """Who the server takes you for, and your role."""
    with Context.of(ctx).client() as client:
        me = client.whoami()
    if output == "json":
        click.echo(json.dumps(me, indent=2))
        return
    scope = f", limited to stack {me['stack']}" if me.get("stack") else ""
    click.echo(f"{me['actor']} (role {me['role'] or 'none'}{scope})")


# -- tokens --------------------------------------------------------------------------------

@click.group()
def token() -> None:
    """Create, list and revoke the bearer tokens of the TCP listener."""


@token.command("create")
@click.option("--role", required=True, help="viewer, operator, admin or a custom role")
@click.option("--stack", default=None, help="limit the token to this stack")
@click.option("--ttl", default="30d", show_default=True,
              help="lifetime (e.g. 12h, 30d), or 'never'")
@click.option("--name", default="", help="a note: who or what the token is for")
@click.pass_context
def token_create(ctx: click.Context, role: str, stack: str | None, ttl: str,
                 name: str) -> None:
    """Create a token and print it, once: store it now, it cannot be shown again."""
    with Context.of(ctx).client() as client:
        made = client.create_token(role, stack=stack, ttl=ttl, name=name)
    click.echo(made["token"])
    scope = f", stack {made['stack']}" if made.get("stack") else ""
    click.echo(f"created token {made['id']} (role {made['role']}{scope}, expires "
               f"{_when(made.get('expires_at'))}); it is shown only this once", err=True)


@token.command("ls")
@OUTPUT_OPTION
@click.pass_context
def token_ls(ctx: click.Context, output: str) -> None:
    """Every token: id, role, stack, state, expiry (never the secret)."""
    with Context.of(ctx).client() as client:
        found = client.tokens()
    if output == "json":
        click.echo(json.dumps(found, indent=2))
        return
    _table([[t["id"], t["role"], t.get("stack") or "*", t["state"], _when(t.get("expires_at")),
             t.get("created_by") or "", t.get("name") or ""] for t in found],
           ["ID", "ROLE", "STACK", "STATE", "EXPIRES", "CREATED BY", "NAME"])


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str) -> None:
    """Revoke token ID: it is refused from the next request on."""
    with Context.of(ctx).client() as client:
        client.revoke_token(token_id)
    click.echo(f"token {token_id} revoked")


# -- TLS -----------------------------------------------------------------------------------

@click.group()
def tls() -> None:
    """The CA and certificates of the TCP listener (in HOME/tls)."""


@tls.command("init")
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="a name or address for the server certificate (repeatable; default: "
                   "127.0.0.1, ::1, localhost)")
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650),
              help="validity of the server certificate")
@click.option("--force", is_flag=True, help="replace an existing CA")
@click.pass_context
def tls_init(ctx: click.Context, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Create a CA and the server's certificate: the TCP listener's TLS, and the CA of
    client certificates (mutual TLS)."""
    from shipyard.security.config import SecurityConfig
    from shipyard.security.tls import DEFAULT_HOSTS, create_ca, issue_server

    home = Context.of(ctx).home
    directory = SecurityConfig.load(home).tls_dir
    ca = create_ca(directory, force=force)
    server = issue_server(directory, hosts or DEFAULT_HOSTS, days=days)
    click.echo(f"CA: {ca.cert} (key {ca.key})")
    click.echo(f"server certificate: {server.cert} (key {server.key}) for "
               f"{', '.join(hosts or DEFAULT_HOSTS)}")
    click.echo(f"next: shipyard server --listen 127.0.0.1:8600; clients pass --ca {ca.cert}")


@tls.command("client")
@click.argument("name")
@click.option("--role", required=True, help="the role the certificate carries")
@click.option("--out", "out_dir", default=".", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="where to write NAME.crt and NAME.key")
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650))
@click.pass_context
def tls_client(ctx: click.Context, name: str, role: str, out_dir: Path, days: int) -> None:
    """Sign a client certificate NAME (CN=NAME, OU=ROLE) with the home's CA."""
    from shipyard.security.config import SecurityConfig
    from shipyard.security.tls import issue_client

    config = SecurityConfig.load(Context.of(ctx).home)
    config.roles.require(role)
    issued = issue_client(config.tls_dir, name, role, out_dir, days=days)
    click.echo(f"client certificate: {issued.cert} (key {issued.key}), role {role}")
    click.echo(f"use: shipyard --url https://127.0.0.1:PORT --ca {config.tls_dir / 'ca.crt'} "
               f"--cert {issued.cert} --key {issued.key} ps")


# -- audit ---------------------------------------------------------------------------------

AUDIT_COLUMNS = ["SEQ", "TIME", "ACTOR", "SOURCE", "ACTION", "TARGET", "STATUS", "OUTCOME",
                 "REQUEST"]


def _audit_row(e: dict[str, Any]) -> list[str]:
    return [str(e["seq"]), _when(e["ts"]), e["actor"], e["source"], e["action"],
            e.get("target") or "-", str(e["status"]), e["outcome"], e["request_id"]]


@click.group(invoke_without_command=True)
@click.option("-f", "--follow", is_flag=True, help="then print new rows as they come")
@click.option("--after", default=0, type=click.IntRange(0), help="only rows after this seq")
@OUTPUT_OPTION
@click.pass_context
def audit(ctx: click.Context, follow: bool, after: int, output: str) -> None:
    """The audit trail: every mutating request and every refused one (JSON lines with
    -o json)."""
    if ctx.invoked_subcommand is not None:
        return
    with Context.of(ctx).client() as client:
        header = output != "json"
        while True:
            rows = client.audit(after=after, limit=1000)
            if output == "json":
                for row in rows:
                    click.echo(json.dumps(row))
            elif rows or header:
                table = [_audit_row(r) for r in rows]
                if header:
                    _table(table, AUDIT_COLUMNS)
                    header = False
                else:
                    for line in table:
                        click.echo("  ".join(line))
            if rows:
                after = rows[-1]["seq"]
            if len(rows) == 1000:
                continue
            if not follow:
                return
            time.sleep(FOLLOW_INTERVAL)


@audit.command("verify")
@OUTPUT_OPTION
@click.pass_context
def audit_verify(ctx: click.Context, output: str) -> None:
    """Recompute the hash chain: exit 0 if intact, 1 naming each altered or deleted row."""
    from shipyard.security.audit import verify_file
    from shipyard.security.guard import AUDIT_FILE

    context = Context.of(ctx)
    if context.remote:
        with context.client() as client:
            report = client.audit_verify()
    else:
        path = context.home / AUDIT_FILE
        if not path.is_file():
            raise InputError(f"no audit trail at {path}",
                             hint="the server writes it once it has served a request")
        report = verify_file(path).view()
    if output == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        verdict = "intact" if report["ok"] else "NOT intact"
        click.echo(f"audit trail {report['path']}: {report['rows']} rows, {verdict}")
        for problem in report["problems"]:
            click.echo(f"problem: {problem}")
    if not report["ok"]:
        raise ShipyardError(f"the audit trail is not intact from row "
                            f"{report['first_bad_seq']}: {report['problems'][0]}")
