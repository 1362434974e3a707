"""Reading secret values and handing them to an instance.

`resolve` reads one secret of a stack from its source (the control plane's environment,
a file within the stack's folder, or the encrypted store), as a `SecretStr`, and registers
the value for redaction. `InstanceSecrets` does it for one instance when it starts: the
variables its `env:` uses set, and its `file:` uses written with mode 0600 under
`$SHIPYARD_HOME/run/<stack>/<instance>/secrets/` (owned by the service's `user:` when it
has one), with each file's path in a variable. The files are removed when the instance
ends; they are written again, with current values, at each start.

Containers: the variables reach a container through the runtime's environment filter
(`container_spec.env_keys`); a file is the delivered file bind-mounted read-only at the
use's `file:` path (`bind_mounts()`, added by the instance's launch).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from shipyard.errors import RuntimeLaunchError, ShipyardError
from shipyard.runtime.users import RunAs, reachable, resolve_user
from shipyard.security import redact
from shipyard.security.secret_store import MAX_VALUE, SecretStore
from shipyard.spec.hardening import inside, outside_message


class SecretUnavailable(RuntimeLaunchError):
    """A secret's value cannot be read: the variable is unset, the file is missing, the
    stored secret does not exist. The message names the secret and its source only."""


def run_dir(home: Path, stack: str, instance: str) -> Path:
    """The instance's own directory in the home."""
    return Path(home) / "run" / stack / instance


def secrets_of(stack: Any) -> Mapping[str, Any]:
    return getattr(stack, "secrets", None) or {}


def uses_of(service: Any) -> list[Any]:
    return list(getattr(service, "secrets", None) or [])


def env_sources(stack: Any) -> set[str]:
    """The control-plane variables a stack's secrets come from: kept out of what its
    instances inherit from the control plane's environment."""
    return {s.env for s in secrets_of(stack).values() if s.env is not None}


def resolve(stack: Any, name: str, home: Path,
            environ: Mapping[str, str] | None = None) -> SecretStr:
    """The value of the stack's secret `name`; raises SecretUnavailable."""
    source = secrets_of(stack).get(name)
    where = f"stack {stack.name}: secret {name}"
    if source is None:
        raise SecretUnavailable(f"{where} is not declared under secrets:")
    env = os.environ if environ is None else environ
    value: SecretStr
    if source.env is not None:
        if source.env not in env or not env[source.env]:
            raise SecretUnavailable(f"{where}: the control plane's environment has no "
                                    f"variable {source.env}",
                                    hint="set it where `shipyard server` (or `up`) runs")
        value = SecretStr(env[source.env])
    elif source.file is not None:
        value = _read_file(stack, where, source.file)
    else:
        try:
            found = SecretStore(home).get(source.stored)
        except ShipyardError as exc:
            raise SecretUnavailable(f"{where}: {exc.message}", hint=exc.hint) from None
        if found is None:
            raise SecretUnavailable(f"{where}: no stored secret {source.stored}",
                                    hint=f"set it with `shipyard secret set {source.stored}`")
        value = found
    redact.register(name, value)
    return value


def _read_file(stack: Any, where: str, file: str) -> SecretStr:
    base = stack.base_dir
    if not getattr(stack, "allow_outside_paths", False) and not inside(base, file):
        raise SecretUnavailable(f"{where}: " + outside_message("file", file, base))
    path = Path(base) / Path(file).expanduser()
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_VALUE + 1)
    except OSError as exc:
        raise SecretUnavailable(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_VALUE:
        raise SecretUnavailable(f"{where}: {path} is over {MAX_VALUE} bytes")
    if not data:
        raise SecretUnavailable(f"{where}: {path} is empty")
    return SecretStr(data.decode("utf-8", "surrogateescape"))


class InstanceSecrets:
    """The secrets of one instance: resolved and delivered at each start, removed at its
    end. `variables` (after `deliver`) is what goes into the instance's environment."""

    def __init__(self, home: Path, stack: Any, service: str, instance: str) -> None:
        self.home = Path(home)
        self.stack = stack
        self.service = service
        self.instance = instance
        self.uses = uses_of(stack.services[service])
        self.variables: dict[str, str] = {}

    @property
    def directory(self) -> Path:
        return run_dir(self.home, self.stack.name, self.instance) / "secrets"

    def deliver(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Resolve every secret the service uses, write its files, and return the
        variables to add to its environment. Blocking (files, the store): run it in a
        thread. Raises SecretUnavailable / RuntimeLaunchError."""
        if not self.uses:
            self.variables = {}
            return {}
        service = self.stack.services[self.service]
        container = service.image is not None
        values = {u.name: resolve(self.stack, u.name, self.home, environ) for u in self.uses}
        user = getattr(service, "user", None)
        run_as = resolve_user(user, self.service) if user else None
        out: dict[str, str] = {}
        files = [u for u in self.uses if u.file is not None]
        if files:
            self.remove()
            directory = self._make_directory(run_as)
            for use in files:
                path = directory / use.file_name
                _write_private(path, values[use.name], run_as)
                # a container sees the file where the use says (a read-only bind mount)
                out[use.path_variable] = use.file if container else str(path)
        for use in self.uses:
            if use.env is not None:
                out[use.env] = values[use.name].get_secret_value()
        self.variables = out
        return out

    def bind_mounts(self) -> list[tuple[str, str]]:
        """(host file, path in the container) of each file use: what a container
        instance mounts read-only to see its file secrets."""
        return [(str(self.directory / u.file_name), u.file)
                for u in self.uses if u.file is not None]

    def recall(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The variables of an instance started by an earlier control plane (re-adopted):
        the values of its `env:` uses, and the paths of the files it was given (left in
        place). Blocking; raises SecretUnavailable."""
        out: dict[str, str] = {}
        for use in self.uses:
            if use.env is not None:
                value = resolve(self.stack, use.name, self.home, environ)
                out[use.env] = value.get_secret_value()
            else:
                out[use.path_variable] = str(self.directory / use.file_name)
        self.variables = out
        return out

    def _make_directory(self, run_as: RunAs | None) -> Path:
        """run/ and run/<stack>/ traversable (0711: no listing), the instance's own
        directory and its secrets/ 0700, owned by the user the instance runs as."""
        directory = self.directory
        for level in (self.home / "run", directory.parent.parent):
            level.mkdir(mode=0o711, exist_ok=True)
            os.chmod(level, 0o711)
        for level in (directory.parent, directory):
            level.mkdir(mode=0o700, exist_ok=True)
            os.chmod(level, 0o700)
            if run_as is not None and not run_as.is_self:
                os.chown(level, run_as.uid, run_as.gid)
        if run_as is not None and not run_as.is_self:
            blocked = reachable(str(directory), run_as)
            if blocked is not None:
                raise RuntimeLaunchError(
                    f"service {self.service}: {run_as.describe()} cannot reach its secret "
                    f"files: {blocked} is not searchable by that user",
                    hint=f"chmod o+x {blocked} (or a group), or deliver the secret by env")
        return directory

    def remove(self) -> None:
        """Delete the instance's secret files (nothing to do when there are none)."""
        directory = self.directory
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            directory.parent.rmdir()  # the instance's directory, when nothing else is there


def _write_private(path: Path, value: SecretStr, run_as: RunAs | None) -> None:
    """Write `value` to `path` with mode 0600 (never readable by others, not even for an
    instant), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, value.get_secret_value().encode("utf-8", "surrogateescape"))
        if run_as is not None and not run_as.is_self:
            os.fchown(fd, run_as.uid, run_as.gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)
