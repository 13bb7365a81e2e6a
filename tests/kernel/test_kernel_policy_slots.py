"""Each swap leaves both policy slots holding exactly their policy: nothing stale, nothing missing."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import time
from typing import Any

import pytest

from loaders import abi, errors, native
from loaders.maps import Map
from loaders.sensors import KernelTables, build_tables
from tests.kernel.kernel_harness import Harness
from tests.kernel_support import require_native

pytestmark = pytest.mark.kernel

U32 = struct.Struct("<I")


def deny(name: str, *to: str, ports: list[int] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": name, "action": "deny", "direction": "egress", "to": list(to)}
    if ports:
        rule["ports"] = ports
    return rule


A = [deny("a1", "10.0.0.0/8"), deny("a2", "10.1.0.0/16", ports=[22]), deny("a3", "2001:db8::/32")]
B = [deny("b1", "192.0.2.0/24"), deny("b2", "10.1.0.0/16"), deny("b3", "198.51.100.7", ports=[80, 443])]
A_PLUS = [*A, deny("a4", "10.1.2.3")]


def tables_of(h: Harness, rules: list[dict[str, Any]]) -> KernelTables:
    compiled, _ = h.apply(rules)
    return build_tables(compiled, "/")


def expected_slot(tables: KernelTables, slot: int) -> tuple[dict[bytes, bytes], list[bytes]]:
    """The LPM entries and rules array entries a slot must hold, packed here with the ABI layouts."""
    lpm_key, lpm_value, rule_layout = abi.LPM_KEY.compile(), abi.LPM_VALUE.compile(), abi.RULE.compile()
    entries: dict[bytes, bytes] = {}
    rules: list[bytes] = []
    for node in tables.nodes:
        address = node.network.network_address.packed
        key = lpm_key.pack(abi.LPM_KEY_BITS + node.network.prefixlen, slot, node.direction, node.protocol, 0, address)
        first = slot * abi.SLOT_RULES + len(rules)
        entries[key] = lpm_value.pack(first, len(node.rules), node.parent_len)
        rules += [rule_layout.pack(who, lo, hi, act, bytes(3), rid, 0) for who, lo, hi, act, rid in node.rules]
    return entries, rules


def map_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("map_id:"))


def slot_contents(h: Harness, slot: int, rule_count: int) -> tuple[dict[bytes, bytes], list[bytes]]:
    """What the kernel maps hold for ``slot``: its LPM entries and the first ``rule_count`` rules."""
    nodes = h.sensors.slot_trie(slot)
    # The programs look the slot's nodes up in the trie that rule_nodes[slot] holds (by map id).
    assert h.sensors.maps["rule_nodes"].lookup(U32.pack(slot)) == U32.pack(map_id(nodes.fd))
    entries = {key: nodes.lookup(key) or b"" for key in nodes.keys()}
    assert all(key[4] == slot for key in entries)
    rules = h.sensors.maps["rules"]
    first = slot * abi.SLOT_RULES
    return entries, [rules.lookup(U32.pack(first + i)) or b"" for i in range(rule_count)]


def active_slot(h: Harness) -> int:
    value = h.sensors.maps["config"].lookup(U32.pack(abi.CFG_ACTIVE_SLOT))
    assert value is not None
    return int(U32.unpack(value)[0])


WRITERS = {"native": "1", "python": "0"}


@pytest.fixture(params=sorted(WRITERS))
def writer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with the native helper writing the trie, and with the Python code."""
    if request.param == "native":
        require_native()
    monkeypatch.setenv("TOOL_NATIVE", WRITERS[request.param])
    return str(request.param)


@pytest.mark.parametrize("alternate", [False, True], ids=["one-writer", "writers-alternate"])
def test_each_slot_holds_exactly_its_policy_across_swaps(
    h: Harness, writer: str, alternate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same policy again, a different one, one rule more, nothing: both slots always match their policy.

    With ``alternate``, every other swap is written by the other writer: each must start from what
    the other left.
    """
    previous: KernelTables | None = None
    for i, rules in enumerate((A, A, B, A, A_PLUS, A_PLUS, [], B)):
        if alternate:
            monkeypatch.setenv("TOOL_NATIVE", WRITERS[writer] if i % 2 else str(1 - int(WRITERS[writer])))
        tables = tables_of(h, rules)
        slot = active_slot(h)
        assert slot_contents(h, slot, tables.rule_entries) == expected_slot(tables, slot)
        if previous is not None:
            assert slot_contents(h, 1 - slot, previous.rule_entries) == expected_slot(previous, 1 - slot)
        previous = tables


# Two kinds of change: an edit is written as a difference into the slot's trie; a replacement
# (more trie operations than new nodes) goes into a fresh trie that then takes the slot's place.
BIG = [deny(f"big{i}", f"203.0.113.{i}") for i in range(12)]
EDITED = [*BIG[2:], deny("new1", "198.51.100.1"), deny("new2", "198.51.100.2")]
CHANGES = {"edit": (BIG, EDITED), "replace": (A, B)}


@pytest.mark.parametrize(
    ("change", "map_name", "method"),
    [
        ("edit", "tool_nodes", "delete_packed"),
        ("edit", "tool_nodes", "update_packed"),
        ("replace", "tool_nodes", "update_packed"),
        ("edit", "rules", "update_packed"),
        ("replace", "rules", "update_packed"),
    ],
)
def test_a_failed_write_is_mended_by_the_next_swap(
    h: Harness, monkeypatch: pytest.MonkeyPatch, change: str, map_name: str, method: str
) -> None:
    """A write that fails half way keeps the running policy, and the next swaps leave no stale entry."""
    monkeypatch.setenv("TOOL_NATIVE", "0")
    real = getattr(Map, method)
    failed: list[str] = []

    def write_then_fail(self: Map, *args: Any) -> Any:
        result = real(self, *args)
        if self.name.startswith(map_name):
            failed.append(self.name)
            raise OSError("injected")
        return result

    inject = lambda: monkeypatch.setattr(Map, method, write_then_fail)  # noqa: E731
    check_failed_write_mended(h, CHANGES[change], inject, monkeypatch)
    assert failed, "the injected failure never happened"


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("phase", [1, 2], ids=["deleting", "writing"])
def test_a_native_write_that_fails_half_way_is_mended_by_the_next_swap(
    h: Harness, monkeypatch: pytest.MonkeyPatch, change: str, phase: int
) -> None:
    """The native helper stops at its first failed syscall: here half way through its deletes or its writes."""
    require_native()
    real = native.Native.sync

    def half_then_fail(
        self: native.Native, fd: int, old: tuple[bytes, bytes], new: tuple[bytes, bytes], key_size: int, *rest: int
    ) -> native.Synced:
        if fd < 0:  # counting what a write would take
            return real(self, fd, old, new, key_size, *rest)

        def half(keys: bytes, values: bytes) -> tuple[bytes, bytes]:
            n = len(keys) // key_size // 2
            return keys[: n * key_size], values[: n * 8]

        if phase == 1:  # deletes half of the old nodes: as if it had stopped there
            real(self, fd, old, (*half(*old),), key_size, *rest)
        else:  # every delete, then half of the writes
            real(self, fd, old, (*half(*new),), key_size, *rest)
        return native.Synced(0, 0, -errno.EIO, 0, phase)

    inject = lambda: monkeypatch.setattr(native.Native, "sync", half_then_fail)  # noqa: E731
    check_failed_write_mended(h, CHANGES[change], inject, monkeypatch, errors.BpfError)


def check_failed_write_mended(
    h: Harness,
    change: tuple[list[dict[str, Any]], list[dict[str, Any]]],
    inject: Any,
    monkeypatch: pytest.MonkeyPatch,
    failure: type[Exception] = OSError,
) -> None:
    before, after = change
    tables_of(h, before)
    tables_of(h, before)  # both slots hold `before`
    inject()
    running = active_slot(h)
    with pytest.raises(failure):
        tables_of(h, after)
    assert active_slot(h) == running
    monkeypatch.undo()
    for tool_native in ("1", "0", "1", "0"):
        monkeypatch.setenv("TOOL_NATIVE", tool_native)  # each writer mends what the other left
        for rules in (A_PLUS, after, before, EDITED, A):
            tables = tables_of(h, rules)
            slot = active_slot(h)
            assert slot_contents(h, slot, tables.rule_entries) == expected_slot(tables, slot)


def test_the_compiled_policy_swaps_in_whole(h: Harness) -> None:
    """A policy with nested prefixes, several ports and both protocols reads back node for node."""
    rules = [deny("n1", "10.0.0.0/8", ports=[22, 80, 443]), deny("n2", "10.1.0.0/16"), deny("n3", "10.1.2.0/24")]
    compiled, _ = h.apply(rules)
    tables = build_tables(compiled, "/")
    slot = active_slot(h)
    assert slot_contents(h, slot, tables.rule_entries) == expected_slot(tables, slot)
    # Three nested prefixes, each for TCP and UDP: each node's parent is the one around it.
    assert (
        sorted(n.parent_len for n in tables.nodes)
        == [0, 0] + [abi.LPM_KEY_BITS + 104] * 2 + [abi.LPM_KEY_BITS + 112] * 2
    )


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_replaced_policy_gets_a_fresh_trie_and_the_old_one_is_freed(h: Harness, writer: str, change: str) -> None:
    """An edit is written into the slot's trie; a replacement into a new trie, and the kernel frees the old one."""
    before, after = CHANGES[change]
    tables_of(h, before)
    tables_of(h, before)
    slot = 1 - active_slot(h)  # where `after` goes
    old_id = map_id(h.sensors.slot_trie(slot).fd)
    tables = tables_of(h, after)
    assert active_slot(h) == slot
    assert slot_contents(h, slot, tables.rule_entries) == expected_slot(tables, slot)
    new_id = map_id(h.sensors.slot_trie(slot).fd)
    if change == "edit":
        assert new_id == old_id
        return
    assert new_id != old_id
    deadline = time.monotonic() + 10
    while map_exists(old_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not map_exists(old_id), f"the replaced trie (map id {old_id}) is still allocated"


def map_exists(ident: int) -> bool:
    out = subprocess.run(["bpftool", "map", "show", "id", str(ident)], capture_output=True, text=True)
    return out.returncode == 0


def test_a_fresh_trie_that_cannot_be_installed_is_closed_and_the_slot_kept(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new trie is filled but rule_nodes refuses it: no descriptor is left open, the slot keeps its trie."""
    tables_of(h, A)
    tables_of(h, A)
    slot = 1 - active_slot(h)
    kept = map_id(h.sensors.slot_trie(slot).fd)
    open_fds = len(os.listdir("/proc/self/fd"))
    outer = h.sensors.maps["rule_nodes"]

    def refuse(key: bytes, value: bytes, flags: int = 0) -> None:
        raise OSError("injected")

    monkeypatch.setattr(outer, "update", refuse)
    with pytest.raises(OSError, match="injected"):
        tables_of(h, B)  # a replacement: it goes into a fresh trie
    assert len(os.listdir("/proc/self/fd")) == open_fds
    assert map_id(h.sensors.slot_trie(slot).fd) == kept and active_slot(h) == 1 - slot
    monkeypatch.undo()
    for rules in (B, A, B):
        tables = tables_of(h, rules)
        assert slot_contents(h, active_slot(h), tables.rule_entries) == expected_slot(tables, active_slot(h))
