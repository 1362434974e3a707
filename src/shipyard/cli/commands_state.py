"""`shipyard state check | backup FILE | restore FILE`: care of the state database.

These work on the file itself (home/state.db), not through the server: check and backup
are safe while a server runs; restore refuses to run while one does.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from shipyard.cli.commands_spec import OUTPUT_OPTION
from shipyard.cli.context import Context
from shipyard.errors import InputError
from shipyard.state import maintenance as m


def state_path(ctx: click.Context) -> Path:
    """The SQLite file of this home's store."""
    from shipyard.state.factory import open_store
    from shipyard.state.sqlite import SQLiteStore

    store = open_store(Context.of(ctx).config.store_url)
    if not isinstance(store, SQLiteStore):
        raise InputError("state commands only work on a SQLite store")
    return store.path


@click.group()
def state() -> None:
    """Check, back up and restore the state database ($SHIPYARD_HOME/state.db)."""


@state.command()
@OUTPUT_OPTION
@click.pass_context
def check(ctx: click.Context, output: str) -> None:
    """Check the state database, read-only.

    SQLite's integrity and foreign-key checks, the schema version, the record counts and
    Shipyard's invariants. Exit 0 if healthy, 1 if not (each problem on its own line),
    2 if there is no state database."""
    report = m.check_store(state_path(ctx))
    if output == "json":
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        verdict = "healthy" if report.ok else (
            f"{len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}")
        click.echo(f"state {report.path}: {verdict}")
        details = [m.human_size(report.size)]
        if report.schema_version is not None:
            details.insert(0, f"schema version {report.schema_version}")
        click.echo(f"  {', '.join(details)}")
        if report.counts:
            click.echo(f"  {m.describe_counts(report.counts)} "
                       f"(last event seq {report.last_event_seq})")
        for problem in report.problems:
            click.echo(f"problem: {problem}")
    ctx.exit(0 if report.ok else 1)


@state.command()
@click.argument("file", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--force", is_flag=True, help="overwrite FILE if it exists")
@click.pass_context
def backup(ctx: click.Context, file: Path, force: bool) -> None:
    """Copy the state database to FILE, online.

    Consistent even while a server is writing; verified before it is renamed into place;
    readable by its owner only. An existing FILE is kept unless --force."""
    report = m.backup_store(state_path(ctx), file, force=force)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"backed up {report.source} to {report.path} "
               f"({m.human_size(report.size)}, {report.seconds:.2f}s)")
    click.echo(f"  schema version {report.schema_version}: "
               f"{m.describe_counts(report.counts)}")


@state.command()
@click.argument("file", type=click.Path(dir_okay=True, path_type=Path))
@click.pass_context
def restore(ctx: click.Context, file: Path) -> None:
    """Replace the state database with the backup FILE.

    The server must be stopped. FILE is checked before anything changes; the current
    database is kept beside it as state.db.before-restore-<timestamp>."""
    home = Context.of(ctx)
    report = m.restore_store(file, state_path(ctx), socket_path=home.socket_path)
    click.echo(f"restored {report.path} from {report.source}")
    click.echo(f"  schema version {report.schema_version}: "
               f"{m.describe_counts(report.counts)}")
    if report.kept is not None:
        click.echo(f"  the previous state is kept as {report.kept}")
