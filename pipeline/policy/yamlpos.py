"""YAML/JSON loading that remembers the line and column of every node, for precise error messages."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import yaml

# libyaml's parser when PyYAML was built with it; it produces the same nodes and marks as the
# pure-Python one, but its error messages differ, so errors are always re-reported by the latter.
_FAST_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

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
_SCALAR_CONSTRUCTORS = _constructor.yaml_constructors
_STR_TAG = "tag:yaml.org,2002:str"


def _scalar(node: yaml.Node) -> Any:
    # The safe constructor's own function, called without construct_object's per-node memo
    # (which, on this shared constructor, would keep every node ever loaded alive).
    if node.tag == _STR_TAG:
        return node.value
    construct = _SCALAR_CONSTRUCTORS.get(node.tag)
    if construct is None:
        return _constructor.construct_object(node, deep=True)
    return construct(_constructor, node)


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
    return _scalar(node)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building large acyclic structures.

    Building 100k rules allocates millions of objects, and the collector's repeated full passes
    over them made loading quadratic; nothing built here forms reference cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _compose(text: str, loader: type[Any]) -> list[tuple[Any, PositionMap]]:
    docs: list[tuple[Any, PositionMap]] = []
    for node in yaml.compose_all(text, Loader=loader):
        if node is None:
            continue
        positions = PositionMap()
        docs.append((_build(node, (), positions), positions))
    return docs


def load_documents(text: str) -> list[tuple[Any, PositionMap]]:
    """Parse every document of a YAML (or JSON) stream.

    Args:
        text: The file contents.

    Returns:
        One ``(value, positions)`` pair per non-empty document.

    Raises:
        YamlSyntaxError: The text is not valid YAML, or a mapping repeats a key.
    """
    with paused_gc():
        if _FAST_LOADER is not yaml.SafeLoader:
            try:
                return _compose(text, _FAST_LOADER)
            except yaml.YAMLError:
                pass  # report it with the pure-Python parser's message and position
        return _load_slow(text)


def _load_slow(text: str) -> list[tuple[Any, PositionMap]]:
    try:
        return _compose(text, yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        position = Position(mark.line + 1, mark.column + 1) if mark else Position(1, 1)
        raise YamlSyntaxError(f"invalid YAML: {exc.problem or exc.context}", position) from None
