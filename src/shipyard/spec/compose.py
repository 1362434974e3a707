"""Import a docker compose file: a pure translation into the stack-file model.

`convert_compose(data)` takes a compose document (plain data, as YAML reads it) and returns
the equivalent `shipyard.yaml` data plus a note for every compose key that could not be
carried over (and every translation that changed meaning). What maps where:

- `name` → `name` (lowercased into a valid stack name)
- `image`, `command`, `entrypoint`, `pull_policy`, `pids_limit`, `build` → the same names
- `environment` (a list or a mapping; `- KEY` alone passes the host's value) → `env`;
  `env_file` → `env_file`
- `ports` `[IP:][HOST:]CONTAINER[/PROTO]` and `expose` → `ports: {pCONTAINER: CONTAINER}`;
  a different HOST port becomes `expose: HOST` (the router's stable address)
- `depends_on` (a list: started; `service_started` / `service_healthy` /
  `service_completed_successfully`; `restart: true`) → `depends_on` started / healthy /
  completed, `on_lost: restart`
- `healthcheck` (`CMD`, `CMD-SHELL`, a string; interval, timeout, retries, start_period) →
  a `health.readiness` exec probe (retries → failure_threshold, start_period →
  initial_delay); shell syntax runs as `[sh, -c, ...]`, with a note
- `restart` (no, always, unless-stopped, on-failure[:N]), `deploy.restart_policy` → `restart`
- `deploy.replicas`, `scale` → `replicas`
- `deploy.resources.limits` (cpus, memory, pids), `cpus`, `mem_limit` → `resources.cpu`,
  `resources.memory`, `pids_limit`; GPU `reservations.devices` → `resources.gpu`
- `stop_signal`, `stop_grace_period` → `stop.signal`, `stop.timeout`
- `volumes` (short and long syntax: bind, volume, tmpfs) → `volumes`
- `profiles`: services of an inactive profile are left out
- `${VAR-default}`, `${VAR:?error}`, `$VAR` → `${VAR:-default}`, `${VAR}`, `${VAR}`

Everything else (networks, labels, container_name, user, logging, secrets, ...) is listed
as dropped. Services share the host's network, so a service reaches another at
127.0.0.1 and its port, or through `<DEP>_HOST` / `<DEP>_PORT` / `<DEP>_URL`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import PurePath
from typing import Any

from shipyard.spec.compose_keys import (
    COMPOSE_FILE_RE,
    COMPOSE_ONLY_TOP,
    DROP_REASONS,
    SERVICE_KEYS,
    STACK_SECRET_SOURCES,
    TOP_KEYS,
)
from shipyard.spec.compose_service import ComposeNote, Conversion, ServiceConverter, service_name
from shipyard.spec.yamldoc import Document, Path

__all__ = [
    "ComposeNote", "Conversion", "convert", "convert_compose", "import_document",
    "looks_like_compose",
]

log = logging.getLogger(__name__)

CONTAINER_FIELDS = ("build", "entrypoint", "volumes", "pull_policy", "pids_limit")


def convert_compose(
    compose: Mapping[str, Any],
    *,
    profiles: Iterable[str] = (),
    project: str | None = None,
    service_fields: Collection[str] | None = None,
) -> tuple[dict[str, Any], list[ComposeNote]]:
    """The stack-file data for a compose document, and the notes on what did not carry over.

    `profiles`: the active compose profiles. `project`: the name images built without an
    `image:` are tagged with (`localhost/PROJECT-SERVICE`; default: the compose `name`).
    `service_fields`: the fields the Service model has (default: the current model's);
    container fields it lacks are reported as dropped."""
    result = convert(compose, profiles=profiles, project=project, service_fields=service_fields)
    return result.data, result.notes


def looks_like_compose(data: Any, filename: str | None = None) -> bool:
    """True for a compose file: by its name (docker-compose.yml, compose.yaml, and their
    `.override` / `.prod` variants), or by its content: only compose keys, and at least
    one that a stack file never has (a top-level `networks`, a service's `healthcheck`,
    `build`, a list of `ports`...)."""
    if filename and COMPOSE_FILE_RE.fullmatch(PurePath(filename).name):
        return True
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        return False
    top = [k for k in data if not str(k).startswith("x-")]
    if any(k not in TOP_KEYS for k in top):
        return False
    evidence = any(k in COMPOSE_ONLY_TOP or str(k).startswith("x-") for k in data)
    secrets = data.get("secrets")
    if isinstance(secrets, dict):  # compose: {file:}, {environment:}, {external:}...
        evidence = evidence or any(not isinstance(v, dict) or set(v) - STACK_SECRET_SOURCES
                                   for v in secrets.values())
    for service in data["services"].values():
        if not isinstance(service, dict):
            return False
        keys = [k for k in service if not str(k).startswith("x-")]
        if any(k not in SERVICE_KEYS for k in keys):
            return False
        evidence = evidence or _compose_evidence(service)
    return evidence


def _compose_evidence(service: dict[str, Any]) -> bool:
    health = service.get("healthcheck")
    deps = service.get("depends_on")
    return (
        isinstance(service.get("ports"), list)
        or isinstance(service.get("expose"), list)
        or (isinstance(health, dict) and ("test" in health or "disable" in health))
        or isinstance(service.get("build"), str | dict)
        or isinstance(service.get("deploy"), dict)
        or isinstance(service.get("environment"), dict | list)
        or isinstance(service.get("container_name"), str)
        or isinstance(service.get("networks"), list | dict)
        or (isinstance(deps, dict) and any(
            isinstance(d, dict) and str(d.get("condition", "")).startswith("service_")
            for d in deps.values()))
    )


def convert(
    compose: Mapping[str, Any],
    *,
    profiles: Iterable[str] = (),
    project: str | None = None,
    service_fields: Collection[str] | None = None,
) -> Conversion:
    """Like `convert_compose`, with the origin of every renamed path."""
    if service_fields is None:
        from shipyard.spec.models import Service

        service_fields = set(Service.model_fields)
    compose = _translate_vars(dict(compose))
    out = Conversion({})
    active = set(profiles)
    for key, value in compose.items():
        key = str(key)
        if key == "name" and isinstance(value, str):
            name = stack_name(value)
            out.data["name"] = name
            if name != value:
                out.notes.append(ComposeNote(None, "name", f"{value!r} became {name!r}", False))
        elif key in ("services",) or key.startswith("x-"):
            continue
        elif key == "version":
            out.notes.append(ComposeNote(None, key, "obsolete in compose; ignored"))
        elif key == "volumes" and isinstance(value, dict):
            for vol, spec in value.items():
                if spec:  # a bare declaration needs nothing: volumes live in the home
                    out.notes.append(ComposeNote(None, f"volumes.{vol}", DROP_REASONS["volume"]))
        else:
            out.notes.append(ComposeNote(None, key, DROP_REASONS.get(key, "not supported")))
    services = compose.get("services")
    if not isinstance(services, dict):
        out.data["services"] = services
        return out
    project = project or out.data.get("name") or "compose"
    names = {str(n): service_name(str(n)) for n in services}
    kept: dict[str, Any] = {}
    for raw_name, raw in services.items():
        name = names[str(raw_name)]
        wanted = raw.get("profiles") if isinstance(raw, dict) else None
        if isinstance(wanted, list) and wanted and not active.intersection(map(str, wanted)):
            out.notes.append(ComposeNote(
                name, "profiles",
                f"service left out: its profiles ({', '.join(map(str, wanted))}) are not "
                "active (activate one with --profile)"))
            continue
        if name != raw_name:
            out.notes.append(ComposeNote(name, "name", f"service {raw_name!r} became {name!r}",
                                         False))
        kept[str(raw_name)] = raw
    converted: dict[str, Any] = {}
    for raw_name, raw in kept.items():
        name = names[raw_name]
        where: Path = ("services", raw_name)
        out.origins[("services", name)] = where
        if not isinstance(raw, dict):
            converted[name] = raw  # the model says what is wrong with it
            continue
        service = ServiceConverter(name, where, out, service_fields, project, names,
                           {names[k] for k in kept})
        converted[name] = service.convert(raw)
    out.data["services"] = converted
    return out


def stack_name(text: str) -> str:
    """A valid stack name for a compose one: lowercase; `.` and others → `-`."""
    return service_name(text)


# --- interpolation: compose's forms into ours --------------------------------------------

_VAR_RE = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}"
    r"|\$([A-Za-z_][A-Za-z0-9_]*)"
)


def _translate_text(text: str) -> str:
    def sub(match: re.Match[str]) -> str:
        whole, name, op, rest, bare = match.group(0), *match.groups()
        if whole == "$$":
            return whole
        if bare:
            return "${" + bare + "}"
        if op is None or op in ("?", ":?"):
            return "${" + name + "}"  # required: ours fail on an unset variable anyway
        if op in ("-", ":-"):
            return "${" + name + ":-" + _translate_text(rest or "") + "}"
        return whole  # ${VAR:+alt}: no equivalent; the loader reports it, located

    return _VAR_RE.sub(sub, text)


def _translate_vars(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _translate_vars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_translate_vars(v) for v in value]
    if isinstance(value, str):
        return _translate_text(value)
    return value


# --- the loader's hook ---------------------------------------------------------------------


def import_document(doc: Document, project: str, profiles: Iterable[str] = ()) -> dict[str, Any]:
    """Convert the compose data of `doc` in place (for `shipyard up -f docker-compose.yml`):
    the converted paths keep the lines of what they came from, and every note is logged as
    a warning. Returns the new data."""
    result = convert(doc.data, project=project, profiles=profiles)
    for note in result.notes:
        log.warning("%s", note.render())
    lines = {path: doc.line(origin) for path, origin in result.origins.items()}
    doc.key_lines.update({p: n for p, n in lines.items() if n is not None})
    doc.data = result.data
    return result.data
