"""`shipyard`: the command line, a client of the control plane's API.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or invalid input. Every error
is rendered here, once, as `error: ...` lines on stderr; never as a traceback (set
SHIPYARD_DEBUG=1 to see one).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from shipyard import __version__
from shipyard.cli.commands_agent import agent, nodes, place
from shipyard.cli.commands_import import import_
from shipyard.cli.commands_k8s import k8s
from shipyard.cli.commands_ops import history, ops, recover, restart, rollback
from shipyard.cli.commands_read import events, logs, ps
from shipyard.cli.commands_scale import abort, autoscale, promote, scale, top
from shipyard.cli.commands_secrets import secret
from shipyard.cli.commands_security import audit, tls, token, whoami
from shipyard.cli.commands_spec import plan, schema, validate, version
from shipyard.cli.commands_state import state
from shipyard.cli.commands_up import down, server, up
from shipyard.cli.context import Context
from shipyard.engine.config import default_home
from shipyard.errors import ShipyardError, SpecError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              default=None,
              help="where Shipyard keeps state, logs and its socket "
                   "(default: $SHIPYARD_HOME, else ~/.shipyard)")
@click.option("--url", metavar="URL", envvar="SHIPYARD_URL", default=None,
              help="the control plane's TCP listener, https://HOST:PORT (env SHIPYARD_URL; "
                   "default: the unix socket in the home)")
@click.option("--token", metavar="TOKEN", envvar="SHIPYARD_TOKEN", default=None,
              help="a bearer token from `shipyard token create` (env SHIPYARD_TOKEN)")
@click.option("--ca", metavar="FILE", envvar="SHIPYARD_CA", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="the CA that signed the server's certificate, e.g. HOME/tls/ca.crt "
                   "(env SHIPYARD_CA; default: the system's CAs)")
@click.option("--insecure", is_flag=True, default=False,
              help="do not verify the server's TLS certificate (testing only)")
@click.option("--cert", metavar="FILE", envvar="SHIPYARD_CERT", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="a client certificate from `shipyard tls client` (env SHIPYARD_CERT)")
@click.option("--key", metavar="FILE", envvar="SHIPYARD_KEY", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="the client certificate's key, unless it is in the --cert file (env "
                   "SHIPYARD_KEY)")
@click.version_option(__version__, "--version", prog_name="shipyard")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, url: str | None, token: str | None,
        ca: Path | None, insecure: bool, cert: Path | None, key: Path | None) -> None:
    """Shipyard: one stack file, ordered and health-gated deploys, supervised instances."""
    given = [name for name in ("ca", "insecure", "cert")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if given and not url:
        raise click.UsageError(f"--{given[0]} needs --url (the unix socket has no TLS)")
    ctx.obj = Context(home=home.expanduser().resolve() if home else default_home(),
                      url=url.rstrip("/") if url else None, token=token or None, ca=ca,
                      insecure=insecure, cert=cert, key=key)


for command in (up, down, ps, logs, events, plan, validate, schema, server, version, restart,
                recover, ops, history, rollback, import_):
    cli.add_command(command)
cli.add_command(state)
for command in (scale, autoscale, top, promote, abort):
    cli.add_command(command)
for command in (token, tls, audit, whoami, secret):
    cli.add_command(command)
cli.add_command(k8s)
for command in (agent, nodes, place):  # nodes (issue 10, docs/nodes.md)
    cli.add_command(command)


def error_lines(exc: ShipyardError) -> list[str]:
    """An error as `error: ` lines: one per issue for a bad stack file, else one."""
    if isinstance(exc, SpecError) and exc.issues:
        return [f"error: {issue.render()}" for issue in exc.issues]
    lines = [line for line in exc.message.splitlines() if line.strip()] or [exc.message]
    if exc.hint:
        lines[-1] += f" ({exc.hint})"
    return [f"error: {line}" for line in lines]


def _log_warnings() -> None:
    """Library warnings (e.g. limits not enforced) as `warning: ` lines on stderr; the
    server command sets up its own, fuller log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    handler.setLevel(logging.WARNING)
    root = logging.getLogger("shipyard")
    root.addHandler(handler)
    root.propagate = False


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code instead of exiting."""
    debug = bool(os.environ.get("SHIPYARD_DEBUG"))
    _log_warnings()
    try:
        code = cli.main(args=argv, prog_name="shipyard", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except ShipyardError as exc:
        for line in error_lines(exc):
            click.echo(line, err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`shipyard events | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        if debug:
            raise
        click.echo(f"error: unexpected {type(exc).__name__}: {exc} "
                   "(set SHIPYARD_DEBUG=1 for the traceback)", err=True)
        return 1
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
