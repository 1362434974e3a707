"""What a service needs to run as a container, beyond `image`: how to build the image, when
to pull it, its entrypoint, its volumes and its pids limit.

These are the types of the `Service` fields below (added to `spec/models.py` by one line
each); compose's short forms are accepted as they are:

    build: Build | None = None                   # build: ./api  or  {context, dockerfile, args}
    pull_policy: PullPolicy = PullPolicy.MISSING  # always | missing | never | build
    entrypoint: Entrypoint = None                # replaces the image's ENTRYPOINT
    volumes: list[Mount] = Field(default_factory=list)  # ./data:/data:ro, cache:/var/cache
    pids_limit: int = Field(0, ge=0)             # 0: no limit

A `command` given with an `image` replaces the image's CMD (as `docker run IMAGE ARGS...`).
"""

from __future__ import annotations

import posixpath
import shlex
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from shipyard.spec.base import Model

__all__ = ["Build", "Entrypoint", "Mount", "PullPolicy", "parse_argv", "parse_mount"]


class PullPolicy(StrEnum):
    ALWAYS = "always"  # pull before every start
    MISSING = "missing"  # pull when the image is not present locally (the default)
    NEVER = "never"  # only a local image; a missing one fails the start
    BUILD = "build"  # build before every start (needs `build`)

    @classmethod
    def _missing_(cls, value: object) -> PullPolicy | None:
        # compose's spellings
        aliases = {"if_not_present": cls.MISSING, "if-not-present": cls.MISSING,
                   "ifnotpresent": cls.MISSING, "daily": cls.MISSING, "weekly": cls.MISSING}
        return aliases.get(str(value).lower()) if isinstance(value, str) else None


def _key_values(value: Any) -> Any:
    """compose's `[KEY=value, ...]` as a mapping; numbers and booleans as strings."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = dict(item.split("=", 1) if "=" in item else (item, "") for item in value)
    if isinstance(value, dict):
        return {
            k: ("true" if v is True else "false" if v is False else "" if v is None else
                str(v) if isinstance(v, int | float) else v)
            for k, v in value.items()
        }
    return value


class Build(Model):
    """How to build the service's image: `docker build -f DOCKERFILE CONTEXT`, tagged with
    the service's `image`. The context is relative to the stack file; without `dockerfile`
    the context's Containerfile is used, else its Dockerfile."""

    context: str = "."
    dockerfile: str | None = None
    args: Annotated[dict[str, str], BeforeValidator(_key_values)] = Field(default_factory=dict)
    target: str | None = None
    labels: Annotated[dict[str, str], BeforeValidator(_key_values)] = Field(
        default_factory=dict
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `build: ./api` is short for `build: {context: ./api}`
        return {"context": value} if isinstance(value, str) else value

    @field_validator("context")
    @classmethod
    def _local(cls, value: str) -> str:
        if "://" in value or value.startswith("git@"):
            raise ValueError(f"a build context must be a local folder, got {value!r}")
        if not value.strip():
            raise ValueError("a build context must not be empty")
        return value


def parse_mount(text: str) -> dict[str, Any]:
    """compose's short volume syntax: `TARGET`, `SOURCE:TARGET` or `SOURCE:TARGET:MODE`.

    A source starting with `.`, `/` or `~` is a host folder (bind mount); any other is a
    named volume; without a source the volume is anonymous. MODE: ro, rw (and SELinux's
    z / Z, accepted and ignored), comma-separated."""
    parts = text.split(":")
    if len(parts) == 1:
        return {"type": "volume", "source": None, "target": parts[0]}
    if len(parts) > 3:
        raise ValueError(f"expected SOURCE:TARGET[:MODE], got {text!r}")
    source, target = parts[0], parts[1]
    mode = parts[2].split(",") if len(parts) == 3 else []
    unknown = [m for m in mode if m not in ("ro", "rw", "z", "Z", "cached", "delegated",
                                             "consistent", "nocopy")]
    if unknown:
        raise ValueError(f"unknown volume mode {','.join(unknown)!r} in {text!r} (ro or rw)")
    kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    return {"type": kind, "source": source, "target": target, "read_only": "ro" in mode}


class Mount(Model):
    """One volume of a container. `bind`: a host folder (relative to the stack file);
    `volume`: a named volume kept under $SHIPYARD_HOME/volumes/<stack>/<name> (anonymous
    when `source` is not given: one per instance); `tmpfs`: memory-backed."""

    type: Literal["bind", "volume", "tmpfs"] = "volume"
    source: str | None = None
    target: str
    read_only: bool = False

    @model_validator(mode="before")
    @classmethod
    def _short(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_mount(value)
        if isinstance(value, dict) and "read_only" not in value and "readonly" in value:
            value = {k: v for k, v in value.items() if k != "readonly"} | {
                "read_only": value["readonly"]}
        return value

    @field_validator("target")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"a volume target must be an absolute path in the container, "
                             f"got {value!r}")
        return posixpath.normpath(value)

    @model_validator(mode="after")
    def _source(self) -> Mount:
        if self.type == "bind" and not self.source:
            raise ValueError("a bind mount needs a source folder")
        if self.type == "tmpfs" and self.source:
            raise ValueError("a tmpfs mount has no source")
        if self.type == "volume" and self.source and ("/" in self.source or self.source in
                                                      (".", "..")):
            raise ValueError(f"a volume name must not contain '/', got {self.source!r} "
                             "(a host folder starts with ./ or /)")
        return self


def parse_argv(value: Any) -> Any:
    """A command as a list; a string is split like a shell would (never run by one)."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split {value!r}: {exc}") from exc
    if isinstance(value, list):
        return [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                for v in value]
    return value


Entrypoint = Annotated[list[str] | None, BeforeValidator(parse_argv)]
