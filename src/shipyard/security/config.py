"""security.yaml: custom roles, who may use the unix socket, TLS files and limits.

Everything is optional; with no file at all the socket's owner is admin, nobody else may
connect, and TCP uses the files `shipyard tls init` writes under `$SHIPYARD_HOME/tls/`.

```yaml
roles:
  deployer:
    description: deploys the web stacks
    rules:
      - {resources: [stacks, services], verbs: [read, plan, deploy], stacks: ["web-*"]}
unix:
  group: shipyard          # socket mode 0660, group shipyard (else 0600, owner only)
  users: {alice: operator, "1002": viewer}
  default_role: null       # role of other members of the group (none: refused)
tls:
  cert: tls/server.crt     # relative to $SHIPYARD_HOME
  key: tls/server.key
  client_ca: tls/ca.crt    # client certificates from this CA are accepted (mutual TLS)
  require_client_cert: false
limits:
  max_body: 4MiB
  auth_failures_per_minute: 10
  token_cache: 60s
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shipyard.security.errors import SecurityConfigError
from shipyard.security.roles import Role, RoleBook, Rule
from shipyard.spec.units import parse_duration, parse_size

CONFIG_FILE = "security.yaml"
TLS_DIR = "tls"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuleModel(_Strict):
    resources: list[str]
    verbs: list[str]
    stacks: list[str] | None = None


class RoleModel(_Strict):
    description: str = ""
    rules: list[RuleModel] = Field(min_length=1)


class UnixModel(_Strict):
    group: str | None = None
    users: dict[str, str] = Field(default_factory=dict)  # user name or uid -> role
    default_role: str | None = None


class TlsModel(_Strict):
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None
    require_client_cert: bool = False


class LimitsModel(_Strict):
    max_body: int = 4 * 2**20
    auth_failures_per_minute: int = Field(default=10, ge=1)
    token_cache: float = 60.0

    @field_validator("max_body", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("token_cache", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class SecurityFile(_Strict):
    roles: dict[str, RoleModel] = Field(default_factory=dict)
    unix: UnixModel = Field(default_factory=UnixModel)
    tls: TlsModel = Field(default_factory=TlsModel)
    limits: LimitsModel = Field(default_factory=LimitsModel)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None
    require_client_cert: bool


@dataclass
class SecurityConfig:
    """security.yaml, checked and resolved against the home."""

    home: Path
    roles: RoleBook
    unix: UnixModel
    limits: LimitsModel
    tls_model: TlsModel

    @classmethod
    def load(cls, home: Path) -> SecurityConfig:
        path = Path(home) / CONFIG_FILE
        data: Any = {}
        if path.exists():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                where = getattr(exc, "problem_mark", None)
                line = f" (line {where.line + 1})" if where is not None else ""
                reason = str(getattr(exc, "problem", None) or exc).splitlines()[0]
                raise SecurityConfigError(f"cannot read {path}{line}: {reason}") from None
        return cls.from_data(Path(home), data, source=str(path))

    @classmethod
    def from_data(cls, home: Path, data: Any, source: str = CONFIG_FILE) -> SecurityConfig:
        try:
            parsed = SecurityFile.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top)"
            raise SecurityConfigError(f"{source}: {where}: {err['msg']}") from None
        custom = {
            name: Role(name, tuple(Rule.of(r.resources, r.verbs, r.stacks,
                                           where=f"{source}: roles.{name}.rules[{i}]")
                                   for i, r in enumerate(model.rules)), model.description)
            for name, model in parsed.roles.items()
        }
        book = RoleBook.from_config(custom)
        for who, role in [*parsed.unix.users.items(), ("default_role", parsed.unix.default_role)]:
            if role is not None and book.get(role) is None:
                raise SecurityConfigError(f"{source}: unix.{who}: no role named {role}",
                                          hint=f"known: {', '.join(sorted(book.roles))}")
        return cls(Path(home), book, parsed.unix, parsed.limits, parsed.tls)

    def _path(self, value: str | None, default: str) -> Path:
        path = Path(value or default).expanduser()
        return path if path.is_absolute() else self.home / path

    @property
    def tls_dir(self) -> Path:
        return self.home / TLS_DIR

    def tls_files(self) -> TlsFiles | None:
        """The server's certificate and key (and the CA of client certificates), if they
        exist; None if TLS is not set up."""
        cert = self._path(self.tls_model.cert, f"{TLS_DIR}/server.crt")
        key = self._path(self.tls_model.key, f"{TLS_DIR}/server.key")
        if self.tls_model.cert or self.tls_model.key:
            for path in (cert, key):
                if not path.is_file():
                    raise SecurityConfigError(f"security.yaml: tls: no file {path}")
        elif not (cert.is_file() and key.is_file()):
            return None
        ca = self._path(self.tls_model.client_ca, f"{TLS_DIR}/ca.crt")
        if self.tls_model.client_ca and not ca.is_file():
            raise SecurityConfigError(f"security.yaml: tls.client_ca: no file {ca}")
        if self.tls_model.require_client_cert and not ca.is_file():
            raise SecurityConfigError("security.yaml: tls.require_client_cert needs a "
                                      "client_ca")
        return TlsFiles(cert, key, ca if ca.is_file() else None,
                        self.tls_model.require_client_cert)
