"""`shipyard import`: write a shipyard.yaml from a docker compose file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import yaml

from shipyard.errors import InputError, SpecError
from shipyard.spec.compose import ComposeNote, convert_compose
from shipyard.spec.yamldoc import read_yaml

# The order fields are written in: the order of the stack-file documentation.
_SERVICE_ORDER = ["image", "build", "pull_policy", "entrypoint", "command", "shell", "env",
                  "env_file", "replicas", "depends_on", "ports", "expose", "volumes",
                  "resources", "pids_limit", "health", "restart", "stop"]


@click.command("import")
@click.argument("compose_file", metavar="COMPOSE_FILE",
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("shipyard.yaml"), show_default=True,
              help="where to write the stack file ('-' for stdout)")
@click.option("--profile", "profiles", metavar="NAME", multiple=True,
              help="a compose profile to activate (repeatable; default: $COMPOSE_PROFILES)")
@click.option("--force", is_flag=True, help="overwrite FILE if it exists")
def import_(compose_file: Path, output: Path, profiles: tuple[str, ...], force: bool) -> None:
    """Convert a docker compose file into a stack file; list what could not be carried over.

    `shipyard up -f docker-compose.yml` converts on the fly; `import` writes the result so
    it can be edited."""
    try:
        text = compose_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {compose_file}: {getattr(exc, 'strerror', None) or exc}"
                         ) from None
    doc = read_yaml(text)
    if doc.problems:
        from shipyard.errors import Issue

        raise SpecError([Issue(".".join(map(str, path)), message, str(compose_file), line)
                         for path, message, line in doc.problems])
    if not isinstance(doc.data, dict) or not isinstance(doc.data.get("services"), dict):
        raise InputError(f"{compose_file} is not a compose file (no services: mapping)")
    active = list(profiles) or [
        p.strip() for p in os.environ.get("COMPOSE_PROFILES", "").split(",") if p.strip()]
    data, notes = convert_compose(doc.data, profiles=active)
    rendered = render_stack(data, compose_file.name, notes)
    if str(output) == "-":
        click.echo(rendered, nl=False)
    else:
        if output.exists() and not force:
            raise InputError(f"{output} exists", hint="pass --force to overwrite it")
        output.write_text(rendered, encoding="utf-8")
    for note in notes:
        click.echo(note.render(), err=True)
    if str(output) != "-":
        services = len(data.get("services") or {})
        dropped = sum(note.dropped for note in notes)
        click.echo(f"wrote {output}: {services} services, {dropped} compose keys not carried "
                   "over", err=True)
        _check(output)


def _check(output: Path) -> None:
    """Say what the written file still needs (an unset variable, a missing env file)."""
    from shipyard.spec.loader import load_stack

    try:
        load_stack(output)
    except SpecError as exc:
        for issue in exc.issues:
            click.echo(f"warning: {issue.render()}", err=True)


def render_stack(data: dict[str, Any], source: str, notes: list[ComposeNote]) -> str:
    """The stack data as YAML in the documentation's order, the notes as a header comment."""
    lines = [f"# Converted from {source} by `shipyard import`."]
    dropped = [note for note in notes if note.dropped]
    if dropped:
        lines.append("# Not carried over:")
        lines += [f"#   {note.render()}" for note in dropped]
    ordered: dict[str, Any] = {k: data[k] for k in ("name",) if k in data}
    ordered["services"] = {
        name: _ordered_service(svc) if isinstance(svc, dict) else svc
        for name, svc in (data.get("services") or {}).items()
    }
    body = yaml.dump(ordered, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(lines) + "\n" + body


def _ordered_service(service: dict[str, Any]) -> dict[str, Any]:
    rank = {key: i for i, key in enumerate(_SERVICE_ORDER)}
    return dict(sorted(service.items(), key=lambda kv: rank.get(kv[0], len(rank))))


class _Dumper(yaml.SafeDumper):
    """Short lists of plain values in flow style ([python, -m, app]); the rest in blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # lists indented under their key


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flat = all(isinstance(v, str | int | float | bool) for v in value)
    short = sum(len(str(v)) + 2 for v in value) < 70
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat and short)


_Dumper.add_representer(list, _represent_list)
