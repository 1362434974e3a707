"""`${VAR}`, `${VAR:-default}` and `$$` in stack-file strings.

Expansion happens twice. The loader resolves what is known when the file is read (the
environment and `.env`) and leaves per-instance variables (`${PORT}`, `${DB_URL}`...) in
place, still escaped, in the fields the engine expands at launch. The engine then calls
`expand` with each instance's variables. A lone `$` (as in `$HOME` or `awk '{print $1}'`)
is literal, so shell commands keep working. Inside a default, `$}` is a literal `}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_DEPTH = 20


class InterpolationError(ValueError):
    """A `${...}` that cannot be expanded; `variable` names it when one is missing."""

    def __init__(self, message: str, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


@dataclass(frozen=True)
class _Var:
    name: str
    default: list[_Part] | None  # the parts of `:-default`, or None without a default


_Part = str | _Var  # literal text (escapes already undone) or a variable


def _parse(text: str, pos: int = 0, depth: int = 0) -> tuple[list[_Part], int]:
    """Parse until the end of `text`, or (when nested in a default) an unmatched `}`."""
    if depth > _MAX_DEPTH:
        raise InterpolationError("defaults nested too deeply")
    parts: list[_Part] = []
    literal: list[str] = []
    while pos < len(text):
        char = text[pos]
        if char == "}" and depth:
            break
        follower = text[pos + 1] if pos + 1 < len(text) else ""
        if char != "$" or follower not in ("$", "{", "}" if depth else "$"):
            literal.append(char)
            pos += 1
            continue
        if follower in "$}":
            literal.append(follower)  # `$$` → `$`; in a default `$}` → `}`
            pos += 2
            continue
        match = _NAME_RE.match(text, pos + 2)
        end = match.end() if match else pos + 2
        if match and text.startswith("}", end):
            default = None
            pos = end + 1
        elif match and text.startswith(":-", end):
            default, pos = _parse(text, end + 2, depth + 1)
            if not text.startswith("}", pos):
                raise _invalid(text, pos - 1)
            pos += 1
        else:
            raise _invalid(text, pos)
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(_Var(match.group(), default))
    if literal:
        parts.append("".join(literal))
    return parts, pos


def _invalid(text: str, pos: int) -> InterpolationError:
    start = text.rfind("${", 0, pos + 1)
    snippet = text[start if start >= 0 else pos :][:40]
    return InterpolationError(
        f"invalid interpolation {snippet!r}: use ${{NAME}} or ${{NAME:-default}}, "
        "and $$ for a literal $"
    )


def parse(text: str) -> list[_Part]:
    """The parts of `text`; raises InterpolationError on a malformed `${`."""
    return _parse(text)[0]


def undefined_message(name: str) -> str:
    return (
        f"undefined variable {name}; set it in the environment or .env, "
        f"or give a default ${{{name}:-value}}"
    )


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Expand every `${VAR}` of `text` from `variables` and turn `$$` into `$`.

    `${VAR:-default}` uses the default when VAR is unset or empty. Raises ValueError
    (an InterpolationError naming the variable) when a variable has no value and no default.
    """
    return _render_final(parse(text), variables)


def _render_final(parts: list[_Part], variables: Mapping[str, str]) -> str:
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = variables.get(part.name)
        if part.default is not None and not value:
            out.append(_render_final(part.default, variables))
        elif value is None:
            raise InterpolationError(f"undefined variable {part.name}", part.name)
        else:
            out.append(value)
    return "".join(out)


def escape(text: str, in_default: bool = False, followed_by: str = "") -> str:
    """Make `text` literal for a later expansion, changing as little as possible: a `$` is
    doubled only where it would start syntax (before `$`, `{`, or `}` in a default), and in
    a default `}` becomes `$}`. `followed_by` is the text that will come right after."""
    specials = "${}" if in_default else "${"
    out: list[str] = []
    for index, char in enumerate(text):
        following = text[index + 1] if index + 1 < len(text) else followed_by[:1]
        if char == "$" and following and following in specials:
            out.append("$$")
        elif char == "}" and in_default:
            out.append("$}")
        else:
            out.append(char)
    return "".join(out)


Resolver = Callable[[str], "str | None"]


def resolve_now(
    text: str,
    lookup: Resolver,
    *,
    keep: Callable[[str], bool] = lambda name: False,
    deferred: bool = False,
    hint: Callable[[str], str | None] = lambda name: None,
) -> str:
    """Load-time expansion of `text`.

    `lookup` gives a variable's value or None. With `deferred` (fields the engine expands
    again per instance) the result stays in interpolation syntax: variables for which
    `keep` is true are left as `${...}`, `$$` stays `$$` and inserted values are escaped.
    Without it the result is final text. An unset variable without a default raises
    InterpolationError, with `hint(name)` (if any) as the message instead of the generic one.
    """
    return _Renderer(lookup, keep, deferred, hint).render(parse(text), in_default=False)


@dataclass(frozen=True)
class _Renderer:
    lookup: Resolver
    keep: Callable[[str], bool]
    deferred: bool
    hint: Callable[[str], str | None]

    def render(self, parts: list[_Part], in_default: bool, followed_by: str = "") -> str:
        segments = self.segments(parts, in_default)
        if not self.deferred:
            return "".join(text for text, _ in segments)
        out = followed_by
        for text, final in reversed(segments):  # escape once the successor is known
            out = (escape(text, in_default, followed_by=out) if final else text) + out
        return out[: len(out) - len(followed_by)]

    def segments(self, parts: list[_Part], in_default: bool) -> list[tuple[str, bool]]:
        """(text, True) for final text still to escape, (text, False) for syntax."""
        segments: list[tuple[str, bool]] = []
        for part in parts:
            if isinstance(part, str):
                segments.append((part, True))
            elif self.deferred and self.keep(part.name):
                if part.default is None:
                    segments.append((f"${{{part.name}}}", False))
                else:
                    inner = self.render(part.default, in_default=True, followed_by="}")
                    segments.append((f"${{{part.name}:-{inner}}}", False))
            else:
                value = self.lookup(part.name)
                if part.default is not None and not value:
                    segments += self.segments(part.default, in_default)
                elif value is None:
                    message = self.hint(part.name) or undefined_message(part.name)
                    raise InterpolationError(message, part.name)
                else:
                    segments.append((value, True))
        return segments


def variables_in(text: str) -> list[str]:
    """The names referenced by `text` (defaults included); [] if it does not parse."""
    try:
        parts = parse(text)
    except InterpolationError:
        return []
    names: list[str] = []
    stack = [parts]
    while stack:
        for part in stack.pop():
            if isinstance(part, _Var):
                names.append(part.name)
                if part.default is not None:
                    stack.append(part.default)
    return names
