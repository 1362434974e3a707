"""Commands about the stack file itself: validate, plan, schema; and version."""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path

import click

from shipyard import __version__
from shipyard.cli.context import Context, load_stack_file
from shipyard.cli.render import print_plan
from shipyard.engine.results import PlanReport
from shipyard.spec.models import Stack

FILE_OPTION = click.option("-f", "--file", "file", metavar="FILE", default=None,
                           help="the stack file (default: ./shipyard.yaml)")
OUTPUT_OPTION = click.option("-o", "--output", type=click.Choice(["table", "json"]),
                             default="table", show_default=True, help="output format")


@click.command()
@FILE_OPTION
@click.pass_context
def validate(ctx: click.Context, file: str | None) -> None:
    """Check the stack file only: fields, units, dependencies. Nothing is started."""
    from shipyard.plan.graph import DependencyGraph

    stack = load_stack_file(file)
    graph = DependencyGraph.from_stack(stack)  # PlanError: a cycle, an unknown dependency
    phases = graph.phases()
    click.echo(f"{stack.source or file or 'shipyard.yaml'}: stack {stack.name} is valid "
               f"({len(stack.services)} services in {len(phases)} phases)")


@click.command()
def schema() -> None:
    """Print the JSON Schema of the stack file (for editors and CI)."""
    from shipyard.spec.schema import stack_json_schema

    click.echo(json.dumps(stack_json_schema(), indent=2))


@click.command()
@FILE_OPTION
@OUTPUT_OPTION
@click.pass_context
def plan(ctx: click.Context, file: str | None, output: str) -> None:
    """Show what `up` would do: the deploy phases and what changed since the last apply."""
    home = Context.of(ctx)
    stack = load_stack_file(file)
    if home.server_answers():
        with home.client() as client:
            report = client.plan(stack)
    else:
        report = asyncio.run(plan_offline(home.config.home, stack))
    if output == "json":
        click.echo(json.dumps(asdict(report), indent=2))
    else:
        print_plan(report)


async def plan_offline(home: Path, stack: Stack) -> PlanReport:
    """Plan against the recorded state when no server runs: the engine's checks on the
    store file of `home` (or on an empty one, when nothing was ever applied)."""
    from shipyard.engine.engine import Engine, EngineConfig

    # Only the engine's checks run here: the runtime's notes (cgroups) are not news.
    logging.getLogger("shipyard.runtime").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="shipyard-plan-") as scratch:
        db = home / "state.db"
        config = EngineConfig(home=home if db.exists() else Path(scratch))
        engine = Engine(config)
        await engine.store.open()
        try:
            return await engine.plan(stack)
        finally:
            await engine.store.close()


@click.command()
def version() -> None:
    """Print Shipyard's version."""
    click.echo(f"shipyard {__version__} (python {platform.python_version()})")
