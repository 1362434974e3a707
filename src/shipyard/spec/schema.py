"""A JSON Schema (draft 2020-12) of the stack file, for editors and linters.

Derived from the pydantic models, then widened to what a user actually writes: units as
strings (`500m`, `256Mi`, `5s`) or numbers, `restart: always`, `command` as a string,
compose-style lists for `env` and `depends_on`, and `${VAR}` wherever a number goes.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.functional_validators import BeforeValidator

from shipyard.spec import models as m
from shipyard.spec.units import parse_cpu, parse_duration, parse_size

DRAFT = "https://json-schema.org/draft/2020-12/schema"

_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNITS: dict[Any, dict[str, Any]] = {
    parse_cpu: {
        "anyOf": [
            {"type": "number", "minimum": 0},
            {"type": "string", "pattern": rf"^\s*{_NUM}(?:[eE][+-]?\d+)?\s*m?\s*$"},
        ],
        "description": "CPU cores: 0.5, 2, or millicores like 500m",
    },
    parse_size: {
        "anyOf": [
            {"type": "number", "minimum": 0},
            {"type": "string", "pattern": rf"^\s*{_NUM}\s*(?:[kKmMgGtTpP][iI]?[bB]?|[bB])?\s*$"},
        ],
        "description": "bytes, or a size like 256Mi, 1Gi, 512M",
    },
    parse_duration: {
        "anyOf": [
            {"type": "number", "minimum": 0},
            {"type": "string", "pattern": rf"^\s*(?:{_NUM}|(?:{_NUM} *(?:ms|s|m|h|d) *)+)\s*$"},
        ],
        "description": "seconds, or a duration like 200ms, 5s, 2m, 1m30s",
    },
}
_INTERPOLATED = {"type": "string", "pattern": r"\$\{"}
_NAME = {"pattern": m.NAME_RE.pattern}
_ARGV = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": ["string", "number"]}},
        {"type": "null"},
    ],
    "description": "a list is exec'd as is; a string is split like a shell would",
}


def stack_json_schema() -> dict[str, Any]:
    """The schema of `shipyard.yaml` (a fresh dict: callers may change it)."""
    schema = m.Stack.model_json_schema(mode="validation")
    defs = schema["$defs"]
    for model in _models():
        target = schema if model is m.Stack else defs[model.__name__]
        for name, info in model.model_fields.items():
            unit = _unit_of(info.metadata, info.annotation)
            if unit is not None:
                prop = target["properties"][name]
                nullable = any(o.get("type") == "null" for o in prop.get("anyOf", []))
                prop.pop("anyOf", None)
                prop.pop("type", None)
                prop.update(copy.deepcopy(unit))
                if nullable:
                    prop["anyOf"].append({"type": "null"})
    _widen_shorthands(schema, defs)
    _allow_interpolation(schema)
    return {
        "$schema": DRAFT,
        "$id": "https://shipyard.dev/schema/stack.json",
        "title": "Shipyard stack file (shipyard.yaml)",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def _unit_of(metadata: list[Any], annotation: Any) -> dict[str, Any] | None:
    """The unit schema of a field typed Cpu, Size or Duration (optionally `| None`)."""
    found = list(metadata)
    for arg in get_args(annotation):  # `Size | None`: the validator sits inside the union
        if get_origin(arg) is Annotated:
            found += list(arg.__metadata__)
    for meta in found:
        if isinstance(meta, BeforeValidator) and meta.func in _UNITS:
            return _UNITS[meta.func]
    return None


def _models() -> list[type[BaseModel]]:
    return [
        obj
        for obj in vars(m).values()
        if isinstance(obj, type) and issubclass(obj, m.Model) and obj is not m.Model
    ]


def _keep(prop: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """`extra` with the title/default/description of `prop` carried over."""
    kept = {k: prop[k] for k in ("title", "default", "description") if k in prop}
    return {**kept, **extra}


def _widen_shorthands(root: dict[str, Any], defs: dict[str, Any]) -> None:
    props = root["properties"]
    for key in ("source", "base_dir"):  # set by the loader, not written in the file
        props.pop(key, None)
    root["required"] = [r for r in root.get("required", []) if r != "name"]
    props["name"] = _keep(
        props["name"], type="string", **_NAME, description="stack name (default: the folder's name)"
    )
    props["services"]["propertyNames"] = dict(_NAME)
    props["services"]["minProperties"] = 1

    service = defs["Service"]["properties"]
    service["command"] = _keep(service["command"], **copy.deepcopy(_ARGV))
    service["env"] = _keep(
        service["env"],
        anyOf=[
            {
                "type": "object",
                "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
            },
            {"type": "array", "items": {"type": "string"}},
        ],
    )
    service["env_file"] = _keep(
        service["env_file"],
        anyOf=[
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}},
        ],
    )
    service["depends_on"] = _keep(
        service["depends_on"],
        anyOf=[
            {"type": "object", "additionalProperties": {"anyOf": [
                {"$ref": "#/$defs/Condition"}, {"$ref": "#/$defs/Dependency"}]}},
            {"type": "array", "items": {"type": "string"}},
        ],
    )
    service["ports"] = _keep(
        service["ports"],
        type="object",
        propertyNames=dict(_NAME),
        additionalProperties={
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": 65535},
                {"const": "auto"},
            ]
        },
    )
    service["restart"] = _keep(
        service["restart"],
        anyOf=[
            {"$ref": "#/$defs/RestartPolicy"},
            {"$ref": "#/$defs/RestartMode"},
            {"const": False},
        ],
    )
    restart = defs["RestartPolicy"]["properties"]
    restart["policy"] = _keep(
        restart["policy"],
        anyOf=[
            {"$ref": "#/$defs/RestartMode"},
            {"const": False},
        ],
    )
    probe = defs["Probe"]["properties"]
    probe["exec"] = _keep(probe["exec"], **copy.deepcopy(_ARGV))
    stop = defs["StopPolicy"]["properties"]
    stop["signal"] = _keep(stop["signal"], type=["string", "integer"])
    ports = defs["PortsConfig"]["properties"]
    ports["range"] = _keep(
        ports["range"],
        anyOf=[
            {"type": "string", "pattern": r"^\s*\d+\s*-\s*\d+\s*$"},
            {
                "type": "array",
                "prefixItems": [{"type": "integer"}, {"type": "integer"}],
                "minItems": 2,
                "maxItems": 2,
            },
        ],
    )


def _allow_interpolation(node: Any, wrap: bool = True) -> None:
    """Where a number or boolean goes, `${VAR}` may stand (it is resolved before checks)."""
    if isinstance(node, list):
        for item in node:
            _allow_interpolation(item)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "anyOf" and isinstance(value, list):
            for item in value:
                _allow_interpolation(item, wrap=False)  # the alternative goes beside them
        else:
            _allow_interpolation(value)
    alternatives = node.get("anyOf")
    if isinstance(alternatives, list):
        if any(_scalar(a) for a in alternatives) and _INTERPOLATED not in alternatives:
            alternatives.append(dict(_INTERPOLATED))
    elif wrap and _scalar(node):
        constraint = {k: node.pop(k) for k in list(node) if k not in _ANNOTATIONS}
        node["anyOf"] = [constraint, dict(_INTERPOLATED)]


def _scalar(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") in ("integer", "number", "boolean")


_ANNOTATIONS = {"title", "default", "description", "examples"}
