"""The fast document loaders give the values and positions the node-by-node YAML builder gives."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.policy.yamlpos import _FAST_LOADER, PositionMap, YamlSyntaxError, _compose, _load_slow, load_documents

TEXTS = {
    "yaml scalars": (
        "a: yes\nb: on\nc: ~\nd: 0o17\ne: 017\nf: 1_000\ng: 1.5e+3\nh: 2001-12-14t21:59:43.10-05:00\n"
        "i: !!str 123\nj: !!int '42'\nk: |\n  block\n  text\nl: [1, 'x', \"y\", {m: n}]\nn: .inf\np: null\n"
        "q: 0x1F\nr: ''\ns: !!binary aGVsbG8=\nt: ! 12\n"
    ),
    "yaml documents": "---\n---\na: 1\n---\n- x\n- [y, z]\n- {w: 1}\n...\n",
    "yaml anchors": "a: &x {b: 1}\nc: *x\nd: [*x]\n",
    "yaml merge key taken literally": "a: {<<: {b: 1}, c: 2}\n",
    "yaml policy": (
        "spec:\n  rules:\n    - name: x\n      to: [1.2.3.4, '::1']\n      who: {exe: [/bin/x]}\n"
        "  defaults: {detect: alert, prevent: {egress: deny}}\n"
    ),
    "json numbers": '{"a": 1e5, "b": 1.0e+5, "c": 1.5, "d": -0, "e": 1E-3, "f": 2.5E+3, "g": [NaN, Infinity]}',
    "json escapes": '{"a\\/b": "x\\u00e9\\n\\"q\\"", "u": "\\u2028", "e": "", "bs": "\\\\", "z": "\\u0000"}',
    "json nesting": '[[1, [2, {"a": [3]}]], {}, [], {"b": {"c": []}}, "s", true, false, null]',
    "json scalar": '  "hello"  \n',
    "json unicode": '{"ключ": "значение", "e": "😀"}',
    "json tabs": '{\t"a": [1,\t2]}',
    "json crlf": '{"a": 1,\r\n "b": [2]}',
    "json surrogates": '{"a": "\\ud83d\\ude00"}',
    "json repeated key": '{"a": 1, "a": 2}',
    "json repeated key in an item": '{"a": [{"b": 1, "b": 2}]}',
    "json trailing text": '{"a": 1} x',
}


def positions_agree(expected: PositionMap, got: PositionMap) -> None:
    for path in [*expected.values, *expected.keys]:
        for probe in (path, (*path, "absent"), (*path, 99)):
            assert got.of_value(probe) == expected.of_value(probe), probe
            assert got.of_key(probe) == expected.of_key(probe), probe


def node_builder(text: str) -> list[tuple[Any, PositionMap]]:
    """What load_documents gave before its fast paths: libyaml's nodes, or the pure-Python parser's."""
    try:
        return _compose(text, _FAST_LOADER)
    except yaml.YAMLError:
        return _load_slow(text)


def same_as_node_builder(text: str) -> None:
    try:
        expected = node_builder(text)
    except YamlSyntaxError as exc:
        with pytest.raises(YamlSyntaxError) as raised:
            load_documents(text)
        assert (raised.value.message, raised.value.position) == (exc.message, exc.position)
        return
    except yaml.YAMLError as exc:  # e.g. a character YAML refuses anywhere: not reported with a position
        with pytest.raises(type(exc)):
            load_documents(text)
        return
    got = load_documents(text)
    assert repr([v for v, _ in got]) == repr([v for v, _ in expected])
    for (_, expected_positions), (_, got_positions) in zip(expected, got, strict=True):
        positions_agree(expected_positions, got_positions)


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_documents_load_as_the_node_builder_loads_them(text: str) -> None:
    same_as_node_builder(text)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["yes", "no", "on", "1e5", "0x10", "010", "1_0", "~", "", "a: b", "- x", "#c", "10.0.0.0/8"]),
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(document=DOCUMENTS, indent=st.sampled_from([None, 1, 2, 4]), ascii_only=st.booleans())
def test_json_documents_load_as_the_node_builder_loads_them(
    document: Any, indent: int | None, ascii_only: bool
) -> None:
    same_as_node_builder(json.dumps(document, indent=indent, ensure_ascii=ascii_only))


@settings(max_examples=200, deadline=None)
@given(document=DOCUMENTS, flow=st.sampled_from([None, True, False]))
def test_yaml_documents_load_as_the_node_builder_loads_them(document: Any, flow: bool | None) -> None:
    same_as_node_builder(yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True))
