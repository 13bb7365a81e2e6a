"""YAML/JSON loading that remembers the line and column of every node, for precise error messages."""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable, Iterator
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
    """Where each value (and each mapping key) of one document was written.

    A map made by the fast loader holds the positions of every node outside sequence items and of
    each sequence item itself (``items``), but not of what lies inside an item (a rule's fields):
    those are asked for only to report a problem, and ``deep`` makes them, once, when they are.
    """

    values: dict[Path, Position] = field(default_factory=dict)
    keys: dict[Path, Position] = field(default_factory=dict)
    items: dict[Path, list[tuple[int, int]]] = field(default_factory=dict)
    """Sequence path -> (line, column) of each of its items (fast maps only)."""
    deep: Callable[[], PositionMap] | None = None
    """Makes the complete map of this document (fast maps only)."""
    _complete: PositionMap | None = None

    def _inside_item(self, path: Path) -> bool:
        return self.deep is not None and any(isinstance(p, int) for p in path[:-1])

    def _full(self) -> PositionMap:
        if self._complete is None:
            assert self.deep is not None
            self._complete = self.deep()
        return self._complete

    def of_value(self, path: Path) -> Position:
        """Return the position of the value at ``path``, or of its nearest ancestor."""
        if self._inside_item(path):
            return self._full().of_value(path)
        while path:
            pos = self.values.get(path)
            if pos is not None:
                return pos
            last = path[-1]
            if isinstance(last, int):
                items = self.items.get(path[:-1])
                if items is not None and 0 <= last < len(items):
                    return Position(*items[last])
            path = path[:-1]
        return self.values.get(path, Position(0, 0))

    def of_key(self, path: Path) -> Position:
        """Return the position of the mapping key that introduces ``path`` (falls back to the value)."""
        if self.deep is not None and any(isinstance(p, int) for p in path):
            return self._full().of_key(path)
        return self.keys.get(path) or self.of_value(path)

    def item_lines(self, path: Path, count: int) -> list[int]:
        """Return the line of each of the first ``count`` items of the sequence at ``path`` (0: unknown)."""
        items = self.items.get(path)
        if items is not None and len(items) >= count:
            return [line for line, _ in items[:count]]
        return [self.of_value((*path, i)).line for i in range(count)]


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


class _Unsupported(Exception):
    """The event builder met an anchor, an alias, a complex key or a repeated key: the node builder takes over."""


_SCALAR, _MAPPING, _SEQUENCE = yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent
_MAPPING_END, _SEQUENCE_END = yaml.MappingEndEvent, yaml.SequenceEndEvent


class _EventBuilder:
    """Builds documents straight from libyaml's events, without the node tree.

    It gives the same values and positions as :func:`_build` over composed nodes, for documents
    without anchors, aliases, complex keys or repeated keys (for those it raises
    :class:`_Unsupported`). Positions inside sequence items are left to :attr:`PositionMap.deep`.
    """

    def __init__(self, get_event: Callable[[], Any]) -> None:
        self.get = get_event
        self.resolved: dict[str, str] = {}  # plain scalar -> its implicit tag
        self.constructed: dict[tuple[str, str], Any] = {}  # (tag, text) -> value, for tags other than str

    def scalar(self, event: Any) -> Any:
        value: str = event.value
        tag = event.tag
        if tag is None or tag == "!":
            if not event.implicit[0]:
                return value
            tag = self.resolved.get(value)
            if tag is None:
                resolve = _constructor.resolve
                tag = self.resolved[value] = resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
        if tag == _STR_TAG:
            return value
        key = (tag, value)
        if key not in self.constructed:
            self.constructed[key] = _scalar(yaml.ScalarNode(tag, value, event.start_mark, event.end_mark))
        return self.constructed[key]

    def node(self, event: Any, path: Path, positions: PositionMap) -> Any:
        """Build the value that starts with ``event``, recording positions down to sequence items."""
        if event.anchor is not None:
            raise _Unsupported
        mark = event.start_mark
        positions.values[path] = Position(mark.line + 1, mark.column + 1)
        kind = event.__class__
        if kind is _SCALAR:
            return self.scalar(event)
        get = self.get
        if kind is _MAPPING:
            out: dict[str, Any] = {}
            while (key_event := get()).__class__ is not _MAPPING_END:
                if key_event.__class__ is not _SCALAR or key_event.anchor is not None or key_event.value in out:
                    raise _Unsupported
                key = key_event.value
                key_mark: Any = key_event.start_mark
                positions.keys[(*path, key)] = Position(key_mark.line + 1, key_mark.column + 1)
                out[key] = self.node(get(), (*path, key), positions)
            return out
        if kind is _SEQUENCE:
            items: list[Any] = []
            marks = positions.items[path] = []
            item = self.item
            while (item_event := get()).__class__ is not _SEQUENCE_END:
                item_mark: Any = item_event.start_mark
                marks.append((item_mark.line + 1, item_mark.column + 1))
                items.append(item(item_event))
            return items
        raise _Unsupported  # an alias

    def item(self, event: Any) -> Any:
        """Build a value inside a sequence item, recording no positions."""
        kind = event.__class__
        if event.anchor is not None:
            raise _Unsupported
        if kind is _SCALAR:
            return self.scalar(event)
        get, item = self.get, self.item
        if kind is _MAPPING:
            out: dict[str, Any] = {}
            while (key_event := get()).__class__ is not _MAPPING_END:
                if key_event.__class__ is not _SCALAR or key_event.anchor is not None or key_event.value in out:
                    raise _Unsupported
                out[key_event.value] = item(get())
            return out
        if kind is _SEQUENCE:
            items: list[Any] = []
            while (item_event := get()).__class__ is not _SEQUENCE_END:
                items.append(item(item_event))
            return items
        raise _Unsupported  # an alias


def _compose_events(text: str) -> list[tuple[Any, PositionMap]]:
    """Parse with libyaml's event stream; complete positions are made on demand by the node builder."""
    complete: list[list[tuple[Any, PositionMap]]] = []

    def deep(index: int) -> PositionMap:
        if not complete:
            complete.append(_compose(text, _FAST_LOADER))
        return complete[0][index][1]

    parser = _FAST_LOADER(text)
    try:
        builder = _EventBuilder(parser.get_event)
        docs: list[tuple[Any, PositionMap]] = []
        parser.get_event()  # stream start
        while not isinstance(parser.get_event(), yaml.StreamEndEvent):  # a document start
            index = len(docs)
            positions = PositionMap(deep=lambda index=index: deep(index))  # type: ignore[misc]
            docs.append((builder.node(parser.get_event(), (), positions), positions))
            parser.get_event()  # document end
        return docs
    finally:
        parser.dispose()


class _NotPlainJson(Exception):
    """The text is not JSON that YAML reads the same way: the YAML parsers take it."""


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F)) + b"\n"
_JSON_SPACE = re.compile(r"[ \n]*")
# YAML 1.1 reads a number as a float only with a dot, and an exponent only with a sign: '1e5' is a string.
_YAML_FLOAT = re.compile(r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?")


def _skip_space(text: str, index: int) -> int:
    match = _JSON_SPACE.match(text, index)
    return match.end() if match else index


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _NotPlainJson  # a repeated key: the YAML path reports it
    return out


def _json_float(text: str) -> float | str:
    return float(text) if _YAML_FLOAT.fullmatch(text) else text


_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_json_object, parse_float=_json_float, parse_constant=str)
# The json module's C scanners (not in its typed interface): one value at an index, one string body.
_SCAN_VALUE: Callable[[str, int], tuple[Any, int]] = _JSON_DECODER.scan_once  # type: ignore[attr-defined]
_SCAN_STRING: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


class _JsonBuilder:
    """Builds a JSON document with the json module's C scanner, with the values YAML would give.

    Positions are recorded as the YAML builders record them, down to sequence items; a whole item
    (a rule) is decoded by the C scanner in one call.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.scan = _SCAN_VALUE
        self.line = 1  # the line of index self.at; positions are asked for in increasing order
        self.at = 0

    def position(self, index: int) -> tuple[int, int]:
        text = self.text
        self.line += text.count("\n", self.at, index)
        self.at = index
        return self.line, index - text.rfind("\n", 0, index)

    def node(self, index: int, path: Path, positions: PositionMap) -> tuple[Any, int]:
        """Build the value at ``index`` (no leading space); return it and the index after it."""
        text, space = self.text, _skip_space
        positions.values[path] = Position(*self.position(index))
        char = text[index]
        if char == "{":
            out: dict[str, Any] = {}
            index = space(text, index + 1)
            if text[index] == "}":
                return out, index + 1
            while True:
                if text[index] != '"':
                    raise _NotPlainJson
                key_position = Position(*self.position(index))
                key, index = _SCAN_STRING(text, index + 1)
                index = space(text, index)
                if text[index] != ":" or key in out:
                    raise _NotPlainJson
                positions.keys[(*path, key)] = key_position
                out[key], index = self.node(space(text, index + 1), (*path, key), positions)
                index = space(text, index)
                if text[index] == "}":
                    return out, index + 1
                if text[index] != ",":
                    raise _NotPlainJson
                index = space(text, index + 1)
        if char == "[":
            items: list[Any] = []
            marks = positions.items[path] = []
            index = space(text, index + 1)
            if text[index] == "]":
                return items, index + 1
            scan, position = self.scan, self.position
            while True:
                marks.append(position(index))
                value, index = scan(text, index)
                items.append(value)
                index = space(text, index)
                if text[index] == "]":
                    return items, index + 1
                if text[index] != ",":
                    raise _NotPlainJson
                index = space(text, index + 1)
        value, index = self.scan(text, index)
        return value, index


def _compose_json(text: str) -> list[tuple[Any, PositionMap]]:
    """Parse a JSON document as YAML would, much faster; complete positions are made on demand.

    Raises:
        _NotPlainJson: Not JSON, or JSON that YAML might read differently.
    """
    # JSON that YAML might read differently goes to the YAML parsers: tabs and carriage returns (YAML
    # counts lines and columns its own way), surrogate escapes (YAML refuses them) and characters
    # YAML does not accept in a stream.
    if "\t" in text or "\r" in text or ("\\u" in text and _SURROGATE_ESCAPE.search(text)):
        raise _NotPlainJson
    if text.isascii():
        if text.encode("ascii").translate(None, _PRINTABLE_ASCII):
            raise _NotPlainJson
    elif yaml.reader.Reader.NON_PRINTABLE.search(text) or any(c in text for c in "\x85\u2028\u2029"):
        raise _NotPlainJson
    start = _skip_space(text, 0)
    positions = PositionMap(deep=lambda: _compose(text, _FAST_LOADER)[0][1])
    try:
        value, end = _JsonBuilder(text).node(start, (), positions)
    except (ValueError, IndexError, StopIteration):
        raise _NotPlainJson from None
    if _skip_space(text, end) != len(text):
        raise _NotPlainJson
    return [(value, positions)]


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
            if text.lstrip(" \n")[:1] in ("{", "["):
                try:
                    return _compose_json(text)
                except _NotPlainJson:
                    pass
            try:
                try:
                    return _compose_events(text)
                except _Unsupported:
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
    except yaml.reader.ReaderError as exc:
        # A character YAML does not allow (a control character, say) anywhere in the file;
        # PyYAML reports it by offset only.
        raise YamlSyntaxError(
            f"character U+{exc.character:04X} is not allowed in a policy file (YAML and JSON take "
            "printable text only; write it as an escape such as \\u0001 inside a double-quoted string)",
            text_position(text, exc.position),
        ) from None


def text_position(text: str, offset: int) -> Position:
    """The 1-based line and column of a character offset into ``text``."""
    line_start = text.rfind("\n", 0, offset) + 1
    return Position(text.count("\n", 0, offset) + 1, offset - line_start + 1)
