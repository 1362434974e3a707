"""Load a stack file: YAML → interpolation → env files → model → cross-field checks.

Every problem found along the way is collected with its file, line and field path, and
reported at once as one `SpecError`; nothing past the loader sees an invalid stack.
"""

from __future__ import annotations

import copy
import os
import re
from collections import ChainMap
from collections.abc import Callable, Mapping
from pathlib import Path as FsPath
from typing import Any

from dotenv import dotenv_values
from pydantic import ValidationError

from shipyard.errors import Issue, SpecError
from shipyard.spec.checks import cross_check
from shipyard.spec.compose import import_document, looks_like_compose
from shipyard.spec.hardening import (
    ALLOW_FIELD,
    env_file_outside,
    outside_paths,
    secret_checks,
    truthy,
)
from shipyard.spec.interpolate import InterpolationError, resolve_now, variables_in
from shipyard.spec.issues import data_path, did_you_mean, field_names, show, translate
from shipyard.spec.models import Service, Stack
from shipyard.spec.yamldoc import Document, Path, read_yaml

INSTANCE_VARIABLES = ("SHIPYARD_SERVICE", "SHIPYARD_INSTANCE", "SHIPYARD_STACK")
_LOADER_FIELDS = ("source", "base_dir")  # set by the loader, never by the file


def load_stack(path: str | FsPath, *, environ: Mapping[str, str] | None = None) -> Stack:
    """Read, interpolate and validate the stack file at `path`; raise SpecError if invalid."""
    file = FsPath(path).expanduser().absolute()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError([Issue("", f"cannot read the stack file: {reason}", str(file))]) from None
    return _load(text, str(file), file.parent, environ, source=str(file))


def parse_stack(
    text: str,
    *,
    file: str = "<stack>",
    base_dir: str | FsPath = ".",
    environ: Mapping[str, str] | None = None,
) -> Stack:
    """Like `load_stack` for text already in hand; `base_dir` plays the file's folder."""
    return _load(text, file, FsPath(base_dir).expanduser().absolute(), environ, source=None)


def default_name(folder: str | FsPath) -> str:
    """A valid stack name from a folder name: `My App` → `my-app`."""
    name = re.sub(r"[^a-z0-9_-]", "-", FsPath(folder).name.lower())
    name = name.strip("-_")[:63].strip("-_")
    return name or "stack"


def env_name(name: str) -> str:
    """`user-db` → `USER_DB`: a name as it appears in a variable."""
    return name.upper().replace("-", "_")


class _Collector:
    """The issues of one load, plus the paths whose value is already known to be bad."""

    def __init__(self, doc: Document, file: str) -> None:
        self.doc = doc
        self.file = file
        self.issues: list[Issue] = []
        self.bad_paths: set[str] = set()

    def add(self, path: Path, message: str, line: int | None = None, *, bad: bool = True) -> None:
        """Record an issue; `bad` marks the value at `path` as unusable, so the model's
        complaints about it (a restatement) are dropped."""
        dotted = ".".join(str(p) for p in path)
        self.issues.append(Issue(dotted, message, self.file, line or self.doc.line(path)))
        if path and bad:
            self.bad_paths.add(dotted)

    def covered(self, issue: Issue) -> bool:
        """True when `issue` restates a problem already reported at or above its path."""
        return any(issue.path == p or issue.path.startswith(p + ".") for p in self.bad_paths)


def _load(
    text: str,
    file: str,
    base: FsPath,
    environ: Mapping[str, str] | None,
    source: str | None,
) -> Stack:
    doc = read_yaml(text)
    out = _Collector(doc, file)
    for path, message, line in doc.problems:
        out.add(path, message, line, bad=not message.startswith("duplicate key"))
    data = doc.data
    if isinstance(data, dict) and looks_like_compose(data, file):
        env = os.environ if environ is None else environ
        profiles = [p.strip() for p in env.get("COMPOSE_PROFILES", "").split(",") if p.strip()]
        data = import_document(doc, default_name(base), profiles)
    if not isinstance(data, dict):
        if not doc.problems:
            got = (
                "an empty file"
                if data is None
                else "a list"
                if isinstance(data, list)
                else (f"a single value ({show(data, doc.raw_scalars.get(()))})")
            )
            out.add((), f"expected a mapping at the top level (name:, services:, ...), got {got}")
        raise SpecError(out.issues)

    env = os.environ if environ is None else environ
    variables = ChainMap(dict(env), _dotenv(base / ".env", env))
    before = data  # as written: `${SECRET}` references are checked there
    data, file_envs = _interpolate(data, variables, base, out)
    for key in _LOADER_FIELDS:
        if key in data:
            out.add((key,), f"unknown field '{key}'" + did_you_mean(key, field_names(())))
            del data[key]
    data.setdefault("name", default_name(base))
    doc.data = {**data, "source": source, "base_dir": str(base)}

    stack: Stack | None = None
    try:
        stack = Stack.model_validate(doc.data)
    except ValidationError as exc:
        found = translate(exc.errors(include_url=False), doc, file)
        out.issues += [issue for issue in found if not out.covered(issue)]
    raw_services = data.get("services")
    if isinstance(raw_services, dict):
        services = stack.services if stack else _valid_services(raw_services)
        for path, message in cross_check(services, raw_services):
            out.add(path, message, bad=False)
        raw_before = before.get("services")
        secrets = data.get("secrets") if isinstance(data.get("secrets"), dict) else {}
        for path, message in secret_checks(
                secrets, services, raw_services, raw_before if isinstance(raw_before, dict)
                else {}):
            out.add(path, message, bad=False)
    if stack is not None:
        for path, message in outside_paths(stack, env_files=False):
            dotted = ".".join(str(p) for p in path)
            if not out.covered(Issue(dotted, message)):  # e.g. a failed ${...} in it
                out.add(path, message, bad=False)
    if stack is not None:
        stack = _env_in_order(_with_env_files(stack, file_envs), out)
    if out.issues or stack is None:
        raise SpecError(_ordered(out.issues) or [Issue("", "invalid stack", file)])
    return stack


def _ordered(issues: list[Issue]) -> list[Issue]:
    seen: set[tuple[str, str, int | None]] = set()
    unique = []
    for issue in issues:
        key = (issue.path, issue.message, issue.line)
        if key not in seen:
            seen.add(key)
            unique.append(issue)
    return sorted(unique, key=lambda i: i.line or 0)


def _valid_services(raw_services: dict[str, Any]) -> dict[str, Service]:
    """Each service that validates once its invalid values are dropped: enough to run the
    cross-field checks on a file that also has other errors."""
    services = {}
    for name, raw in raw_services.items():
        if not isinstance(raw, dict):
            continue
        data = copy.deepcopy(raw)
        for _ in range(5):
            try:
                services[name] = Service.model_validate(data)
                break
            except ValidationError as exc:
                # resolve every location first: a drop must not shift the next one
                paths = {
                    data_path(tuple(e["loc"]), data, keep_last=False)[0]
                    for e in exc.errors(include_url=False)
                }
                for path in sorted(paths, key=_deepest_last_index_first, reverse=True):
                    _drop(data, path)
    return services


def _deepest_last_index_first(path: Path) -> tuple[int, int]:
    return len(path), path[-1] if path and isinstance(path[-1], int) else -1


def _drop(data: dict[str, Any], path: Path) -> None:
    """Remove the value at `path`; at the top, the error is about the service as a whole:
    give it a placeholder command."""
    if not path:
        data["command"] = ["true"]
        return
    parent: Any = data
    for part in path[:-1]:
        parent = parent[part]
    if isinstance(parent, dict):
        parent.pop(path[-1], None)
    elif isinstance(parent, list):
        del parent[path[-1]]


def _with_env_files(stack: Stack, file_envs: dict[str, dict[str, str]]) -> Stack:
    """Merge env file values under each service's env (explicit `env` wins)."""
    if not file_envs:
        return stack
    services = dict(stack.services)
    for name, values in file_envs.items():
        service = services[name]
        services[name] = service.model_copy(update={"env": {**values, **service.env}})
    return stack.model_copy(update={"services": services})


def _env_in_order(stack: Stack, out: _Collector) -> Stack:
    """Each service's env with every value after the variables of the same env it refers to:
    the engine expands them one by one, in order, per instance (`MSG: "level ${LEVEL}"`
    above `LEVEL: debug` must still see `debug`). Variables that refer to each other in a
    cycle are an error, reported here rather than when an instance starts."""
    services = dict(stack.services)
    for name, service in stack.services.items():
        env = service.env
        refs = {
            key: [v for v in dict.fromkeys(variables_in(value)) if v in env and v != key]
            for key, value in env.items()
        }
        if not any(refs.values()):
            continue
        order, cycle = _dependencies_first(list(env), refs)
        if cycle:
            out.add(("services", name, "env", cycle[0]),
                    "variables of env refer to each other in a cycle: " + " → ".join(cycle),
                    bad=False)
        elif order != list(env):
            services[name] = service.model_copy(update={"env": {k: env[k] for k in order}})
    return stack.model_copy(update={"services": services})


def _dependencies_first(
    keys: list[str], refs: dict[str, list[str]]
) -> tuple[list[str], list[str] | None]:
    """`keys` reordered so that each comes after the keys it refers to, moving as little as
    possible (an order that already works is kept); or the first cycle found, as a path
    that ends where it starts."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: placed
    for root in keys:
        if root in state:
            continue
        path = [root]
        todo = [iter(refs[root])]
        state[root] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                done = path.pop()
                todo.pop()
                state[done] = 2
                order.append(done)
            elif state.get(nxt) == 1:
                return order, [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(refs[nxt]))
    return order, None


def _dotenv(path: FsPath, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of the `.env` beside the stack file; `${VAR}` in it expand leniently
    (unset → empty), as in compose."""
    if not path.is_file():
        return {}
    try:
        raw = dotenv_values(path, interpolate=False, encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    values: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            continue
        lookup = ChainMap(dict(environ), values)
        try:
            values[key] = resolve_now(value, lambda name, lk=lookup: lk.get(name, ""))
        except InterpolationError:
            values[key] = value
    return values


# --- interpolation over the document ------------------------------------------------------


class _ServiceScope:
    """What `${...}` may stay unresolved inside one service, and how to explain the rest."""

    def __init__(self, name: str, raw: dict[str, Any], all_services: list[str]) -> None:
        ports = raw.get("ports")
        self.port_names = [str(p) for p in ports] if isinstance(ports, dict) else []
        deps = raw.get("depends_on")
        dep_names = (
            [str(d) for d in deps]
            if isinstance(deps, dict)
            else [d for d in deps if isinstance(d, str)]
            if isinstance(deps, list)
            else []
        )
        env = raw.get("env")
        own = (
            [str(k) for k in env]
            if isinstance(env, dict)
            else [e.split("=", 1)[0] for e in env if isinstance(e, str)]
            if isinstance(env, list)
            else []
        )
        self.instance: set[str] = set(INSTANCE_VARIABLES)
        if self.port_names:
            self.instance.add("PORT")
            self.instance.update(f"PORT_{env_name(p)}" for p in self.port_names)
        for dep in dep_names:
            self.instance.update(f"{env_name(dep)}_{s}" for s in ("HOST", "PORT", "URL"))
        self.keep: set[str] = self.instance | set(own)
        uses = raw.get("secrets")  # their variables: refused in ${...} by hardening.py
        self.secret_env: set[str] = set()
        if isinstance(uses, list):
            self.secret_env.update(u["env"] for u in uses
                                   if isinstance(u, dict) and isinstance(u.get("env"), str))
        self.keep |= self.secret_env
        self.all_services = [s for s in all_services if s != name]  # not its own name

    def keeper(self, own_key: str | None) -> Callable[[str], bool]:
        """Which names stay `${...}` in the value of env `own_key` (None: not an env value).

        A variable's own name is not kept: `LEVEL: ${LEVEL}` (or `PATH: /x:${PATH}`) takes
        the value the environment or `.env` has now, as in compose, not whatever the control
        plane's environment holds when the instance starts (nor an error there)."""
        if own_key is None or own_key in self.instance or own_key in self.secret_env:
            return self.keep.__contains__
        return lambda name: name != own_key and name in self.keep

    def hint(self, name: str, deferred: bool) -> str | None:
        if name in self.instance and not deferred:
            return (
                f"${{{name}}} is set per instance, so it can only be used in "
                "command, env, env_file and health exec"
            )
        if name == "PORT" and not self.port_names:
            return (
                "undefined variable PORT: the service declares no ports (e.g. ports: {http: auto})"
            )
        if name.startswith("PORT_") and name not in self.instance:
            ports = ", ".join(self.port_names) or "none"
            return f"undefined variable {name}: the service has no such port (its ports: {ports})"
        for service in self.all_services:
            for suffix in ("_HOST", "_PORT", "_URL"):
                if name == env_name(service) + suffix:
                    return f"undefined variable {name}: add {service} to depends_on to get it"
        return None


def _env_key(rel: Path, text: str) -> str | None:
    """The variable that `text` at `rel` (relative to the service) is the value of, if it
    is an entry of `env`: `env.KEY`, or `env.N` holding `KEY=value`."""
    if len(rel) != 2 or rel[0] != "env":
        return None
    if isinstance(rel[1], int):
        return text.split("=", 1)[0] if "=" in text else None
    return str(rel[1])


def _deferred(rel: Path) -> bool:
    """Fields the engine expands again per instance (relative to the service)."""
    if rel[:1] in (("command",), ("env",)) and len(rel) <= 2:
        return True
    return len(rel) in (3, 4) and rel[0] == "health" and rel[2] == "exec"


def _interpolate(
    data: dict[str, Any], variables: Mapping[str, str], base: FsPath, out: _Collector
) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """The document with `${...}` resolved, and each service's env-file values."""

    def walk(value: Any, path: Path, scope: _ServiceScope | None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*path, k), scope) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, i), scope) for i, v in enumerate(value)]
        if isinstance(value, str):
            return resolve(value, path, path, scope)
        return value

    def resolve(
        text: str, path: Path, where: Path, scope: _ServiceScope | None, prefix: str = ""
    ) -> str:
        deferred = scope is not None and _deferred(path[2:])
        try:
            return resolve_now(
                text,
                variables.get,
                keep=(scope.keeper(_env_key(path[2:], text)) if scope else lambda name: False),
                deferred=deferred,
                hint=(lambda name: scope.hint(name, deferred)) if scope else lambda name: None,
            )
        except InterpolationError as exc:
            out.add(where, prefix + str(exc))
            return text

    result: dict[str, Any] = {}
    file_envs: dict[str, dict[str, str]] = {}
    for key, value in data.items():
        if key != "services" or not isinstance(value, dict):
            result[key] = walk(value, (key,), None)
            continue
        services: dict[str, Any] = {}
        for name, raw in value.items():
            path: Path = ("services", name)
            if not isinstance(raw, dict):
                services[name] = walk(raw, path, None)
                continue
            scope = _ServiceScope(name, raw, [str(n) for n in value])
            new = {k: walk(v, (*path, k), None) for k, v in raw.items() if k == "env_file"}
            files = _read_env_files(new.get("env_file"), base, path, out,
                                    truthy(data.get(ALLOW_FIELD)))
            scope.keep.update(k for values in files.values() for k in values)
            new.update({k: walk(v, (*path, k), scope) for k, v in raw.items() if k != "env_file"})
            merged: dict[str, str] = {}
            for where, values in files.items():
                for env_key, env_value in values.items():
                    env_path = (*path, "env", env_key)
                    merged[env_key] = resolve(env_value, env_path, where, scope, f"{env_key}: ")
            if merged:
                file_envs[name] = merged
            services[name] = new
        result[key] = services
    return result, file_envs


def _read_env_files(
    entries: Any, base: FsPath, path: Path, out: _Collector, allow_outside: bool = False
) -> dict[Path, dict[str, str]]:
    """Each readable env file's values, keyed by where it is named in the document; a
    file outside the stack's folder is refused before it is read, unless allowed."""
    if isinstance(entries, str):
        named: list[tuple[Path, str]] = [((*path, "env_file"), entries)]
    elif isinstance(entries, list):
        named = [((*path, "env_file", i), e) for i, e in enumerate(entries) if isinstance(e, str)]
    else:
        return {}
    files: dict[Path, dict[str, str]] = {}
    for where, entry in named:
        refused = env_file_outside(base, entry, allow_outside)
        if refused:
            out.add(where, refused)
            continue
        target = base / FsPath(entry).expanduser()
        if not target.is_file():
            out.add(where, f"env file {entry} not found (looked for {target})")
            continue
        try:
            raw = dotenv_values(target, interpolate=False, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            out.add(where, f"cannot read env file {entry}: {exc}")
            continue
        files[where] = {k: "" if v is None else v for k, v in raw.items()}
    return files
