"""The native helper for policy swaps: the same tables as the Python code, real kernel errors reported, a fallback."""

from __future__ import annotations

import errno
import ipaddress
import os
import platform
import random
import re
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loaders import abi, doctor, native
from loaders import sensors as s
from loaders.maps import BPF_F_NO_PREALLOC, BPF_MAP_TYPE_LPM_TRIE, Map
from tests.kernel_support import require_native

RULE = s._RULE_PADDED


def test_the_committed_helper_loads_and_doctor_says_so() -> None:
    require_native()
    check = doctor.check_native()
    assert (check.status, check.required) == (doctor.OK, False)
    assert native.library_path() in check.detail


def test_missing_or_turned_off_means_the_python_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOOL_NATIVE", "0")
    assert native.get() is None
    assert doctor.check_native().status == doctor.INFO
    monkeypatch.delenv("TOOL_NATIVE")
    # As on an architecture without a build: the library is not there.
    monkeypatch.setattr(native, "library_path", lambda: str(tmp_path / "libtool_lpm.none.so"))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    assert native.get() is None
    check = doctor.check_native()
    assert check.status == (doctor.WARN if platform.machine() in native.BUILT_FOR else doctor.INFO)
    assert "Python" in check.detail
    monkeypatch.setenv("TOOL_NATIVE", "no")  # a value that means nothing: said, not taken for "on"
    with pytest.raises(ValueError, match="TOOL_NATIVE='no': expected 0"):
        native.get()
    assert doctor.check_native().status == doctor.WARN


# ---- the same tables from both: random node sets with deep nesting in both families ----


def node_key(direction: int, protocol: int, network: ipaddress.IPv6Network) -> int:
    """A node key as the compiler makes it (loaders.sensors._group_entries)."""
    length = abi.LPM_KEY_BITS + network.prefixlen
    return length << 184 | direction << 144 | protocol << 136 | int(network.network_address)


@st.composite
def node_sets(draw: st.DrawFn) -> dict[int, bytes]:
    """Chains of nested prefixes (up to 20 deep, past the kernel's 16) and loose ones, v4-mapped and IPv6."""
    nodes: dict[int, bytes] = {}
    rule_id = 0
    for _ in range(draw(st.integers(0, 6))):
        base = draw(st.sampled_from([ipaddress.IPv6Network("::ffff:0:0/96"), ipaddress.IPv6Network("2001:db8::/32")]))
        start = draw(st.integers(0, 8))
        depth = draw(st.integers(1, 20))
        address = int(base.network_address) | draw(st.integers(0, (1 << (128 - base.prefixlen)) - 1))
        direction = draw(st.sampled_from(sorted(abi.DIRECTIONS.values())))
        protocol = draw(st.sampled_from([0, 6, 17]))
        step = draw(st.integers(1, 3))
        for i in range(depth):
            plen = min(128, base.prefixlen + start + i * step)
            net = ipaddress.IPv6Network((address, plen), strict=False)
            key = node_key(direction, protocol, net)
            count = draw(st.integers(1, 3)) if draw(st.integers(0, 400)) else abi.MAX_NODE_RULES + 1
            rules = b"".join(RULE.pack(1, 0, 65535, 3, rule_id + j) for j in range(count))
            rule_id += count
            nodes[key] = nodes.get(key, b"") + rules
    return nodes


@contextmanager
def writer(flag: str) -> Iterator[None]:
    saved = os.environ.get("TOOL_NATIVE")
    os.environ["TOOL_NATIVE"] = flag
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TOOL_NATIVE"]
        else:
            os.environ["TOOL_NATIVE"] = saved


def packed_by(flag: str, nodes: dict[int, bytes]) -> tuple[bytes, bytes, bytes] | str:
    """The packed tables, or the error, that one writer makes of ``nodes``."""
    t = s.KernelTables()
    with writer(flag):
        try:
            s._pack_nodes(t, SimpleNamespace(kernel_nodes=nodes))  # type: ignore[arg-type]  # as the compiler groups
        except s.TablesError as exc:
            return str(exc)
    return t.lpm_keys, t.lpm_values, t.rules


@settings(max_examples=300, deadline=None)
@given(nodes=node_sets())
def test_native_and_python_pack_the_same_bytes_and_refuse_the_same_policies(nodes: dict[int, bytes]) -> None:
    """Sorting, enclosing lengths, values and rules, and the error for too deep or too crowded, are identical."""
    require_native()
    assert packed_by("1", nodes) == packed_by("0", nodes)


def test_an_empty_policy_and_a_single_node_pack_alike() -> None:
    require_native()
    one = {node_key(1, 6, ipaddress.IPv6Network("::ffff:a00:0/104")): RULE.pack(1, 0, 65535, 3, 1)}
    for nodes in ({}, one):
        assert packed_by("1", nodes) == packed_by("0", nodes)
    packed = packed_by("1", one)
    assert not isinstance(packed, str)
    keys, values, _ = packed
    assert len(keys) == abi.LPM_KEY.size and values == (1 << 32).to_bytes(8, "little")


def test_pack_refuses_what_it_does_not_handle() -> None:
    helper = require_native()
    keys = bytes(24 * 10)
    with pytest.raises(ValueError, match="bytes of keys for"):
        helper.pack(keys[:-1], array("I", [24] * 10), 24, 24, 16)
    with pytest.raises(ValueError, match="cannot pack"):  # only struct tool_lpm_key's size
        helper.pack(bytes(32 * 10), array("I", [24] * 10), 32, 24, 16)


# ---- writing: against real tries ----


def sorted_keys(n: int, seed: int) -> tuple[bytes, bytes]:
    """``n`` distinct /128 egress TCP keys for slot 0 in key order, with values 1..n."""
    rng = random.Random(seed)
    ints = sorted({node_key(1, 6, ipaddress.IPv6Network((rng.getrandbits(128), 128))) for _ in range(n)})
    values = b"".join(i.to_bytes(8, "little") for i in range(1, len(ints) + 1))
    return b"".join(i.to_bytes(24, "big") for i in ints), values


def trie(max_entries: int = 1024) -> Map:
    size = abi.LPM_KEY.size
    return Map.create("tool_test_trie", BPF_MAP_TYPE_LPM_TRIE, size, 8, max_entries, BPF_F_NO_PREALLOC)


@pytest.mark.kernel
def test_sync_writes_the_difference_and_reports_a_real_kernel_failure_where_it_happened() -> None:
    helper = require_native()
    old, new = sorted_keys(40, 1), sorted_keys(40, 2)
    both = (old[0][: 20 * 24] + new[0][: 20 * 24], old[1][: 20 * 8] + new[1][: 20 * 8])  # not sorted
    with trie() as t:
        done = helper.sync(t.fd, (b"", b""), old, 24, 4, 1, 1000)
        assert (done.error, done.written, done.deleted) == (0, 40, 0)
        key = bytearray(old[0][:24])
        key[4] = 1  # the slot byte is patched on the way
        assert t.lookup(bytes(key)) == (1 + 1000).to_bytes(8, "little")
        counted = helper.sync(-1, old, new, 24, 4, 1, 1000)  # counts only
        assert (counted.deleted, counted.written) == (40, 40) and len(list(t.keys())) == 40
        # Deleting keys the trie does not hold is not a failure (a write that failed half way).
        done = helper.sync(t.fd, new, old, 24, 4, 1, 1000)
        assert (done.error, done.deleted) == (0, 0)
        with pytest.raises(ValueError, match="ascending order"):
            helper.sync(t.fd, old, both, 24, 4, 1, 1000)
    with trie(max_entries=25) as small:
        done = helper.sync(small.fd, (b"", b""), old, 24, 4, 0, 0)
        assert done.error == -errno.ENOSPC and done.phase == 2 and done.failed == 25 and done.written == 25


@pytest.mark.kernel
def test_a_failed_native_write_names_the_node_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error raised from a failed sync says which call failed, at which node of how many."""
    require_native()
    new = sorted_keys(30, 3)
    tables = s.KernelTables()
    tables.lpm_keys, tables.lpm_values = new
    with trie(max_entries=10) as small:
        plan = s._LpmPlan(30, native_old=(b"", b""))
        with pytest.raises(Exception, match=re.escape("bpf_map_update_elem(tool_test_trie, node 11 of 30)")):
            s._write_lpm(small, plan, tables, 0, native.get())
