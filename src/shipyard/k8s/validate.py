"""Strict, offline validation of manifests against the official Kubernetes schemas.

The schemas are those bundled by the `kubernetes-validate` package (generated from each
Kubernetes release's OpenAPI document; "strict" ones refuse unknown fields). One compiled
validator is kept per (version, kind): validating 500 services does not re-read the
definitions file (several MB) for every object, as `kubernetes_validate.validate` would.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import jsonschema
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

from shipyard.errors import ShipyardError

# The oldest and the newest Kubernetes release whose schemas kubernetes-validate bundles
# that we target (autoscaling/v2 needs 1.23+).
DEFAULT_VERSIONS: tuple[str, ...] = ("1.25.0", "1.37.0")


class ManifestInvalid(ShipyardError):
    """A rendered manifest does not pass schema validation (a bug of the renderer)."""


@dataclass(frozen=True)
class Problem:
    version: str
    kind: str
    name: str
    path: str
    message: str

    def render(self) -> str:
        where = f".{self.path}" if self.path else ""
        return f"{self.kind}/{self.name}{where}: {self.message} (Kubernetes {self.version})"


def bundled_versions() -> list[str]:
    """Kubernetes versions whose schemas the installed kubernetes-validate carries."""
    return sorted(set(kv.all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))


@cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.protocols.Validator:
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    try:
        schema = kv.schema_contents(f"{folder}/{kind.lower()}-{group}.json", version)
    except FileNotFoundError as exc:
        raise ManifestInvalid(f"no schema for {kind} {api_version} in Kubernetes {version}") \
            from exc
    except kv.VersionNotSupportedError as exc:
        raise ManifestInvalid(f"kubernetes-validate has no schemas for Kubernetes {version}",
                              hint=f"it has {', '.join(bundled_versions())}") from exc
    definitions = _definitions(version)
    registry: Registry = Resource.from_contents(schema) @ Registry()
    registry = definitions @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


@cache
def _definitions(version: str) -> Resource:
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    return Resource.from_contents(kv.schema_contents(f"{folder}/_definitions.json", version))


def problems(objects: Iterable[dict[str, Any]],
             versions: Iterable[str] = DEFAULT_VERSIONS) -> list[Problem]:
    """Every schema violation of every object, for every version."""
    found: list[Problem] = []
    # `1.30` or `v1.30` means 1.30.0, as the bundled folders are named
    versions = [".".join([*v.lstrip("v").split("."), "0", "0"][:3]) for v in versions]
    for obj in objects:
        kind, api = obj.get("kind", "?"), obj.get("apiVersion", "?")
        name = obj.get("metadata", {}).get("name", "?")
        for version in versions:
            validator = _validator(version, kind, api)
            for error in validator.iter_errors(obj):
                path = ".".join(str(p) for p in error.absolute_path)
                found.append(Problem(version, kind, name, path, error.message))
    return found


def check(objects: Iterable[dict[str, Any]], versions: Iterable[str] = DEFAULT_VERSIONS) -> int:
    """Validate; raise ManifestInvalid listing every problem; return the objects checked."""
    objects = list(objects)
    found = problems(objects, versions)
    if found:
        raise ManifestInvalid("\n".join(p.render() for p in found))
    return len(objects)
