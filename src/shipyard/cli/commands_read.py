"""Read commands, all answered by the running server: ps, logs, events."""

from __future__ import annotations

import json

import click

from shipyard.cli.commands_spec import OUTPUT_OPTION
from shipyard.cli.context import Context, pick_stack
from shipyard.cli.render import instance_json, print_events, print_ps

STACK_OPTION = click.option("--stack", "stack", metavar="NAME", default=None,
                            help="the stack (default: the only one deployed)")


@click.command()
@OUTPUT_OPTION
@STACK_OPTION
@click.pass_context
def ps(ctx: click.Context, output: str, stack: str | None) -> None:
    """Services and instances: state, readiness, pid, ports, restarts, uptime, revision."""
    with Context.of(ctx).client() as client:
        instances = client.instances(stack=stack)
    if output == "json":
        click.echo(json.dumps([instance_json(i) for i in instances], indent=2))
    else:
        print_ps(instances)


@click.command()
@click.argument("service", required=False)
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
@click.option("--tail", "tail", metavar="N", type=click.IntRange(min=0), default=None,
              help="only the last N lines of each instance (default: all)")
@STACK_OPTION
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True,
              help="lines prefixed with the instance, or one JSON object per line "
                   "(stack, service, instance, line)")
@click.pass_context
def logs(ctx: click.Context, service: str | None, follow: bool, tail: int | None,
         stack: str | None, output: str) -> None:
    """Instance logs of SERVICE (default: every service), merged and prefixed."""
    with Context.of(ctx).client() as client:
        name = pick_stack(client, stack)
        services: dict[str, str] = {}
        if output == "json":
            services = {i["instance"]: i["service"] for i in client.instances(stack=name)}

        def show(line: str) -> None:
            click.echo(line if output == "text" else log_json(line, name, services))

        if follow:
            try:
                for line in client.follow_logs(name, service, tail):
                    show(line)
            except KeyboardInterrupt:
                return
        else:
            for line in client.logs(name, service, tail):
                show(line)


def log_json(line: str, stack: str, services: dict[str, str]) -> str:
    """A log line as the server sends it ("instance | text", the name padded) as JSON."""
    prefix, sep, text = line.partition(" | ")
    instance = prefix.rstrip() if sep else None
    return json.dumps({"stack": stack, "service": services.get(instance or ""),
                       "instance": instance, "line": text if sep else line})


@click.command()
@click.option("-f", "--follow", is_flag=True, help="keep printing new events")
@STACK_OPTION
@click.option("--service", metavar="NAME", default=None, help="only this service's events")
@click.option("--after", metavar="SEQ", type=click.IntRange(min=0), default=0,
              help="only events after this sequence number")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="text lines, or one JSON object per line")
@click.pass_context
def events(ctx: click.Context, follow: bool, stack: str | None, service: str | None,
           after: int, output: str) -> None:
    """The audit trail: every recorded event, oldest first."""
    with Context.of(ctx).client() as client:
        if follow:
            try:
                print_events(client.follow_events(after=after, stack=stack, service=service),
                             output)
            except KeyboardInterrupt:
                return
        else:
            print_events(client.all_events(after=after, stack=stack, service=service),
                         output)
