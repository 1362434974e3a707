"""The YAML parsing behind `spec.yamldoc.read_yaml` (see there): PyYAML's node tree, built
into plain data with the line of every key and value, problems recorded, not raised."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from shipyard.spec.yamldoc import Document, Path

_MAX_NODES = 100_000  # anchors can make a small file huge ("billion laughs")
_MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"
_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


class _TooLarge(Exception):
    pass


def parse(text: str, doc: Document) -> Document:
    """Parse one YAML document into `doc`; syntax errors become a problem with its line."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is not None:
            _Builder(loader, doc).run(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        doc.problems.append(((), f"invalid YAML: {_yaml_message(exc)}", line))
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        character = chr(exc.character) if isinstance(exc.character, int) else exc.character
        doc.problems.append(((), f"invalid YAML: {exc.reason} ({character!r})", line))
    except yaml.YAMLError as exc:
        doc.problems.append(((), f"invalid YAML: {exc}", None))
    except RecursionError:
        doc.problems.append(((), "invalid YAML: nested too deeply", None))
    finally:
        if loader is not None:
            loader.dispose()
    return doc


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    problem, context = exc.problem or "", exc.context or ""
    if problem and context:
        return f"{problem} ({context})" if context.startswith("while") else f"{context}, {problem}"
    return problem or context or "cannot parse"


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, doc: Document) -> None:
        self.loader = loader
        self.doc = doc
        self.count = 0
        self.active: set[int] = set()

    def run(self, node: Node) -> None:
        try:
            self.doc.data = self.build(node, ())
        except _TooLarge:
            self.doc.data = None
            self.doc.problems.append(
                ((), "the document is too large (anchors expanding without bound?)", None)
            )

    def problem(self, path: Path, message: str, node: Node) -> None:
        self.doc.problems.append((path, message, node.start_mark.line + 1))

    def build(self, node: Node, path: Path) -> Any:
        self.count += 1
        if self.count > _MAX_NODES:
            raise _TooLarge
        self.doc.value_lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if len(path) > _MAX_DEPTH:
            self.problem(path, "nested too deeply", node)
            return None
        if id(node) in self.active:
            self.problem(path, "an alias refers to itself (recursive anchor)", node)
            return None
        if node.tag not in _COLLECTION_TAGS:
            self.problem(path, f"unsupported YAML tag {node.tag}", node)
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            assert isinstance(node, MappingNode)
            return self.mapping(node, path)
        finally:
            self.active.discard(id(node))

    def scalar(self, node: ScalarNode, path: Path) -> Any:
        try:
            value = self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            reason = getattr(exc, "problem", None) or str(exc)
            self.problem(path, f"cannot read value {node.value!r}: {reason}", node)
            return node.value
        if isinstance(value, str):
            return value
        self.doc.raw_scalars[path] = node.value
        if value is None or isinstance(value, bool | int | float):
            return value
        return node.value  # dates, binary...: keep what was written

    def mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = {}
        explicit: list[tuple[ScalarNode, Node]] = []
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag == _MERGE_TAG:
                # `<<: *defaults`: merged first, so explicit keys (and their lines) win
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for source in sources:
                    merged = self.build(source, path)
                    if isinstance(merged, dict):
                        for key, value in merged.items():
                            result.setdefault(key, value)
                    else:
                        self.problem(path, "a merge (<<) needs a mapping or a list of them", source)
            elif isinstance(key_node, ScalarNode):
                explicit.append((key_node, value_node))
            else:
                self.problem(path, "a key must be a plain name, not a list or a mapping", key_node)
        first_line: dict[str, int] = {}
        for key_node, value_node in explicit:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in first_line:
                message = f"duplicate key '{key}' (first at line {first_line[key]})"
                self.problem((*path, key), message, key_node)
            first_line[key] = line
            self.doc.key_lines[(*path, key)] = line
            self.doc.value_lines[(*path, key)] = value_node.start_mark.line + 1
            result[key] = self.build(value_node, (*path, key))
        return result
