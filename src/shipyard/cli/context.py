"""What every command needs: the home, a client of its server (the unix socket in the
home, or `--url` with TLS and credentials), the stack file, and which stack a command is
about."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from shipyard.engine.config import EngineConfig, default_home
from shipyard.errors import InputError, ShipyardError

if TYPE_CHECKING:
    from shipyard.api.client import Client
    from shipyard.spec.models import Stack

DEFAULT_FILE = "shipyard.yaml"
SERVER_START_TIMEOUT = 10.0


class NoStack(ShipyardError):
    """A command needs a deployed stack and there is none."""


@dataclass
class Context:
    home: Path
    url: str | None = None  # https://HOST:PORT of a TCP listener; None: the unix socket
    token: str | None = None
    ca: Path | None = None
    insecure: bool = False
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def of(cls, ctx: click.Context) -> Context:
        obj = ctx.find_object(Context)
        if obj is None:  # a command invoked on its own, without the group
            obj = Context.from_env(default_home())
        return obj

    @classmethod
    def from_env(cls, home: Path) -> Context:
        """The connection settings of the environment (SHIPYARD_URL, SHIPYARD_TOKEN,
        SHIPYARD_CA, SHIPYARD_CERT, SHIPYARD_KEY)."""
        env = os.environ

        def path(name: str) -> Path | None:
            return Path(env[name]).expanduser() if env.get(name) else None

        return cls(home, url=env.get("SHIPYARD_URL") or None,
                   token=env.get("SHIPYARD_TOKEN") or None, ca=path("SHIPYARD_CA"),
                   cert=path("SHIPYARD_CERT"), key=path("SHIPYARD_KEY"))

    @property
    def remote(self) -> bool:
        return self.url is not None

    @property
    def config(self) -> EngineConfig:
        return EngineConfig(home=self.home)

    @property
    def socket_path(self) -> Path:
        return self.config.socket_path

    @property
    def server_log(self) -> Path:
        return self.config.home / "server.log"

    def client(self) -> Client:
        from shipyard.api.client import Client

        if self.url is not None:
            return Client(base_url=self.url, token=self.token, ca=self.ca,
                          insecure=self.insecure, cert=self.cert, key=self.key)
        # On the unix socket the kernel says who we are: no token is sent (a SHIPYARD_TOKEN
        # meant for a remote server must not change what local commands do).
        return Client(self.socket_path)

    def server_answers(self) -> bool:
        with self.client() as client:
            return client.is_running()

    def ensure_server(self) -> None:
        """Start a detached control plane unless one answers already; wait until it does."""
        if self.server_answers():
            return
        if self.url is not None:
            from shipyard.api.client import ServerNotRunning

            raise ServerNotRunning(self.url)  # a remote server is not ours to start
        home = self.config.home
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [sys.executable, "-m", "shipyard.cli.main", "--home", str(home), "server"]
        fd = os.open(self.server_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd,
                                    stderr=subprocess.STDOUT, cwd=home,
                                    start_new_session=True, close_fds=True)
        finally:
            os.close(fd)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.server_answers():
                return
            if proc.poll() is not None and not self.server_answers():
                break  # it exited: no need to wait for the timeout
            time.sleep(0.05)
        else:
            proc.terminate()
        self._show_server_log()
        raise ShipyardError("the Shipyard server did not start",
                            hint=f"see {self.server_log}")

    def _show_server_log(self, lines: int = 20) -> None:
        try:
            text = self.server_log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return
        for line in text:
            click.echo(f"  {line}", err=True)


def load_stack_file(path: str | None) -> Stack:
    """Parse and validate a stack file (SpecError lists every issue with file:line)."""
    from shipyard.spec.loader import load_stack

    file = Path(path or DEFAULT_FILE)
    if not file.exists():
        hint = "pass one with -f FILE" if path is None else None
        raise InputError(f"no stack file at {file}", hint=hint)
    if file.is_dir():
        raise InputError(f"{file} is a directory, not a stack file")
    return load_stack(file)


def pick_stack(client: Client, given: str | None) -> str:
    """The stack a command is about: the one given, else the only one deployed."""
    if given:
        return given
    names = sorted(s["name"] for s in client.stacks())
    if len(names) == 1:
        return names[0]
    if not names:
        raise NoStack("no stack is deployed", hint="deploy one with `shipyard up`")
    raise InputError(f"several stacks are deployed: {', '.join(names)}",
                     hint="choose one with --stack NAME")


def is_tty() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
