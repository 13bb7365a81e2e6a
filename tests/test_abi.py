"""loaders/abi.py layouts match the BTF of the compiled object: sizes, field offsets and field sizes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from typing import Any

import pytest

from loaders import abi
from loaders.sensors import OBJECT_PATH

_QUALIFIERS = {"TYPEDEF", "VOLATILE", "CONST", "RESTRICT", "TYPE_TAG"}


@cache
def btf_types() -> dict[int, dict[str, Any]]:
    """Every BTF type of sensors.bpf.o by id (from ``bpftool btf dump file X -j``)."""
    bpftool = shutil.which("bpftool")
    if bpftool is None:
        pytest.fail("bpftool is needed to read the object's BTF (apt-get install bpftool)", pytrace=False)
    out = subprocess.run([bpftool, "btf", "dump", "file", str(OBJECT_PATH), "-j"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return {t["id"]: t for t in json.loads(out)["types"]}


def type_size(type_id: int) -> int:
    """Size in bytes of a BTF type, following typedefs/qualifiers and multiplying arrays."""
    t = btf_types()[type_id]
    kind = t["kind"]
    if kind in _QUALIFIERS:
        return type_size(t["type_id"])
    if kind == "ARRAY":
        return int(t["nr_elems"]) * type_size(t["type_id"])
    return int(t["size"])


def struct_named(name: str) -> dict[str, Any]:
    found = [t for t in btf_types().values() if t["kind"] == "STRUCT" and t.get("name") == name]
    assert found, f"struct {name} is not in the BTF of {OBJECT_PATH} (is it used by a map or program?)"
    return found[0]


@pytest.mark.parametrize("layout", abi.ALL_LAYOUTS, ids=lambda layout: layout.c_name)
def test_layout_matches_btf(layout: abi.Layout) -> None:
    """Struct size, and every named field's offset and size, equal the C struct's."""
    st = struct_named(layout.c_name)
    assert layout.size == st["size"], f"struct {layout.c_name}: Python {layout.size} bytes, C {st['size']}"
    members = {m["name"]: m for m in st["members"]}
    for name, (offset, size) in layout.offsets().items():
        assert name in members, f"{layout.c_name}.{name} is not a member of the C struct"
        m = members[name]
        assert m["bits_offset"] % 8 == 0 and not m.get("bitfield_size")
        assert (m["bits_offset"] // 8, type_size(m["type_id"])) == (offset, size), f"{layout.c_name}.{name}"
    named_c = {n for n in members if not n.startswith("_")}
    assert named_c == set(layout.offsets()), f"{layout.c_name}: fields differ"


def test_flat_records_match_their_layouts() -> None:
    """The one-unpack decoders cover exactly the event structs."""
    assert abi.CONN_RECORD.size == struct_named("tool_conn_event")["size"]
    assert abi.EXEC_RECORD.size == struct_named("tool_exec_event")["size"]


@pytest.mark.parametrize(
    ("define", "value"),
    [
        ("TOOL_SLOT_NODES", abi.SLOT_NODES),
        ("TOOL_MAX_NESTING", abi.MAX_NESTING),
        ("TOOL_LPM_KEY_BITS", abi.LPM_KEY_BITS),
    ],
)
def test_constants_match_the_header(define: str, value: int) -> None:
    """Python builds maps and tables with these (a fresh trie must match rule_nodes' inner template exactly)."""
    header = (OBJECT_PATH.parents[2] / "bpf" / "include" / "tool_abi.h").read_text()
    found = re.search(rf"^#define {define} (\d+)", header, re.MULTILINE)
    assert found is not None, f"{define} is not defined in tool_abi.h"
    assert int(found.group(1)) == value
