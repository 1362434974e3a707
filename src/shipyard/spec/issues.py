"""Turn pydantic's validation errors into located, readable `Issue`s.

Pydantic reports locations in its own terms (union branches such as `int` or
`literal['auto']` appear in the path) and messages in its own words. This module maps each
error back onto the document's keys, says what was expected in stack-file terms, and
suggests the closest field or value ("did you mean ...").
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Iterable
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from shipyard.errors import Issue
from shipyard.spec import models as m
from shipyard.spec.yamldoc import Document, Path

# Compose (and habit) names that difflib would not connect to ours.
_KNOWN_ALIASES = {
    "environment": "env",
    "working_dir": "workdir",
    "workingdir": "workdir",
    "cwd": "workdir",
    "healthcheck": "health",
    "entrypoint": "command",
    "cmd": "command",
    "stop_signal": "stop.signal",
    "stop_grace_period": "stop.timeout",
    "dependencies": "depends_on",
    "requires": "depends_on",
    "scale": "replicas",
    "instances": "replicas",
}

# What a field accepts, in stack-file terms, where the type alone would mislead.
_EXPECTED: dict[tuple[type[BaseModel], str], str] = {
    (m.Stack, "services"): "a mapping of service names to services",
    (m.Service, "command"): "a command: a string or a list of strings",
    (m.Service, "env"): "a mapping of NAME: value, or a list of NAME=value strings",
    (m.Service, "env_file"): "a file name or a list of file names",
    (m.Service, "depends_on"): "a mapping of service: condition, or a list of services",
    (m.Service, "ports"): "a mapping of port names to a number or auto, e.g. {http: auto}",
    (m.Service, "restart"): "a restart policy (no, on-failure, always) or a mapping",
    (m.Probe, "exec"): "a command: a string or a list of strings",
    (m.Probe, "tcp"): "a port name or number",
    (m.Probe, "port"): "a port name or number",
    (m.PortsConfig, "range"): "a port range like 30000-32767",
    (m.StopPolicy, "signal"): "a signal name like SIGTERM or SIGINT",
}

_TYPE_PHRASES = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "str": "a string",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
    "list": "a list",
    "tuple": "a list",
    "none": "nothing",
}


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    options = list(candidates)
    alias = _KNOWN_ALIASES.get(word.lower())
    if alias and alias.split(".")[0] in options:
        return f" (did you mean '{alias}'?)"
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(word.lower(), options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _options(annotation: Any) -> list[Any]:
    """The alternatives of a type: Annotated and unions unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _options(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [opt for arg in get_args(annotation) for opt in _options(arg)]
    return [annotation]


def models_at(path: Path) -> list[type[BaseModel]]:
    """The model classes that describe the mapping at `path` (empty when none does)."""
    current: list[Any] = [m.Stack]
    for part in path:
        following: list[Any] = []
        for kind in current:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                info = kind.model_fields.get(str(part))
                if info is not None:
                    following += _options(info.annotation)
            elif get_origin(kind) is dict:
                following += _options(get_args(kind)[1])
            elif get_origin(kind) is list:
                following += _options(get_args(kind)[0])
        current = following
    return [k for k in current if isinstance(k, type) and issubclass(k, BaseModel)]


def field_names(path: Path) -> list[str]:
    """The field names allowed in the mapping at `path`."""
    names: list[str] = []
    for model in models_at(path):
        names += [n for n in model.model_fields if n not in ("source", "base_dir")]
    return names


def _expected_override(path: Path) -> str | None:
    if not path:
        return None
    for model in models_at(path[:-1]):
        phrase = _EXPECTED.get((model, str(path[-1])))
        if phrase:
            return phrase
    return None


def show(value: Any, raw: str | None = None) -> str:
    """A value as a user would recognise it from their file."""
    if value is None:
        return "nothing"
    if raw is not None:
        return raw
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value_at(data: Any, path: Path) -> Any:
    for part in path:
        in_dict = isinstance(data, dict) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if not (in_dict or in_list):
            return None
        data = data[part]
    return data


def data_path(loc: tuple[Any, ...], data: Any, keep_last: bool) -> tuple[Path, bool]:
    """Map a pydantic loc onto the document; True if union branch names were skipped."""
    path: list[str | int] = []
    current = data
    skipped = False
    for index, part in enumerate(loc):
        in_dict = isinstance(current, dict) and isinstance(part, str) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        if in_dict or in_list:
            current = current[part]
            path.append(part)
        elif keep_last and index == len(loc) - 1:
            path.append(part)
        else:
            skipped = True
    return tuple(path), skipped


def _message(error: ErrorDetails, path: Path, doc: Document) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    got = show(value, doc.raw_scalars.get(path))
    if kind == "missing":
        return f"required field '{path[-1]}' is missing" if path else "a required field is missing"
    if kind == "extra_forbidden":
        name = str(path[-1])
        return f"unknown field '{name}'" + did_you_mean(name, field_names(path[:-1]))
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind in ("enum", "literal_error"):
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        return f"expected {_either(choices) or ctx.get('expected')}, got {got}{hint}"
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("more than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        bound = ctx.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # `more than 0`, not `more than 0.0`
        written = _value_at(doc.data, path)
        if isinstance(written, str) and written != value:  # a unit: `0s`, not the 0.0 read
            got = repr(written)
        return f"must be {words} {bound}, got {got}"
    phrase = _expected_override(path) or _type_phrase(kind)
    if phrase:
        message = f"expected {phrase}, got {got}"
        if phrase == "a string" and path in doc.raw_scalars:
            message += f'; put it in quotes: "{doc.raw_scalars[path]}"'
        return message
    return str(error.get("msg", "invalid value"))


def _either(choices: list[str]) -> str:
    """a, b or c"""
    if len(choices) < 2:
        return "".join(choices)
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _type_phrase(kind: str) -> str | None:
    for suffix in ("_type", "_parsing"):
        if kind.endswith(suffix):
            return _TYPE_PHRASES.get(kind[: -len(suffix)])
    return None


def translate(errors: list[ErrorDetails], doc: Document, file: str | None) -> list[Issue]:
    """Located issues for pydantic `errors` raised while validating `doc.data`."""
    grouped: dict[Path, list[tuple[ErrorDetails, bool]]] = {}
    for error in errors:
        keep_last = error["type"] in ("missing", "extra_forbidden")
        path, skipped = data_path(tuple(error["loc"]), doc.data, keep_last)
        grouped.setdefault(path, []).append((error, skipped))
    issues: list[Issue] = []
    for path, items in grouped.items():
        line = doc.line(path if items[0][0]["type"] != "missing" else path[:-1])
        for message in _merge(path, items, doc):
            issues.append(Issue(_dotted(path), message, file, line))
    return issues


def _merge(path: Path, items: list[tuple[ErrorDetails, bool]], doc: Document) -> list[str]:
    """One message for the failed branches of a union, else one per error."""
    if len(items) > 1 and any(skipped for _, skipped in items):
        override = _expected_override(path)
        value = items[0][0].get("input")
        got = show(value, doc.raw_scalars.get(path))
        if override:
            return [f"expected {override}, got {got}"]
        value_errors = [e for e, _ in items if e["type"] == "value_error"]
        if value_errors:  # a parser said precisely what it wants
            return [_message(value_errors[0], path, doc)]
        phrases: list[str] = []
        for error, _ in items:
            if error["type"] in ("enum", "literal_error"):
                phrase = str((error.get("ctx") or {}).get("expected", ""))
            else:
                phrase = _type_phrase(error["type"]) or ""
            if phrase and phrase not in phrases:
                phrases.append(phrase)
        if phrases:
            return [f"expected {' or '.join(phrases)}, got {got}"]
    seen: list[str] = []
    for error, _ in items:
        message = _message(error, path, doc)
        if message not in seen:
            seen.append(message)
    return seen


def _dotted(path: Path) -> str:
    return ".".join(str(part) for part in path)
