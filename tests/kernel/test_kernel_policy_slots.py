"""Each swap leaves both policy slots holding exactly their policy: nothing stale, nothing missing."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

from loaders import abi, errors, native
from loaders.sensors import KernelTables, build_tables
from tests.kernel.kernel_harness import Harness

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


def slot_contents(h: Harness, slot: int, rule_count: int) -> tuple[dict[bytes, bytes], list[bytes]]:
    """What the kernel maps hold for ``slot``: its LPM entries and the first ``rule_count`` rules."""
    nodes = h.sensors.maps["rule_nodes"]
    entries = {key: nodes.lookup(key) or b"" for key in nodes.keys() if key[4] == slot}
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
    if request.param == "native" and native.get() is None:
        pytest.fail(f"the native helper is missing: {native.library_path()} (make -C loaders/csrc)")
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


@pytest.mark.parametrize(
    ("map_name", "method"),
    [("rule_nodes", "delete_packed"), ("rule_nodes", "update_packed"), ("rules", "update_packed")],
)
def test_a_failed_write_is_mended_by_the_next_swap(
    h: Harness, monkeypatch: pytest.MonkeyPatch, map_name: str, method: str
) -> None:
    """A write that fails half way keeps the running policy, and the next swaps leave no stale entry."""
    monkeypatch.setenv("TOOL_NATIVE", "0")
    target = h.sensors.maps[map_name]
    real = getattr(target, method)

    def write_then_fail(*args: Any) -> None:
        real(*args)
        raise OSError("injected")

    check_failed_write_mended(h, lambda: monkeypatch.setattr(target, method, write_then_fail), monkeypatch)


@pytest.mark.parametrize("phase", [1, 2], ids=["deleting", "writing"])
def test_a_native_write_that_fails_half_way_is_mended_by_the_next_swap(
    h: Harness, monkeypatch: pytest.MonkeyPatch, phase: int
) -> None:
    """The native helper stops at its first failed syscall: here half way through its deletes or its writes."""
    helper = native.get()
    if helper is None:
        pytest.fail(f"the native helper is missing: {native.library_path()} (make -C loaders/csrc)")
    real = native.Native.sync

    def half_then_fail(
        self: native.Native, fd: int, old: tuple[bytes, bytes], new: tuple[bytes, bytes], key_size: int, *rest: int
    ) -> native.Synced:
        def half(keys: bytes, values: bytes) -> tuple[bytes, bytes]:
            n = len(keys) // key_size // 2
            return keys[: n * key_size], values[: n * 8]

        if phase == 1:  # deletes half of the old nodes: as if it had stopped there
            real(self, fd, old, (*half(*old),), key_size, *rest)
        else:  # every delete, then half of the writes
            real(self, fd, old, (*half(*new),), key_size, *rest)
        return native.Synced(0, 0, -errno.EIO, 0, phase)

    inject = lambda: monkeypatch.setattr(native.Native, "sync", half_then_fail)  # noqa: E731
    check_failed_write_mended(h, inject, monkeypatch, errors.BpfError)


def check_failed_write_mended(
    h: Harness, inject: Any, monkeypatch: pytest.MonkeyPatch, failure: type[Exception] = OSError
) -> None:
    tables_of(h, A)
    tables_of(h, A)  # both slots hold A: swapping in B deletes A's nodes, then writes B's
    inject()
    running = active_slot(h)
    with pytest.raises(failure):
        tables_of(h, B)
    assert active_slot(h) == running
    monkeypatch.undo()
    for tool_native in ("1", "0", "1", "0"):
        monkeypatch.setenv("TOOL_NATIVE", tool_native)  # each writer mends what the other left
        for rules in (A_PLUS, B, A):
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
    assert sorted(n.parent_len for n in tables.nodes) == [0, 0] + [abi.LPM_KEY_BITS + 104] * 2 + [
        abi.LPM_KEY_BITS + 112
    ] * 2
