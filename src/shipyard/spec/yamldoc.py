"""Read YAML into plain data while remembering the line of every key and value.

PyYAML's composed node tree carries positions; the ordinary loaders throw them away. The
stack loader needs them to say *where* a problem is, so it builds the data itself from the
nodes (with the safe loader's scalar rules), and records problems instead of raising.

The parsing itself is in spec/yamlparse.py, imported by the first `read_yaml`: the types
here are imported by every part of the spec (and so by the engine, which is handed
stacks already parsed), PyYAML and its C library only by what reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Path = tuple[str | int, ...]


@dataclass
class Document:
    """Plain data (dicts, lists, str, int, float, bool, None) with positions and problems."""

    data: Any = None
    key_lines: dict[Path, int] = field(default_factory=dict)
    value_lines: dict[Path, int] = field(default_factory=dict)
    # source text of scalars that YAML did not read as strings (1.10, 2024-01-01, yes)
    raw_scalars: dict[Path, str] = field(default_factory=dict)
    problems: list[tuple[Path, str, int | None]] = field(default_factory=list)

    def line(self, path: Path) -> int | None:
        """The line of `path`, or of its closest ancestor that has one."""
        for end in range(len(path), 0, -1):
            prefix = path[:end]
            if prefix in self.key_lines:
                return self.key_lines[prefix]
            if prefix in self.value_lines:
                return self.value_lines[prefix]
        return self.value_lines.get(())


def read_yaml(text: str) -> Document:
    """Parse one YAML document; syntax errors become a problem with its line."""
    from shipyard.spec.yamlparse import parse

    return parse(text, Document())
