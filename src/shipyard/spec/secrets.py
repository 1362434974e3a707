"""Secrets and the identity a service runs as, in the stack file.

```yaml
secrets:                                  # top level: name → where its value comes from
  db_password: {env: DB_PASSWORD}         # a variable of the control plane's environment
  tls_key: {file: ./certs/tls.key}        # a file, relative to the stack file's folder
  api_token: {stored: api_token}          # Shipyard's own store: `shipyard secret set`
services:
  api:
    user: nobody                          # name, uid, name:group or uid:gid (root only)
    secrets:
      - {name: db_password, env: DB_PASSWORD}          # delivered as a variable
      - {name: tls_key, file: /run/secrets/tls_key}    # delivered as a file (0600)
```

The stack model only ever holds these references: a value is read by the control plane
when an instance starts (`shipyard.security.secret_values`), held as a `SecretStr`, and
never written into the stack as stored, nor into events, logs or answers.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, model_validator

from shipyard.spec.base import NAME_RE, Model

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# name, uid, name:group, uid:gid (a name as useradd accepts it)
_USER_RE = re.compile(r"^(\d+|[A-Za-z_][A-Za-z0-9_.-]*\$?)(:(\d+|[A-Za-z_][A-Za-z0-9_.-]*))?$")
RUN_SECRETS = "/run/secrets"  # where a shorthand `- NAME` puts the file (as compose does)


def secret_env_name(name: str) -> str:
    """`tls-key` → `TLS_KEY`."""
    return name.upper().replace("-", "_")


def _check_env_name(value: str, what: str) -> str:
    if not ENV_NAME_RE.match(value):
        raise ValueError(f"{what} {value!r} is not a valid variable name "
                         "(letters, digits and _, not starting with a digit)")
    return value


class SecretSource(Model):
    """Where a secret's value comes from: exactly one of `env`, `file`, `stored`."""

    env: str | None = None  # a variable of the control plane's environment
    file: str | None = None  # a file, relative to the stack file's folder
    stored: str | None = None  # a name in Shipyard's encrypted store (`shipyard secret set`)

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretSource:
        given = [k for k in ("env", "file", "stored") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a secret comes from exactly one of env, file, stored"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.env is not None:
            _check_env_name(self.env, "env")
        if self.file is not None and not self.file.strip():
            raise ValueError("file must name a file")
        if self.stored is not None and not NAME_RE.match(self.stored):
            raise ValueError(f"stored secret name {self.stored!r} must be lowercase letters, "
                             "digits, - or _")
        return self

    @property
    def kind(self) -> str:
        return "env" if self.env is not None else "file" if self.file is not None else "stored"

    def describe(self) -> str:
        """The reference, never the value: `env DB_PASSWORD`, `file ./x`, `stored db`."""
        return f"{self.kind} {getattr(self, self.kind)}"


class SecretUse(Model):
    """How a service receives one secret: as the variable `env`, or as a file.

    A file is written with mode 0600 under the instance's own directory in
    $SHIPYARD_HOME (`run/<stack>/<instance>/secrets/<file name>`), and its path is given
    to the process in `path_env` (default `<NAME>_FILE`). `file` is the path a container
    would see it at; for a process, only its last component (the file name) counts.
    `- NAME` alone is short for `{name: NAME, file: /run/secrets/NAME}`.
    """

    name: str
    env: str | None = None
    file: str | None = None
    path_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value, "file": posixpath.join(RUN_SECRETS, value)}
        return value

    @model_validator(mode="after")
    def _one_way(self) -> SecretUse:
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret is given to a service as exactly one of env (a "
                             "variable) or file (a path)")
        if self.env is not None:
            _check_env_name(self.env, "env")
            if self.path_env is not None:
                raise ValueError("path_env goes with file, not env")
        if self.file is not None:
            name = posixpath.basename(self.file.rstrip("/")) if self.file.strip() else ""
            if not name or name in (".", ".."):
                raise ValueError(f"file {self.file!r} must end with a file name")
            if ".." in self.file.split("/"):
                raise ValueError(f"file {self.file!r} must not contain '..'")
        if self.path_env is not None:
            _check_env_name(self.path_env, "path_env")
        return self

    @property
    def file_name(self) -> str:
        assert self.file is not None
        return posixpath.basename(self.file.rstrip("/"))

    @property
    def path_variable(self) -> str:
        """The variable that carries a file secret's path."""
        return self.path_env or f"{secret_env_name(self.name)}_FILE"

    @property
    def variable(self) -> str:
        """The variable this use sets: the value itself (`env`) or the file's path."""
        return self.env if self.env is not None else self.path_variable


def _user(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _USER_RE.match(value.strip()):
        raise ValueError(f"user must be a name, a uid, name:group or uid:gid, got {value!r}")
    return value.strip()


# `user: nobody`, `user: 65534`, `user: "1000:1000"`
User = Annotated[str, BeforeValidator(_user)]
