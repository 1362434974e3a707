"""Checks that keep a stack file inside its lane: paths stay within the stack's folder
(unless the file says `allow_outside_paths: true`), secrets are declared before they are
used, and a secret's variable is never expanded into a command line (where `ps` shows it).

Each check returns `(document path, message)` pairs, so the loader reports them with
their line like any other problem; the API runs `outside_paths` again on a stack it is
sent, since a client need not have used the loader.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path as FsPath
from typing import Any

from pydantic import ValidationError

from shipyard.spec.base import NAME_RE
from shipyard.spec.issues import did_you_mean
from shipyard.spec.secrets import SecretUse
from shipyard.spec.yamldoc import Path

Found = tuple[Path, str]
ALLOW_FIELD = "allow_outside_paths"
_INJECTED = ("PORT", "SHIPYARD_STACK", "SHIPYARD_SERVICE", "SHIPYARD_INSTANCE")
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def inside(base: str | os.PathLike[str], path: str) -> bool:
    """Whether `path` (relative to `base`, `~` expanded) lies within `base` once symbolic
    links and `..` are resolved."""
    root = os.path.realpath(base)
    target = os.path.realpath(os.path.join(root, os.path.expanduser(path)))
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def outside_message(what: str, path: str, base: str | os.PathLike[str]) -> str:
    return (f"{what} {path} is outside the stack's folder {os.path.realpath(base)}; set "
            f"`{ALLOW_FIELD}: true` at the top of the stack file to allow it")


def truthy(value: Any) -> bool:
    """`allow_outside_paths` as pydantic's bool will read it."""
    if isinstance(value, str):
        return value.strip().lower() in {"1", "on", "t", "true", "y", "yes"}
    return value is True or (type(value) is int and value == 1)


def outside_paths(stack: Any, *, env_files: bool = True) -> list[Found]:
    """Every workdir, env file, bind-mount source, build context and secret file of
    `stack` (a validated Stack) that lies outside its folder; none when it allows them.
    `env_files=False`: the loader checked those already, before reading them."""
    if getattr(stack, ALLOW_FIELD, False):
        return []
    base = stack.base_dir
    found: list[Found] = []
    for name, service in stack.services.items():
        where: Path = ("services", name)
        if service.workdir is not None and not inside(base, service.workdir):
            found.append(((*where, "workdir"),
                          outside_message("workdir", service.workdir, base)))
        for i, entry in enumerate(service.env_file if env_files else []):
            if not inside(base, entry):
                found.append(((*where, "env_file", i), outside_message("env file", entry, base)))
        for i, mount in enumerate(service.volumes):
            if mount.type == "bind" and mount.source and not inside(base, mount.source):
                found.append(((*where, "volumes", i),
                              outside_message("volume source", mount.source, base)))
        build = service.build
        if build is not None:
            if not inside(base, build.context):
                found.append(((*where, "build", "context"),
                              outside_message("build context", build.context, base)))
            if build.dockerfile and not inside(os.path.join(base, build.context),
                                               build.dockerfile):
                found.append(((*where, "build", "dockerfile"),
                              outside_message("dockerfile", build.dockerfile, base)))
    for secret, source in getattr(stack, "secrets", {}).items():
        if source.file is not None and not inside(base, source.file):
            found.append((("secrets", secret, "file"),
                          outside_message("secret file", source.file, base)))
    return found


def secret_checks(secrets: Mapping[str, Any], services: Mapping[str, Any],
                  raw_services: Mapping[str, Any], written: Mapping[str, Any]) -> list[Found]:
    """Names of secrets, their uses by services, and clashes with the services' own
    variables. `secrets`: the top-level mapping as written (only its names count here);
    `services`: the services that validated; `raw_services`: the services as read (each
    use is located by its own index there), `written`: before interpolation."""
    found: list[Found] = [(("secrets", name), f"secret name {name!r} must be lowercase "
                           "letters, digits, - or _ (at most 63)")
                          for name in secrets if not NAME_RE.match(str(name))]
    declared = [str(n) for n in secrets]
    for name, service in services.items():
        uses = _uses(raw_services.get(name))
        variables: dict[str, int] = {}
        files: dict[str, int] = {}
        for i, use in uses:
            where: Path = ("services", name, "secrets", i)
            if use.name not in secrets:
                hint = did_you_mean(use.name, declared)
                found.append(((*where, "name"), f"'{use.name}' is not a secret of this stack "
                              "(declare it under the top-level secrets:)" + hint))
            variable = use.variable
            if variable in variables:
                found.append((where, f"variable {variable} is already set by secret "
                              f"#{variables[variable]} of this service"))
            variables.setdefault(variable, i)
            if variable in service.env or variable in _INJECTED or variable.startswith(
                    ("PORT_", "SHIPYARD_")):
                found.append((where, f"variable {variable} is also set by the service's env "
                              "or by Shipyard; give the secret another name"))
            if use.file is not None:
                if use.file_name in files:
                    found.append(((*where, "file"), f"file name {use.file_name} is already "
                                  f"used by secret #{files[use.file_name]} of this service"))
                files.setdefault(use.file_name, i)
        found += _expanded_secrets(name, {u.variable for _, u in uses if u.env is not None},
                                   written.get(name))
    return found


def _uses(raw: Any) -> list[tuple[int, SecretUse]]:
    """The valid uses of a service's `secrets:` with their index in the document (the
    invalid ones are reported by the model)."""
    items = raw.get("secrets") if isinstance(raw, dict) else None
    found = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        try:
            found.append((i, SecretUse.model_validate(item)))
        except ValidationError:
            continue
    return found


def _expanded_secrets(service: str, names: set[str], raw: Any) -> list[Found]:
    """`${DB_PASSWORD}` in a command, env value or probe, where DB_PASSWORD is a secret's
    variable: refused, since the value would land in an argv (`ps` shows it to everyone)
    or in another variable."""
    if not names or not isinstance(raw, dict):
        return []
    found: list[Found] = []
    for path, text in _strings(raw, ("services", service)):
        if path[2:3] not in (("command",), ("env",), ("health",)):
            continue
        for ref in _REFERENCE.findall(text):
            if ref in names:
                found.append((path, f"${{{ref}}} is a secret: it reaches the instance as its "
                              f"own variable {ref} only, never expanded into a command or "
                              "another variable (a command line is visible in ps)"))
    return found


def _strings(value: Any, path: Path) -> Iterator[tuple[Path, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*path, i))


def env_file_outside(base: FsPath, entry: str, allow: bool) -> str | None:
    """The message refusing env file `entry` before it is read, or None."""
    if allow or inside(base, entry):
        return None
    return outside_message("env file", entry, base)
