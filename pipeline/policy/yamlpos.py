"""YAML/JSON loading that remembers the line and column of every node, for precise error messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

PathItem = str | int
Path = tuple[PathItem, ...]


@dataclass(frozen=True, slots=True)
class Position:
    """A 1-based line and column."""

    line: int
    column: int


@dataclass(slots=True)
class PositionMap:
    """Where each value (and each mapping key) of one document was written."""

    values: dict[Path, Position] = field(default_factory=dict)
    keys: dict[Path, Position] = field(default_factory=dict)

    def of_value(self, path: Path) -> Position:
        """Return the position of the value at ``path``, or of its nearest ancestor."""
        while path not in self.values and path:
            path = path[:-1]
        return self.values.get(path, Position(0, 0))

    def of_key(self, path: Path) -> Position:
        """Return the position of the mapping key that introduces ``path`` (falls back to the value)."""
        return self.keys.get(path) or self.of_value(path)


class YamlSyntaxError(Exception):
    """The text is not well-formed YAML; carries the position of the problem."""

    def __init__(self, message: str, position: Position) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


def _pos(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


_constructor = yaml.SafeLoader("")


def _build(node: yaml.Node, path: Path, positions: PositionMap) -> Any:
    positions.values[path] = _pos(node)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            # Keys are taken literally (YAML 1.1 would read a key 'on' or 'no' as a boolean).
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            if key in out:
                raise YamlSyntaxError(f"duplicate key '{key}'", _pos(key_node))
            positions.keys[(*path, key)] = _pos(key_node)
            out[key] = _build(value_node, (*path, key), positions)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), positions) for i, item in enumerate(node.value)]
    return _constructor.construct_object(node, deep=True)


def load_documents(text: str) -> list[tuple[Any, PositionMap]]:
    """Parse every document of a YAML (or JSON) stream.

    Args:
        text: The file contents.

    Returns:
        One ``(value, positions)`` pair per non-empty document.

    Raises:
        YamlSyntaxError: The text is not valid YAML, or a mapping repeats a key.
    """
    docs: list[tuple[Any, PositionMap]] = []
    try:
        for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
            if node is None:
                continue
            positions = PositionMap()
            docs.append((_build(node, (), positions), positions))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        position = Position(mark.line + 1, mark.column + 1) if mark else Position(1, 1)
        raise YamlSyntaxError(f"invalid YAML: {exc.problem or exc.context}", position) from None
    return docs
