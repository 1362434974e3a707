"""What a deploy would change: the desired stack compared with the specs last recorded.

Any difference in a service's spec is a new revision of it; the diff says which fields
differ so `shipyard plan` can show why a service will be replaced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from shipyard.spec.models import Service, Stack

__all__ = ["SCALE_FIELDS", "Action", "Change", "diff_service", "diff_stack", "spec_hash",
           "template_hash"]

# Fields whose change needs no new instance: the count, and how updates and autoscaling
# go. A change of only these scales in place (as a Kubernetes pod template hash ignores
# them); any other field makes new instances.
SCALE_FIELDS = ("replicas", "update", "autoscale")

Action = Literal["add", "change", "remove", "unchanged"]


@dataclass(frozen=True)
class Change:
    service: str
    action: Action
    fields: tuple[str, ...] = ()  # dotted paths that differ, e.g. "env.LOG_LEVEL"


def spec_hash(service: Service) -> str:
    """A stable fingerprint of a service's spec: sha256 of its canonical JSON."""
    return hashlib.sha256(_canonical(service.model_dump(mode="json")).encode()).hexdigest()


def template_hash(spec: Service | Mapping[str, Any]) -> str:
    """The fingerprint of what an instance runs: the spec without SCALE_FIELDS. `spec` is
    a Service or a recorded spec (`model_dump(mode="json")`)."""
    data = spec.model_dump(mode="json") if isinstance(spec, Service) else _normalise(spec)
    for name in SCALE_FIELDS:
        data.pop(name, None)
    return hashlib.sha256(_canonical(data).encode()).hexdigest()


def diff_stack(desired: Stack, recorded: Mapping[str, Mapping[str, Any]]) -> list[Change]:
    """One change per service of either side, sorted by service name. `recorded` maps a
    service name to its spec as recorded (`model_dump(mode="json")`)."""
    changes = []
    for name in sorted(set(desired.services) | set(recorded)):
        if name not in recorded:
            changes.append(Change(name, "add"))
        elif name not in desired.services:
            changes.append(Change(name, "remove"))
        else:
            fields = diff_service(desired.services[name], recorded[name])
            changes.append(Change(name, "change" if fields else "unchanged", fields))
    return changes


def diff_service(desired: Service, recorded: Mapping[str, Any]) -> tuple[str, ...]:
    """The sorted dotted paths where `desired` differs from a recorded spec.

    The recorded spec is first re-read through the current model when it still validates,
    so a field added to Shipyard since it was recorded (present only as a default) does not
    count as a change."""
    return tuple(sorted(_differences(desired.model_dump(mode="json"), _normalise(recorded), "")))


def _normalise(recorded: Mapping[str, Any]) -> Any:
    try:
        return Service.model_validate(dict(recorded)).model_dump(mode="json")
    except ValidationError:
        return dict(recorded)


def _differences(new: Any, old: Any, path: str) -> list[str]:
    if isinstance(new, Mapping) and isinstance(old, Mapping):
        out = []
        for key in set(new) | set(old):
            sub = f"{path}.{key}" if path else str(key)
            if key not in new or key not in old:
                out.append(sub)
            else:
                out.extend(_differences(new[key], old[key], sub))
        return out
    if _canonical(new) != _canonical(old):
        return [path]
    return []


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
